"""Paged attention and the KV write equal plain dense causal attention (float64) for random block
tables, ragged lengths that are not multiples of 16, chunked prefill over a cached prefix, and
decode tokens in the same batch."""
import pytest
import torch
from tolerances import assert_close_ulps

import trail
from trail_kernels.paged_attention import (paged_attention, paged_attention_reference, paged_decode,
                                           write_kv)

BS = 16


def dense_causal(q, k, v):
    """q [n, H, D], k/v [n, KVH, D] of one whole sequence -> [n, H, D], float64."""
    n, heads, dim = q.shape
    group = heads // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * dim ** -0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


class Cache:
    """A pool shaped like KVCache's, filled with NaN (stale memory must never leak in)."""

    def __init__(self, gen, num_blocks=48, slots=6, max_blocks=8, layers=2, kvh=2, hd=32,
                 dtype=torch.float32, device="cpu"):
        self.pool = torch.full((num_blocks, layers, 2, kvh, BS, hd), float("nan"), dtype=dtype, device=device)
        perm = torch.randperm(num_blocks, generator=gen)[: slots * max_blocks]
        self.tables = perm.to(torch.int32).view(slots, max_blocks).contiguous().to(device)
        self.layer = self.pool[:, 1]
        self.device = torch.device(device)

    def slot_mapping(self, slots, positions):
        return trail.ops.slot_mapping(self.tables, slots.to(torch.int32).to(self.device),
                                      positions.to(self.device), BS)


def run_step(cache, segs, impl=None):
    """segs: list of (slot, q, k, v, start); writes K/V then attends; returns per-seg outputs."""
    dev = cache.device
    q, k, v = (torch.cat([s[i] for s in segs]).to(dev) for i in (1, 2, 3))
    lens = torch.tensor([s[1].shape[0] for s in segs])
    starts = torch.tensor([s[4] for s in segs])
    slots = torch.tensor([s[0] for s in segs], dtype=torch.int32)
    positions = torch.cat([torch.arange(st, st + n) for st, n in zip(starts.tolist(), lens.tolist())])
    write_kv(cache.layer, k, v, cache.slot_mapping(torch.repeat_interleave(slots, lens), positions), impl=impl)
    cu = torch.zeros(len(segs) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    ctx = (starts + lens).to(torch.int32)
    out = paged_attention(q, cache.layer, cache.tables, slots.to(dev), cu.to(dev), ctx.to(dev),
                          int(lens.max()), int(ctx.max()), q.shape[-1] ** -0.5, impl=impl)
    assert out.device == q.device
    return list(out.cpu().split(lens.tolist()))


@pytest.mark.parametrize("heads,kvh,impl", [(4, 2, "reference"), (2, 2, "reference"), (4, 2, "triton")])
def test_chunked_prefill_and_decode_match_dense(seeded, heads, kvh, impl):
    hd = 32
    cache = Cache(seeded, kvh=kvh, hd=hd)
    lengths = {0: 37, 2: 5, 3: 50, 5: 17}           # slot -> total sequence length (ragged)
    seqs = {s: (torch.randn(n, heads, hd, generator=seeded), torch.randn(n, kvh, hd, generator=seeded),
                torch.randn(n, kvh, hd, generator=seeded)) for s, n in lengths.items()}
    # chunk boundaries per slot (crossing block edges at odd places), then decode steps
    plan = {0: [0, 13, 33, 34, 35, 36, 37], 2: [0, 5], 3: [0, 1, 31, 49, 50], 5: [0, 16, 17]}
    got = {s: [] for s in lengths}
    for step in range(max(len(p) for p in plan.values()) - 1):
        segs = []
        for s, p in plan.items():
            if step + 1 < len(p):
                a, b = p[step], p[step + 1]
                q, k, v = seqs[s]
                segs.append((s, q[a:b], k[a:b], v[a:b], a))
        for (s, *_), o in zip(segs, run_step(cache, segs, impl=impl)):
            got[s].append(o)
    for s, (q, k, v) in seqs.items():
        out = torch.cat(got[s])
        assert_close_ulps(out, dense_causal(q, k, v), ulps=64)


def test_decode_equals_varlen_with_single_tokens(seeded):
    heads, kvh, hd = 4, 2, 32
    cache = Cache(seeded, kvh=kvh, hd=hd)
    ctx = torch.tensor([1, 16, 17, 40], dtype=torch.int32)
    slots = torch.tensor([4, 0, 2, 1], dtype=torch.int32)
    for s, n in zip(slots.tolist(), ctx.tolist()):
        pos = torch.arange(n)
        k, v = torch.randn(n, kvh, hd, generator=seeded), torch.randn(n, kvh, hd, generator=seeded)
        write_kv(cache.layer, k, v, cache.slot_mapping(torch.full((n,), s), pos))
    q = torch.randn(4, heads, hd, generator=seeded)
    cu = torch.arange(5, dtype=torch.int32)
    a = paged_decode(q, cache.layer, cache.tables, slots, ctx, 40, hd ** -0.5)
    b = paged_attention(q, cache.layer, cache.tables, slots, cu, ctx, 1, 40, hd ** -0.5)
    assert not a.isnan().any()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the upper bound on context length is only a bound
    c = paged_decode(q, cache.layer, cache.tables, slots, ctx, 64, hd ** -0.5)
    assert_close_ulps(c, a)


def test_write_kv_skips_negative_slots(seeded):
    cache = Cache(seeded)
    cache.pool.normal_(generator=seeded)
    before = cache.pool.clone()
    k, v = torch.randn(5, 2, 32, generator=seeded), torch.randn(5, 2, 32, generator=seeded)
    slots = torch.tensor([-1, 3 * BS + 2, -1, 7, -1])
    write_kv(cache.layer, k, v, slots)
    expect = before.clone()
    expect[3, 1, 0, :, 2], expect[3, 1, 1, :, 2] = k[1], v[1]
    expect[0, 1, 0, :, 7], expect[0, 1, 1, :, 7] = k[3], v[3]
    assert torch.equal(cache.pool, expect)
    write_kv(cache.layer, k, v, torch.full((5,), -1))      # nothing valid: nothing changes
    assert torch.equal(cache.pool, expect)


def test_bad_input_is_rejected(seeded):
    cache = Cache(seeded)
    q = torch.randn(3, 4, 32)
    with pytest.raises(ValueError, match="int32"):
        paged_decode(q, cache.layer, cache.tables.long(), torch.zeros(3, dtype=torch.int32),
                     torch.ones(3, dtype=torch.int32), 1, 1.0)
    with pytest.raises(ValueError, match="heads"):
        paged_decode(torch.randn(3, 3, 32), cache.layer, cache.tables, torch.zeros(3, dtype=torch.int32),
                     torch.ones(3, dtype=torch.int32), 1, 1.0)
    with pytest.raises(ValueError, match="blocks"):
        paged_decode(q, cache.layer, cache.tables, torch.zeros(3, dtype=torch.int32),
                     torch.ones(3, dtype=torch.int32), 16 * 9, 1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(cache.layer, torch.randn(3, 2, 32), torch.randn(3, 2, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="impl"):
        paged_decode(q, cache.layer, cache.tables, torch.zeros(3, dtype=torch.int32),
                     torch.ones(3, dtype=torch.int32), 1, 1.0, impl="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_cuda_matches_dense(dtype):
    gen = torch.Generator().manual_seed(7)
    heads, kvh, hd = 8, 2, 128
    cache = Cache(gen, num_blocks=96, slots=8, max_blocks=12, kvh=kvh, hd=hd, dtype=dtype, device="cuda")
    lengths = {1: 100, 4: 3, 6: 161}
    seqs = {s: tuple(torch.randn(n, h, hd, generator=gen).to(dtype) for h in (heads, kvh, kvh))
            for s, n in lengths.items()}
    plan = {1: [0, 60, 99, 100], 4: [0, 1, 2, 3], 6: [0, 161]}
    got = {s: [] for s in lengths}
    for step in range(3):
        segs = [(s, *(t[p[step]:p[step + 1]] for t in seqs[s]), p[step])
                for s, p in plan.items() if step + 1 < len(p)]
        for (s, *_), o in zip(segs, run_step(cache, segs)):
            got[s].append(o)
    # bf16 inputs, fp32 math inside: only the output rounding differs from float64
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for s, (q, k, v) in seqs.items():
        torch.testing.assert_close(torch.cat(got[s]).double(), dense_causal(q, k, v), rtol=tol, atol=tol)


def test_reference_is_what_dispatch_runs_on_cpu(seeded):
    cache = Cache(seeded)
    k = torch.randn(20, 2, 32, generator=seeded)
    write_kv(cache.layer, k, k, cache.slot_mapping(torch.zeros(20), torch.arange(20)))
    q = torch.randn(20, 4, 32, generator=seeded)
    args = (q, cache.layer, cache.tables, torch.zeros(1, dtype=torch.int32),
            torch.tensor([0, 20], dtype=torch.int32), torch.tensor([20], dtype=torch.int32), 20, 20, 0.2)
    assert torch.equal(paged_attention(*args), paged_attention_reference(*args))
