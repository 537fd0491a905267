"""Paged KV cache: the block-major pool on the device, block tables, and (issue 5) the block
allocators and swap space. Knows no model: sizes come from a `KVCacheSpec`.

Layout (frozen, DESIGN.md "KV cache"): one pool tensor per device,
`[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]`, so one block of all layers is
one contiguous range; `layer_view(l)` is the strided `[num_blocks, 2, num_kv_heads, block_size,
head_dim]` view that kernels read (never `.contiguous()` it: that copies the pool).
Block tables: `int32 [max_slots, max_blocks_per_request]`, -1 where no block is mapped.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class KVCache:
    """The pool and the block tables. Allocation, swap and freeing are added by issue 5."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, max_slots: int,
                 max_blocks_per_request: int, device: torch.device | str = "cpu"):
        if num_blocks <= 0 or max_slots <= 0 or max_blocks_per_request <= 0:
            raise ValueError(
                f"KVCache needs positive sizes, got num_blocks={num_blocks}, max_slots={max_slots}, "
                f"max_blocks_per_request={max_blocks_per_request}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.pool = torch.empty((num_blocks, *spec.block_shape), dtype=spec.dtype, device=self.device)
        self.block_tables = torch.full((max_slots, max_blocks_per_request), -1, dtype=torch.int32,
                                       device=self.device)

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    def layer_view(self, layer: int) -> torch.Tensor:
        """`[num_blocks, 2, num_kv_heads, block_size, head_dim]`, a strided view into the pool."""
        if not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.spec.num_layers})")
        return self.pool[:, layer]
