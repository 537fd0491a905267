"""Builds a `LlamaModel` with weights from an HF folder (config.json + safetensors), a GGUF
file (dequantised with the `gguf` package and converted once to HF tensor names), or random
values from a config / preset (for speed runs at a real model's shape).

    load_model("path/to/hf_folder" | "model.gguf" | "random:llama3-8b", device, dtype)
    load_tokenizer("path/to/hf_folder" | "model.gguf")

Default dtype: fp32 on CPU, bf16 on CUDA.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from trail.models.config import ModelConfig, preset
from trail.models.llama import LlamaModel

logger = logging.getLogger(__name__)


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _empty_model(config: ModelConfig, device, dtype) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    return model.eval()


def _fill_from_hf_names(model: LlamaModel, get: Callable[[str], torch.Tensor | None]) -> LlamaModel:
    """Copies checkpoint tensors named as in HF's LlamaForCausalLM into the fused parameters."""
    cfg = model.config

    def need(name):
        t = get(name)
        if t is None:
            raise KeyError(f"checkpoint lacks tensor {name!r}")
        return t

    def copy(param, tensor, name):
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
        param.copy_(tensor)

    with torch.no_grad():
        copy(model.embed_tokens.weight, need("model.embed_tokens.weight"), "embed_tokens")
        copy(model.norm.weight, need("model.norm.weight"), "norm")
        if not cfg.tie_word_embeddings:
            copy(model.lm_head.weight, need("lm_head.weight"), "lm_head")
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([need(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            copy(attn.qkv_proj.weight, qkv, p + "qkv")
            if cfg.attention_bias:
                copy(attn.qkv_proj.bias, torch.cat([need(p + f"self_attn.{x}_proj.bias") for x in "qkv"]),
                     p + "qkv bias")
            copy(attn.o_proj.weight, need(p + "self_attn.o_proj.weight"), p + "o_proj")
            gate_up = torch.cat([need(p + "mlp.gate_proj.weight"), need(p + "mlp.up_proj.weight")])
            copy(mlp.gate_up_proj.weight, gate_up, p + "gate_up")
            copy(mlp.down_proj.weight, need(p + "mlp.down_proj.weight"), p + "down_proj")
            if cfg.mlp_bias:
                copy(mlp.gate_up_proj.bias, torch.cat([need(p + "mlp.gate_proj.bias"),
                                                       need(p + "mlp.up_proj.bias")]), p + "gate_up bias")
                copy(mlp.down_proj.bias, need(p + "mlp.down_proj.bias"), p + "down bias")
            copy(layer.input_layernorm.weight, need(p + "input_layernorm.weight"), p + "input_layernorm")
            copy(layer.post_attention_layernorm.weight, need(p + "post_attention_layernorm.weight"),
                 p + "post_attention_layernorm")
    return model


def from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], device="cpu",
                    dtype: torch.dtype | None = None) -> LlamaModel:
    """A model from HF-named tensors (e.g. a transformers model's `state_dict()`)."""
    model = _empty_model(config, device, dtype or default_dtype(device))
    return _fill_from_hf_names(model, state.get)


# ---- HF folder ---------------------------------------------------------------------------------
def load_hf(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> LlamaModel:
    from safetensors import safe_open

    path = Path(path)
    config = ModelConfig.from_hf_dir(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    handles = [safe_open(str(path / f), framework="pt", device=str(torch.device(device))) for f in files]
    where = {name: h for h in handles for name in h.keys()}
    model = _empty_model(config, device, dtype or default_dtype(device))
    return _fill_from_hf_names(model, lambda n: where[n].get_tensor(n) if n in where else None)


# ---- GGUF --------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported")
    heads = _gguf_field(reader, f"{arch}.attention.head_count")
    d = _gguf_field(reader, f"{arch}.embedding_length")
    vocab = _gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=_gguf_field(reader, f"{arch}.feed_forward_length"),
        num_layers=_gguf_field(reader, f"{arch}.block_count"), num_heads=heads,
        num_kv_heads=_gguf_field(reader, f"{arch}.attention.head_count_kv", heads),
        head_dim=_gguf_field(reader, f"{arch}.attention.key_length", d // heads),
        rms_norm_eps=_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=_gguf_field(reader, f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names, arch="llama" if arch == "mistral" else arch,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def gguf_tensors(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, fp32 tensors under HF names), dequantised; llama.cpp's q/k row permutation undone."""
    try:
        from gguf import GGUFReader, dequantize
    except ImportError as exc:
        raise ImportError("loading a GGUF file needs the `gguf` package (pip install gguf)") from exc
    reader = GGUFReader(str(path))
    config = gguf_config(reader)
    permuted = _gguf_field(reader, "general.architecture") in ("llama", "mistral")
    out = {}
    for t in reader.tensors:
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _GGUF_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
            if permuted and parts[2] in ("attn_q", "attn_k"):
                n_head = config.num_heads if parts[2] == "attn_q" else config.num_kv_heads
                w = w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        else:
            logger.debug("GGUF tensor %s ignored", t.name)
            continue
        out[name] = w
    return config, out


def load_gguf(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> LlamaModel:
    config, tensors = gguf_tensors(path)
    return from_state_dict(config, tensors, device, dtype)


# ---- random ------------------------------------------------------------------------------------
def random_model(config: ModelConfig | str, device="cpu", dtype: torch.dtype | None = None,
                 seed: int = 0, std: float = 0.02) -> LlamaModel:
    """Random weights (normal(0, std), norm weights 1): a real model's shape and speed, no meaning."""
    config = preset(config) if isinstance(config, str) else config
    model = _empty_model(config, device, dtype or default_dtype(device))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return model


def load_model(source: str | Path, device="cpu", dtype: torch.dtype | None = None) -> LlamaModel:
    """`random:<preset>`, a `.gguf` file, or an HF folder."""
    s = str(source)
    if s.startswith("random:"):
        return random_model(s.split(":", 1)[1], device, dtype)
    path = Path(s)
    if path.suffix == ".gguf":
        return load_gguf(path, device, dtype)
    if path.is_dir():
        return load_hf(path, device, dtype)
    raise FileNotFoundError(f"model source {s!r} is neither random:<preset>, a .gguf file nor an HF folder")


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    path = Path(source)
    # no tokenization-space clean-up: it is not prefix-stable (streamed text would differ from a
    # full decode) and transformers ignores it for BPE tokenizers anyway, with a warning per decode
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, clean_up_tokenization_spaces=False)
    return AutoTokenizer.from_pretrained(str(path), clean_up_tokenization_spaces=False)
