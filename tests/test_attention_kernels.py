"""The Triton paged-attention kernels (trail_kernels/paged_attention_triton.py) against a float64
dense reference and the torch references, on fresh random data in a NaN-poisoned pool (stale
memory must never leak in) with NaN-poisoned outputs and split-K workspaces (every element must be
written): GQA ratios 1-8, head_dim 64 and 128, ragged contexts not multiples of 16, bf16 and fp32.

On CPU the kernels run under TRITON_INTERPRET=1 with short contexts and few rows; the long
contexts (up to 8k), CUDA-graph capture, the > 2^31-element pool and the device assertion are
`gpu` tests. Tolerances are in units of the compared dtype's epsilon (tests/tolerances.py)."""
import os
import subprocess
import sys

import pytest
import torch
from sm90_compile import compile_for_sm90
from tolerances import assert_close_ulps

from trail_kernels import paged_attention_triton as K
from trail_kernels.paged_attention import (paged_attention, paged_attention_reference, paged_decode,
                                           paged_decode_reference, write_kv, write_kv_reference)

BS = 16
ULPS = {torch.float32: 64, torch.bfloat16: 2}


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pool:
    """A pool shaped like KVCache's ([blocks, layers, 2, kvh, BS, hd]) filled with NaN; each slot
    owns random distinct blocks; `layer` is the strided view of layer 1 the kernels read."""

    def __init__(self, gen, slots, max_blocks, kvh, hd, dtype, device, spare=3, layers=2):
        num_blocks = slots * max_blocks + spare
        self.pool = torch.full((num_blocks, layers, 2, kvh, BS, hd), float("nan"), dtype=dtype, device=device)
        perm = torch.randperm(num_blocks, generator=gen)[: slots * max_blocks]
        self.tables = perm.to(torch.int32).view(slots, max_blocks).contiguous().to(device)
        self.layer = self.pool[:, 1]
        self.k, self.v = {}, {}

    def fill(self, gen, slot, n):
        """Fresh random K/V for positions [0, n) of `slot`, written straight into the blocks."""
        kvh, hd = self.layer.shape[2], self.layer.shape[4]
        k = torch.randn(n, kvh, hd, generator=gen).to(self.layer.dtype).to(self.layer.device)
        v = torch.randn(n, kvh, hd, generator=gen).to(self.layer.dtype).to(self.layer.device)
        pos = torch.arange(n, device=self.layer.device)
        blocks = self.tables[slot].long()[pos // BS]
        self.layer[blocks, 0, :, pos % BS] = k
        self.layer[blocks, 1, :, pos % BS] = v
        self.k[slot], self.v[slot] = k, v


def dense(q, k, v, q_start, scale):
    """float64: queries q [m, H, D] at positions q_start.. attend to keys [0, own position]."""
    m, heads, _ = q.shape
    n = k.shape[0]
    group = heads // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    qpos = q_start + torch.arange(m, device=q.device)
    s = s.masked_fill(torch.arange(n, device=q.device)[None, None, :] > qpos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def poisoned_partials(monkeypatch):
    real = K.alloc_partials

    def nan_partials(*args):
        return tuple(t.fill_(float("nan")) for t in real(*args))
    monkeypatch.setattr(K, "alloc_partials", nan_partials)


def decode_case(gen, heads, kvh, hd, dtype, contexts, device, max_blocks=None):
    max_blocks = max_blocks or -(-max(contexts) // BS) + 1
    pool = Pool(gen, len(contexts) + 1, max_blocks, kvh, hd, dtype, device)
    slots = torch.randperm(len(contexts) + 1, generator=gen)[: len(contexts)]
    for s, n in zip(slots.tolist(), contexts):
        pool.fill(gen, s, n)
    q = torch.randn(len(contexts), heads, hd, generator=gen).to(dtype).to(device)
    return pool, slots.to(torch.int32).to(device), torch.tensor(contexts, dtype=torch.int32, device=device), q


def check_decode(pool, slots, ctx, q, splits, dtype, max_context_len=None):
    hd = q.shape[-1]
    scale = hd ** -0.5
    mcl = max_context_len or int(ctx.max())
    ref = paged_decode_reference(q, pool.layer, pool.tables, slots, ctx, mcl, scale)
    vmax = max(float(pool.v[s].float().abs().max()) for s in slots.tolist())
    for ns in splits:
        out = torch.full_like(q, float("nan"))
        K.paged_decode_triton(q, pool.layer, pool.tables, slots, ctx, mcl, scale, num_splits=ns, out=out)
        for i, (s, n) in enumerate(zip(slots.tolist(), ctx.tolist())):
            want = dense(q[i:i + 1], pool.k[s], pool.v[s], n - 1, scale)
            assert_close_ulps(out[i:i + 1], want, dtype=dtype, ulps=ULPS[dtype], scale=vmax,
                              msg=lambda m: f"splits={ns} segment {i} (ctx {n}): {m}")
        assert_close_ulps(out, ref, dtype=dtype, ulps=ULPS[dtype], scale=vmax)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hd,heads,kvh", [(64, 3, 3), (128, 8, 2), (64, 6, 2), (64, 8, 1)],
                         ids=["g1-d64", "g4-d128", "g3-d64", "g8-d64"])
def test_decode_matches_dense(seeded, monkeypatch, hd, heads, kvh, dtype):
    poisoned_partials(monkeypatch)
    pool, slots, ctx, q = decode_case(seeded, heads, kvh, hd, dtype, [1, 17, 45, 70], dev())
    check_decode(pool, slots, ctx, q, splits=(1, 3), dtype=dtype)


def test_decode_bound_and_split_count_are_only_hints(seeded, monkeypatch):
    """max_context_len past the real contexts and more splits than a context has tiles."""
    poisoned_partials(monkeypatch)
    pool, slots, ctx, q = decode_case(seeded, 4, 2, 64, torch.float32, [3, 33, 16], dev(), max_blocks=6)
    check_decode(pool, slots, ctx, q, splits=(2, 7), dtype=torch.float32, max_context_len=6 * BS)


def prefill_case(gen, heads, kvh, hd, dtype, segs, device):
    """segs: (prefix, new) per segment; the cache holds prefix + new positions of each slot."""
    total = [p + n for p, n in segs]
    pool = Pool(gen, len(segs), -(-max(total) // BS), kvh, hd, dtype, device)
    slots = torch.randperm(len(segs), generator=gen)
    for s, n in zip(slots.tolist(), total):
        pool.fill(gen, s, n)
    lens = torch.tensor([n for _, n in segs])
    cu = torch.zeros(len(segs) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    q = torch.randn(int(lens.sum()), heads, hd, generator=gen).to(dtype).to(device)
    return (pool, slots.to(torch.int32).to(device), cu.to(device),
            torch.tensor(total, dtype=torch.int32, device=device), q)


def check_prefill(pool, slots, cu, ctx, q, dtype, config=None):
    hd = q.shape[-1]
    scale = hd ** -0.5
    lens = (cu[1:] - cu[:-1]).tolist()
    out = torch.full_like(q, float("nan"))
    K.paged_attention_triton(q, pool.layer, pool.tables, slots, cu, ctx, max(lens), int(ctx.max()), scale,
                             config=config, out=out)
    vmax = max(float(pool.v[s].float().abs().max()) for s in slots.tolist())
    for i, (s, n) in enumerate(zip(slots.tolist(), ctx.tolist())):
        a, b = int(cu[i]), int(cu[i + 1])
        want = dense(q[a:b], pool.k[s], pool.v[s], n - (b - a), scale)
        assert_close_ulps(out[a:b], want, dtype=dtype, ulps=ULPS[dtype], scale=vmax,
                          msg=lambda m: f"segment {i} (ctx {n}, new {b - a}): {m}")
    return out, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hd,heads,kvh", [(64, 2, 2), (128, 4, 1), (64, 6, 2)], ids=["g1-d64", "g4-d128", "g3-d64"])
def test_prefill_over_cached_prefix_matches_dense(seeded, hd, heads, kvh, dtype):
    # (cached prefix, new tokens): a fresh prompt, chunks over prefixes that end mid-block,
    # a decode-like single token, a chunk longer than a query tile
    segs = [(0, 21), (13, 5), (40, 1), (7, 35)]
    pool, slots, cu, ctx, q = prefill_case(seeded, heads, kvh, hd, dtype, segs, dev())
    out, scale = check_prefill(pool, slots, cu, ctx, q, dtype)
    ref = paged_attention_reference(q, pool.layer, pool.tables, slots, cu, ctx, 35, int(ctx.max()), scale)
    vmax = max(float(pool.v[s].float().abs().max()) for s in slots.tolist())
    assert_close_ulps(out, ref, dtype=dtype, ulps=ULPS[dtype], scale=vmax)


def test_prefill_empty_segment_and_single_tokens(seeded):
    """A zero-length segment in the batch owns a tile that must do nothing; single-token segments
    through the prefill kernel equal the decode kernel."""
    segs = [(5, 3), (9, 0), (30, 1), (0, 1)]
    pool, slots, cu, ctx, q = prefill_case(seeded, 4, 2, 64, torch.float32, segs, dev())
    check_prefill(pool, slots, cu, ctx, q, torch.float32)
    one = torch.tensor([2, 3])
    dq = q[cu[one].long()]
    a = K.paged_decode_triton(dq, pool.layer, pool.tables, slots[one], ctx[one], 31, 0.125, num_splits=1)
    b = K.paged_attention_triton(dq, pool.layer, pool.tables, slots[one],
                                 torch.arange(3, dtype=torch.int32, device=dq.device), ctx[one], 1, 31, 0.125)
    assert_close_ulps(a, b, ulps=16)


def test_prefill_row_with_more_tokens_than_context_reads_nothing(seeded):
    """A mixed-step graph's last pad row holds spare tokens over context 0: it reads no key (no
    position below 0 through the block table) and writes 0; the other rows are exact."""
    segs = [(5, 3), (0, 2), (0, 40)]
    pool, slots, cu, ctx, q = prefill_case(seeded, 4, 2, 64, torch.float32, segs, dev())
    pad = 2
    ctx[pad] = 0
    out = torch.full_like(q, float("nan"))
    K.paged_attention_triton(q, pool.layer, pool.tables, slots, cu, ctx, 40, 8, 0.125, out=out)
    a = int(cu[pad])
    assert torch.equal(out[a:], torch.zeros_like(out[a:]))
    check_prefill(pool, slots[:pad], cu[:pad + 1], ctx[:pad], q[:a], torch.float32)


@pytest.mark.parametrize("cache_dtype,in_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "fp32-into-bf16"])
def test_write_kv_matches_reference_bit_for_bit(seeded, cache_dtype, in_dtype):
    kvh, hd, t = 3, 64, 11
    pool = torch.randn(12, 2, 2, kvh, BS, hd, generator=seeded).to(cache_dtype).to(dev())
    # k, v as the model makes them: views into one fused qkv row (non-contiguous token stride)
    qkv = torch.randn(t, (4 + 2 * kvh) * hd, generator=seeded).to(in_dtype).to(dev())
    k = qkv[:, 4 * hd:(4 + kvh) * hd].view(t, kvh, hd)
    v = qkv[:, (4 + kvh) * hd:].view(t, kvh, hd)
    slots = torch.randperm(12 * BS, generator=seeded)[:t]
    slots[[0, 4, 5]] = -1
    slots = slots.to(dev())
    want = pool.clone()
    write_kv_reference(want[:, 1], k, v, slots)
    got = pool.clone()
    write_kv(got[:, 1], k, v, slots, impl="triton")
    if dev() == "cpu" and in_dtype != cache_dtype:
        # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): 1 ulp
        assert_close_ulps(got, want, dtype=cache_dtype, ulps=1, scale=0.0)
        got = want.clone()
    else:
        assert torch.equal(got, want)
    write_kv(got[:, 1], k, v, torch.full_like(slots, -1), impl="triton")   # all skipped
    assert torch.equal(got, want)


def test_empty_context_gives_zeros(seeded):
    """A padded row (context 0, e.g. a CUDA-graph bucket's filler) reads nothing and writes 0."""
    pool, slots, ctx, q = decode_case(seeded, 4, 2, 64, torch.float32, [5, 20], dev())
    ctx[0] = 0
    for ns in (1, 2):
        out = K.paged_decode_triton(q, pool.layer, pool.tables, slots, ctx, 20, 0.125, num_splits=ns)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert not out[1].isnan().any()


def test_dispatch_auto_runs_triton_only_on_cuda(seeded):
    pool, slots, ctx, q = decode_case(seeded, 4, 2, 64, torch.float32, [5, 20], "cpu")
    args = (q, pool.layer, pool.tables, slots, ctx, 20, 0.125)
    assert torch.equal(paged_decode(*args), paged_decode_reference(*args))
    cu = torch.arange(3, dtype=torch.int32)
    assert torch.equal(paged_attention(q, pool.layer, pool.tables, slots, cu, ctx, 1, 20, 0.125),
                       paged_attention_reference(q, pool.layer, pool.tables, slots, cu, ctx, 1, 20, 0.125))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check; the GPU one is test_gpu_debug_assert")
def test_debug_mode_asserts_on_unmapped_block(seeded, monkeypatch):
    from triton.runtime import interpreter
    monkeypatch.setattr(interpreter.interpreter_builder, "options", interpreter.InterpreterOptions(debug=True))
    monkeypatch.setenv("TRAIL_KV_DEBUG", "1")
    pool, slots, ctx, q = decode_case(seeded, 4, 2, 64, torch.float32, [20, 40], "cpu")
    pool.tables[int(slots[1]), 1] = -1                       # position 16..31 of segment 1 unmapped
    with pytest.raises(Exception, match="unmapped KV block"):
        K.paged_decode_triton(q, pool.layer, pool.tables, slots, ctx, 40, 0.125, num_splits=1)
    ctx[1] = 16                                              # the hole past the context: fine
    assert not K.paged_decode_triton(q, pool.layer, pool.tables, slots, ctx, 40, 0.125).isnan().any()
    monkeypatch.setenv("TRAIL_KV_DEBUG", "0")                # unchecked: reads block 0, no error
    ctx[1] = 40
    K.paged_decode_triton(q, pool.layer, pool.tables, slots, ctx, 40, 0.125, num_splits=1)


# ---------------------------------------------------------------------------------------------
# GPU: long contexts, graphs, big pools
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hd,heads,kvh", [(64, 9, 3), (128, 32, 8), (128, 8, 8), (64, 8, 1), (128, 14, 2)],
                         ids=["smollm2", "llama8b", "g1", "g8", "g7"])
def test_gpu_decode_long_contexts(monkeypatch, hd, heads, kvh, dtype):
    gen = torch.Generator().manual_seed(hd * 100 + heads)
    poisoned_partials(monkeypatch)
    contexts = [1, 15, 17, 300, 1023, 2049, 4097, 8191, 8192, 777]
    pool, slots, ctx, q = decode_case(gen, heads, kvh, hd, dtype, contexts, "cuda")
    check_decode(pool, slots, ctx, q, splits=(1, 5, 32, None), dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hd,heads,kvh", [(64, 9, 3), (128, 32, 8), (128, 16, 2)], ids=["smollm2", "llama8b", "g8"])
def test_gpu_prefill_long_prefix(hd, heads, kvh, dtype):
    gen = torch.Generator().manual_seed(hd + heads)
    segs = [(0, 1000), (4000, 333), (8000, 191), (517, 1), (0, 17), (2047, 129)]
    pool, slots, cu, ctx, q = prefill_case(gen, heads, kvh, hd, dtype, segs, "cuda")
    check_prefill(pool, slots, cu, ctx, q, dtype)


@pytest.mark.gpu
def test_gpu_decode_in_cuda_graph_no_sync():
    """write_kv + paged_decode captured once at static maxima; replays with other contexts, slots
    and queries equal the reference, and no launch synchronises with the host."""
    gen = torch.Generator().manual_seed(3)
    heads, kvh, hd, dtype, rows, max_blocks = 32, 8, 128, torch.bfloat16, 8, 64
    pool = Pool(gen, rows, max_blocks, kvh, hd, dtype, "cuda")
    for s in range(rows):
        pool.fill(gen, s, max_blocks * BS)
    q = torch.randn(rows, heads, hd, generator=gen).to(dtype).cuda()
    k_new = torch.randn(rows, kvh, hd, generator=gen).to(dtype).cuda()
    v_new = torch.randn_like(k_new)
    slots = torch.arange(rows, dtype=torch.int32, device="cuda")
    ctx = torch.ones(rows, dtype=torch.int32, device="cuda")
    slot_mapping = torch.zeros(rows, dtype=torch.int64, device="cuda")
    out = torch.empty_like(q)
    bound = max_blocks * BS

    def step():
        write_kv(pool.layer, k_new, v_new, slot_mapping)
        out.copy_(paged_decode(q, pool.layer, pool.tables, slots, ctx, bound, hd ** -0.5))

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for trial in range(3):
        c = torch.randint(1, bound + 1, (rows,), generator=gen, dtype=torch.int32)
        c[trial] = 1
        perm = torch.randperm(rows, generator=gen).to(torch.int32)
        ctx.copy_(c)
        slots.copy_(perm)
        q.copy_(torch.randn(rows, heads, hd, generator=gen).to(dtype))
        k_new.copy_(torch.randn(rows, kvh, hd, generator=gen).to(dtype))
        pos = (c - 1).long().cuda()
        slot_mapping.copy_(pool.tables[perm.long().cuda(), pos // BS].long() * BS + pos % BS)
        graph.replay()
        torch.cuda.synchronize()
        want = paged_decode_reference(q, pool.layer, pool.tables, slots, ctx, bound, hd ** -0.5)
        vmax = float(torch.stack([pool.v[s].float().abs().max() for s in range(rows)]).max().clamp_min(
            float(v_new.float().abs().max())))
        assert_close_ulps(out, want, dtype=dtype, ulps=2, scale=vmax)


@pytest.mark.gpu
def test_gpu_pool_past_2_31_elements():
    """Blocks at the far end of a > 2^31-element pool (int64 index arithmetic)."""
    kvh, hd, heads, dtype = 8, 128, 32, torch.bfloat16
    per_block = 2 * kvh * BS * hd
    num_blocks = (1 << 31) // per_block + 64
    if torch.cuda.mem_get_info()[0] < num_blocks * per_block * 2 + (1 << 30):
        pytest.skip("needs > 5 GiB free GPU memory")
    gen = torch.Generator().manual_seed(11)
    pool_t = torch.empty((num_blocks, 1, 2, kvh, BS, hd), dtype=dtype, device="cuda")
    layer = pool_t[:, 0]
    n = 40 * BS + 3
    tables = torch.arange(num_blocks - 41, num_blocks, dtype=torch.int32, device="cuda").view(1, 41).flip(1).contiguous()
    k = torch.randn(n, kvh, hd, generator=gen).to(dtype).cuda()
    v = torch.randn(n, kvh, hd, generator=gen).to(dtype).cuda()
    pos = torch.arange(n, device="cuda")
    write_kv(layer, k, v, tables[0, pos // BS].long() * BS + pos % BS)
    blocks = tables[0].long()[pos // BS]
    assert torch.equal(layer[blocks, 0, :, pos % BS], k) and torch.equal(layer[blocks, 1, :, pos % BS], v)
    q = torch.randn(1, heads, hd, generator=gen).to(dtype).cuda()
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    ctx = torch.tensor([n], dtype=torch.int32, device="cuda")
    want = dense(q, k, v, n - 1, hd ** -0.5)
    vmax = float(v.float().abs().max())
    for ns in (1, 4):
        out = K.paged_decode_triton(q, layer, tables, slots, ctx, n, hd ** -0.5, num_splits=ns)
        assert_close_ulps(out, want, dtype=dtype, ulps=2, scale=vmax)
    cu = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    out = paged_attention(q, layer, tables, slots, cu, ctx, 1, n, hd ** -0.5)
    assert_close_ulps(out, want, dtype=dtype, ulps=2, scale=vmax)


@pytest.mark.gpu
def test_gpu_debug_assert():
    """TRAIL_KV_DEBUG=1: an unmapped block inside a context kills the process with a device
    assertion (in a subprocess: it poisons the CUDA context)."""
    code = r"""
import torch
from trail_kernels.paged_attention import paged_decode
layer = torch.randn(8, 1, 2, 2, 16, 64, device="cuda")[:, 0]
tables = torch.arange(8, dtype=torch.int32, device="cuda").view(2, 4).contiguous()
tables[1, 2] = -1
q = torch.randn(2, 4, 64, device="cuda")
out = paged_decode(q, layer, tables, torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                   torch.tensor([64, 40], dtype=torch.int32, device="cuda"), 64, 0.125)
torch.cuda.synchronize()
print("NO ASSERT")
"""
    env = dict(os.environ, TRAIL_KV_DEBUG="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode != 0 and "NO ASSERT" not in r.stdout, r.stdout + r.stderr
    assert "unmapped KV block" in r.stderr or "device-side assert" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Compiling for the H100 without one (Triton lowers to PTX and runs ptxas on the CPU): catches
# GPU-only compiler failures that the interpreter never sees (globals, layouts, dot shapes, smem).
# ---------------------------------------------------------------------------------------------
_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import trail_kernels.paged_attention_triton as K

target = GPUTarget("cuda", 90, 32)
n = 0

def build(fn, types, const, **opts):
    global n
    names = fn.arg_names
    sig = {a: types.get(a, "i32") for a in names}
    for c in const:
        sig[c] = "constexpr"
    src = ASTSource(fn, sig, constexprs={(names.index(c),): v for c, v in const.items()})
    kernel = triton.compile(src, target=target, options=opts)
    assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
    n += 1
    return kernel

for dt, d, group, split, debug in [("bf16", 128, 4, True, False), ("bf16", 64, 3, False, True),
                                   ("fp32", 128, 8, True, False)]:
    cfg = K.decode_config(d, dict(bf16=K.torch.bfloat16, fp32=K.torch.float32)[dt])
    types = dict(q_ptr="*" + dt, kv_ptr="*" + dt, bt_ptr="*i32", slot_ptr="*i32", ctx_ptr="*i32",
                 out_ptr="*" + dt, part_o_ptr="*fp32", part_ml_ptr="*fp32", qk_scale="fp32")
    const = dict(H=group * 2, GROUP=group, GP=16, D=d, DP=d, BS=16, BLOCK_N=cfg["BLOCK_N"], SPLIT=split,
                 IEEE=dt == "fp32", DEBUG=debug, INTERP=False)
    k = build(K._decode_kernel, types, const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
              debug=debug)
    if debug:
        assert "__assertfail" in k.asm["ptx"]
build(K._decode_reduce_kernel, dict(part_o_ptr="*fp32", part_ml_ptr="*fp32", out_ptr="*bf16"),
      dict(H=32, D=128, DP=128, SP=32), num_warps=4)
for dt, d in [("bf16", 128), ("bf16", 64), ("fp32", 64)]:
    cfg = K.prefill_config(d, dict(bf16=K.torch.bfloat16, fp32=K.torch.float32)[dt])
    types = dict(q_ptr="*" + dt, kv_ptr="*" + dt, bt_ptr="*i32", slot_ptr="*i32", cu_ptr="*i32", ctx_ptr="*i32",
                 out_ptr="*" + dt, qk_scale="fp32")
    const = dict(GROUP=4, D=d, DP=d, BS=16, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], IEEE=dt == "fp32",
                 DEBUG=False, INTERP=False)
    build(K._prefill_kernel, types, const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
build(K._write_kv_kernel, dict(k_ptr="*fp32", v_ptr="*fp32", slot_ptr="*i64", kv_ptr="*bf16"),
      dict(KVH=8, D=128, HP=8, DP=128, BS=16), num_warps=4)
print("compiled", n)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")
def test_kernels_compile_for_sm90_without_a_gpu():
    assert "compiled 8" in compile_for_sm90(_SM90_COMPILE, timeout=300)
