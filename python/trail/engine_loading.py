"""Building an engine from a model source: the model and tokenizer (trail.models.loader), the
length probe shipped for the model or given by path, the prompt predictor beside it, and the
model's stop ids. `LLMEngine.from_pretrained` is the user-facing entry; this module holds its parts
so the engine module stays the step loop. Only runtime pieces of the predictor are imported."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

# prompt ids -> expected total output tokens, one per prompt (the prompt predictor's contract)
PromptPredictorFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


def load_engine_parts(source, *, probe: str | None = "shipped", prompt_predictor: str | None = "boe",
                      device=None, dtype: torch.dtype | None = None) -> dict:
    """The keyword arguments of `LLMEngine(...)` for `source` (see `LLMEngine.from_pretrained`)."""
    from trail.models.loader import default_dtype, load_model, load_tokenizer
    from trail.predictor.probe_file import load_probe_params, shipped_probe_dir

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    model = load_model(source, device, dtype)
    random = str(source).startswith("random:")
    tokenizer = None if random else load_tokenizer(source)
    probe_params = layer = max_new = predictor = None
    folder = None
    if probe == "shipped" or prompt_predictor in ("boe", "minilm"):
        try:      # shipped files are found by the model folder's name (probes/<name>/)
            folder = shipped_probe_dir(Path(str(source)).with_suffix("").name.split(".")[0])
        except FileNotFoundError:
            logger.warning("no shipped probe for %s", source)
    if probe is not None:
        path = (folder / "probe") if probe == "shipped" and folder is not None else (None if probe == "shipped" else probe)
        if path is not None:
            probe_params, spec = load_probe_params(path, expect_d=model.config.hidden_size)
            layer, max_new = spec.layer, spec.max_new_tokens
    if prompt_predictor in ("boe", "minilm"):
        # beside a probe given by path (trained together), else the shipped one
        name = f"prompt_{prompt_predictor}"
        beside = None if probe in (None, "shipped") else (Path(str(probe)) if Path(str(probe)).is_dir()
                                                          else Path(str(probe)).parent)
        found = [d for d in (beside, folder) if d is not None and (d / f"{name}.json").is_file()]
        if found:
            predictor = prompt_predictor_fn(found[0] / name, model, tokenizer)
        else:
            logger.warning("no %s prompt predictor beside the probe or shipped for %s", prompt_predictor, source)
    elif prompt_predictor is not None:
        predictor = prompt_predictor_fn(prompt_predictor, model, tokenizer)
    eos = generation_eos_ids(source, tokenizer)
    return dict(model=model, tokenizer=tokenizer, probe=probe_params, probe_layer=layer, probe_max_new=max_new,
                prompt_predictor=predictor, eos_token_ids=eos)


def prompt_predictor_fn(path, model, tokenizer) -> PromptPredictorFn:
    """A prompt predictor file (kind prompt_boe / prompt_minilm) as the engine's callable."""
    from trail.predictor.prompt_predictors import PromptPredictor

    emb = model.embed_tokens.weight.detach().float().cpu()
    predictor = PromptPredictor(path, embeddings=emb)

    def predict(prompts: Sequence[Sequence[int]]) -> np.ndarray:
        if predictor.spec.kind == "prompt_minilm":
            if tokenizer is None:
                raise ValueError("the MiniLM prompt predictor needs text: load a tokenizer")
            texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
            return predictor.expected_total(texts=texts).cpu().numpy()
        return predictor.expected_total(prompt_ids=[list(p) for p in prompts]).cpu().numpy()

    return predict


def generation_eos_ids(source, tokenizer) -> list[int]:
    """Stop ids of a model: its generation_config.json eos_token_id(s) and the tokenizer's."""
    ids = set()
    folder = Path(str(source))
    cfg = folder / "generation_config.json" if folder.is_dir() else None
    if cfg is not None and cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def free_device_bytes(device: torch.device, config, vocab: int) -> int | None:
    """What the KV pool may take on a CUDA device (None elsewhere, or when num_gpu_blocks is given):
    gpu_memory_utilization of the device less what is in use and the runner's per-slot buffers."""
    if device.type != "cuda" or config.num_gpu_blocks is not None:
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserve = config.max_slots * (vocab + 4 * config.max_model_len // config.block_size)
    return max(0, int(total * config.gpu_memory_utilization) - (total - free) - reserve)

def measure_prefill_rate(runner, kv, config) -> float:
    """Tokens per second of one prefill (the recompute cost), timed on a warm model, in blocks
    borrowed from the (still empty) KV cache."""
    from trail.batch import BatchPlan
    from trail.serving_core import borrowed_blocks
    from trail_kernels import row_flags

    n = min(256, config.max_tokens_per_step, config.max_model_len)
    ids = np.random.default_rng(0).integers(0, runner.config.vocab_size, n)
    plan = BatchPlan(np.array([0]), np.array([row_flags.PREFILL | row_flags.FIRST_CHUNK]), np.array([0]),
                     np.array([n]), ids)
    times = []
    with borrowed_blocks(kv, 0, n):
        for _ in range(2):
            t = time.perf_counter()
            runner.forward(runner.prepare_plan(plan))
            if kv.device.type == "cuda":
                torch.cuda.synchronize(kv.device)
            times.append(time.perf_counter() - t)
    return n / min(times)


def warn_probe_range(probe, probe_max_new: int | None, max_new: int) -> bool:
    """Logs (and returns True) when a request's cap exceeds what the probe was trained on."""
    if probe is None or probe_max_new is None or max_new <= probe_max_new:
        return False
    logger.warning("max_new_tokens=%d exceeds the %d tokens the probe was trained on: predicted remaining "
                   "lengths saturate near its largest bin (%.0f tokens) and stay within [0, max_new - generated]",
                   max_new, probe_max_new, float(probe.bin_values.max()))
    return True
