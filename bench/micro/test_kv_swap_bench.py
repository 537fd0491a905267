"""KV cache micro-benchmarks on the host (CPU tensors; what the engine pays per step in Python):

- decode_step_allocate: 256 running requests each grow by one token (every 16th step crosses a
  block boundary), then the changed block-table entries are committed.
- allocator_churn: 256 single-block allocations and frees.
- swap_op vs python_copy: 1,024 scattered 32 KiB blocks copied by one `kv_swap_blocks` call vs one
  `copy_` per block from Python (the per-call overhead the batched op removes).
- swap_out_in: KVCache.swap_out of 8 requests of 64 blocks each, then swap_in of them.
Results are printed by pytest-benchmark:
    pytest bench/micro -k kv_swap --benchmark-enable
"""
from __future__ import annotations

import pytest
import torch

import trail
from trail.block_allocator import BlockAllocator
from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec

SPEC = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)  # 32 KiB


def test_decode_step_allocate(benchmark):
    kv = KVCache(SPEC, num_blocks=256 * 64, max_slots=256, max_blocks_per_request=64)
    tokens = {s: 100 + s for s in range(256)}

    def step():
        for s in tokens:
            tokens[s] += 1
        kv.allocate(tokens)
        kv.commit_block_tables()
        if max(tokens.values()) >= 60 * 16:
            for s in tokens:
                kv.free(s)
                tokens[s] = 100 + s

    benchmark(step)


def test_allocator_churn(benchmark):
    a = BlockAllocator(1 << 16)

    def churn():
        a.free(a.allocate(256))

    benchmark(churn)


def _blocks(gen):
    src = torch.empty((4096, *SPEC.block_shape), dtype=SPEC.dtype)
    dst = torch.empty((2048, *SPEC.block_shape), dtype=SPEC.dtype)
    src.view(torch.int16).random_(generator=gen)
    pairs = torch.stack([torch.randperm(4096, generator=gen)[:1024],
                         torch.randperm(2048, generator=gen)[:1024]], dim=1)
    return src, dst, pairs


@pytest.mark.parametrize("impl", ["swap_op", "python_copy"])
def test_scattered_copy(benchmark, impl):
    src, dst, pairs = _blocks(torch.Generator().manual_seed(0))
    if impl == "swap_op":
        benchmark(lambda: trail.ops.kv_swap_blocks(src, dst, pairs, 0, "host", 0))
    else:
        plist = pairs.tolist()
        benchmark(lambda: [dst[d].copy_(src[s]) for s, d in plist])
    for s, d in pairs.tolist()[:16]:
        assert torch.equal(dst[d].view(torch.int16), src[s].view(torch.int16))


def test_swap_out_in(benchmark):
    kv = KVCache(SPEC, num_blocks=1024, max_slots=16, max_blocks_per_request=64,
                 num_host_blocks=1024)

    def cycle():
        kv.allocate({s: 64 * 16 for s in range(8)})
        handles = kv.swap_out(list(range(8)))
        kv.reclaim()
        kv.wait(kv.swap_in([(8 + i, h) for i, h in enumerate(handles)]))
        kv.reclaim()
        for s in range(16):
            kv.free(s)

    benchmark(cycle)
