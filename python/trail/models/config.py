"""Model configuration: the few numbers our Llama-family forward needs, read from an HF
`config.json` (transformers 4 and 5 spellings), from GGUF metadata, or from a named preset.

Presets (`PRESETS`) give the shapes of real models for random-weight speed runs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # transformers' rope_parameters minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    arch: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"architecture {self.arch!r} is not supported (one of {SUPPORTED_ARCHS})")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE:
            raise ValueError(f"rope_type {rope_type!r} is not supported (one of {SUPPORTED_ROPE})")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * d * f + 2 * d
        return self.num_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    # ---- HF config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_ARCHS:
            raise ValueError(f"model_type {model_type!r} is not supported (one of {SUPPORTED_ARCHS})")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type") or "default"
        if rope["rope_type"] in ("llama3", "yarn"):
            rope.setdefault("original_max_position_embeddings",
                            cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
        if cfg.get("partial_rotary_factor", 1.0) != 1.0 or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            mlp_bias=cfg.get("mlp_bias", False), sliding_window=sliding, arch=model_type,
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_hf_dict(json.loads(cfg_file.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers config dict of the same model (tests build reference models from it)."""
        rope = dict(self.rope_scaling)
        rope["rope_theta"] = self.rope_theta
        out = {
            "model_type": self.arch, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": rope, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
        }
        if self.arch == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        else:
            out.update(sliding_window=self.sliding_window, use_sliding_window=self.sliding_window is not None)
        if self.rope_scaling.get("rope_type", "default") != "default":
            scaling = dict(self.rope_scaling)
            out["rope_scaling"] = scaling | {"rope_theta": self.rope_theta}
        return out


def _llama3(vocab, d, ffn, layers, heads, kv, head_dim, theta, tie, scaling, max_pos):
    return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim, rms_norm_eps=1e-5,
                       rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos,
                       tie_word_embeddings=tie, bos_token_id=128000, eos_token_id=128009)


PRESETS: dict[str, ModelConfig] = {
    # Meta-Llama-3-8B(-Instruct): TRAIL's model
    "llama3-8b": _llama3(128256, 4096, 14336, 32, 32, 8, 128, 500000.0, False,
                         {"rope_type": "default"}, 8192),
    "llama3.2-1b": _llama3(128256, 2048, 8192, 16, 32, 8, 64, 500000.0, True,
                           {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           131072),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # for tests: every code path, a few milliseconds per forward on a CPU
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
