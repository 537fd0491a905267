"""The sizes of a paged KV cache: `KVCacheSpec` (layers, KV heads, head dim, dtype, block size)
and the bytes one block / one token takes. The engine builds it from the model's config; the
KV cache (`trail.kv_cache`), the simulator and the memory sizing read it. Holds no memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    block_size: int = BLOCK_SIZE

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVCacheSpec.{name} must be positive, got {getattr(self, name)}")

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        n = 1
        for s in self.block_shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None,
                    block_size: int = BLOCK_SIZE) -> "KVCacheSpec":
        """From an HF-style config (a dict or an object with attributes): num_hidden_layers,
        num_key_value_heads (default num_attention_heads), head_dim (default hidden_size //
        num_attention_heads), torch_dtype / dtype unless `dtype` is given."""
        def get(key, default=None):
            value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
            return default if value is None else value

        heads = get("num_attention_heads")
        layers, kv_heads = get("num_hidden_layers"), get("num_key_value_heads", heads)
        head_dim = get("head_dim") or (get("hidden_size") // heads if heads else None)
        if layers is None or kv_heads is None or head_dim is None:
            raise ValueError("KVCacheSpec.from_config needs num_hidden_layers, num_attention_heads "
                             "or num_key_value_heads, and head_dim or hidden_size")
        if dtype is None:
            name = get("torch_dtype") or get("dtype") or "float32"
            dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).replace("torch.", ""))
        return cls(int(layers), int(kv_heads), int(head_dim), dtype, block_size)

