"""Triton kernels for attention over the paged KV cache and the KV write (the functions are defined
by the references in `trail_kernels/paged_attention.py`, which dispatches here on CUDA tensors).

Role in the data flow: every decoder layer of a step first writes its new K/V rows into their cache
blocks (`write_kv_triton`, one program per token, `slot_mapping[t] < 0` skips), then attends over
the cache through the block tables: `paged_decode_triton` (one query per segment) or
`paged_attention_triton` (varlen segments of new tokens over a cached prefix: chunked prefill,
recompute).

Decode (flash-decoding): one program per (segment, KV head, split) holds the whole GQA group of
query heads as the rows of one dot (padded to 16), streams its share of the context in tiles of
BLOCK_N positions with an online softmax, and writes either the output (one split) or a partial
(unnormalised accumulator, running max, running sum) that a second kernel reduces. Each segment's
context is cut into `num_splits` equal parts *on the device* (from `context_lens`), so the grid is
(segments, kv_heads, num_splits), chosen on the host from shapes and the host bound
`max_context_len` only; the partial workspace is allocated by shape.

Prefill: one program per (query tile of BLOCK_M rows of one segment, query head). The tiles of a
segment start at tile index `cu_seqlens_q[i] // BLOCK_M + i`, which never overlaps the next
segment's, so the grid is (T // BLOCK_M + S, heads) - static in the number of rows - and each
program finds its segment by a binary search over `cu_seqlens_q`. Keys run from 0 to the tile's
last query position (causal), all read from the cache (the new rows were written first).

CUDA graphs: no host reads, no data-dependent allocation, loop bounds from `context_lens` and
`cu_seqlens_q` on the device. Pool index arithmetic is int64. `TRAIL_KV_DEBUG=1` compiles a
device assertion that every block-table entry inside a context is mapped (>= 0); otherwise an
unmapped entry reads block 0, as the reference does.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from trail_kernels.dispatch import interpreter_on

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 128      # a split streams at least this many positions (GPU heuristic)


def kv_debug() -> bool:
    return os.environ.get("TRAIL_KV_DEBUG", "0") not in ("", "0")


@triton.jit
def _block_rows(bt_row_ptr, offs, nmask, kv_s0, kv_s2, kv_s3, kvh, BS: tl.constexpr, MASKED: tl.constexpr,
                DEBUG: tl.constexpr):
    """int64 element offsets of cache positions `offs` of one slot and KV head (K half)."""
    if MASKED:
        blk = tl.load(bt_row_ptr + offs // BS, mask=nmask, other=0)
        if DEBUG:
            tl.device_assert((blk >= 0) | (nmask == 0), "trail: unmapped KV block (-1) inside a context")
    else:
        blk = tl.load(bt_row_ptr + offs // BS)
        if DEBUG:
            tl.device_assert(blk >= 0, "trail: unmapped KV block (-1) inside a context")
    blk = tl.maximum(blk, 0).to(tl.int64)
    return blk * kv_s0 + kvh * kv_s2 + (offs % BS).to(tl.int64) * kv_s3


# MASK modes of a tile: every position valid / positions >= end masked / also causal per row
FULL = tl.constexpr(0)
BOUND = tl.constexpr(1)
CAUSAL = tl.constexpr(2)


@triton.jit
def _attend_tile(q, m, l, acc, kv_ptr, bt_row, n0, end, qpos, ds, dmask, kv_s0, kv_s1, kv_s2, kv_s3, kvh,
                 qk_scale, BS: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DP_EQ_D: tl.constexpr,
                 IEEE: tl.constexpr, DEBUG: tl.constexpr):
    """One tile of BLOCK_N cache positions [n0, n0 + BLOCK_N) folded into the online softmax
    (m, l in log2 units; acc unnormalised). MASK: FULL (all positions < end), BOUND (positions
    >= end masked) or CAUSAL (also positions past each row's own `qpos`)."""
    offs = n0 + tl.arange(0, BLOCK_N)
    nmask = offs < end
    rows = _block_rows(bt_row, offs, nmask, kv_s0, kv_s2, kv_s3, kvh, BS=BS, MASKED=MASK != FULL, DEBUG=DEBUG)
    ptrs = kv_ptr + rows[:, None] + ds[None, :]
    if MASK == FULL:
        if DP_EQ_D:
            k = tl.load(ptrs)
            v = tl.load(ptrs + kv_s1)
        else:
            k = tl.load(ptrs, mask=dmask[None, :], other=0.0)
            v = tl.load(ptrs + kv_s1, mask=dmask[None, :], other=0.0)
    else:
        lmask = nmask[:, None] & dmask[None, :]
        k = tl.load(ptrs, mask=lmask, other=0.0)
        v = tl.load(ptrs + kv_s1, mask=lmask, other=0.0)
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if IEEE:    # fp32 cache, or the interpreter (whose 16-bit dots are wrong): exact fp32 products
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASK == CAUSAL:
        s = tl.where((offs[None, :] <= qpos[:, None]) & nmask[None, :], s * qk_scale, float("-inf"))
    elif MASK == BOUND:
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
    else:
        s = s * qk_scale
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if IEEE:    # p rounded to the cache's type as on the tensor-core path
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32),
                                            input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _attend_range(q, m, l, acc, kv_ptr, bt_row, start, end, qpos, ds, dmask, kv_s0, kv_s1, kv_s2, kv_s3,
                  kvh, qk_scale, BS: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  DP_EQ_D: tl.constexpr, IEEE: tl.constexpr, DEBUG: tl.constexpr, INTERP: tl.constexpr):
    """Cache positions [start, end) of one slot and KV head. A `for` over device bounds on the GPU
    (software-pipelined); a `while` under the interpreter, whose scalars cannot be range bounds."""
    if INTERP:
        n0 = start
        while n0 < end:
            m, l, acc = _attend_tile(q, m, l, acc, kv_ptr, bt_row, n0, end, qpos, ds, dmask, kv_s0, kv_s1,
                                     kv_s2, kv_s3, kvh, qk_scale, BS=BS, BLOCK_N=BLOCK_N, MASK=MASK,
                                     DP_EQ_D=DP_EQ_D, IEEE=IEEE, DEBUG=DEBUG)
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m, l, acc = _attend_tile(q, m, l, acc, kv_ptr, bt_row, n0, end, qpos, ds, dmask, kv_s0, kv_s1,
                                     kv_s2, kv_s3, kvh, qk_scale, BS=BS, BLOCK_N=BLOCK_N, MASK=MASK,
                                     DP_EQ_D=DP_EQ_D, IEEE=IEEE, DEBUG=DEBUG)
    return m, l, acc


# ---------------------------------------------------------------------------------------------
# KV write
# ---------------------------------------------------------------------------------------------
@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, slot_ptr, kv_ptr, k_s0, k_s1, v_s0, v_s1, kv_s0, kv_s1, kv_s2, kv_s3,
                     KVH: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                     BS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        hs = tl.arange(0, HP)
        ds = tl.arange(0, DP)
        mask = (hs < KVH)[:, None] & (ds < D)[None, :]
        k = tl.load(k_ptr + t * k_s0 + hs[:, None] * k_s1 + ds[None, :], mask=mask)
        v = tl.load(v_ptr + t * v_s0 + hs[:, None] * v_s1 + ds[None, :], mask=mask)
        dst = kv_ptr + (slot // BS) * kv_s0 + hs[:, None].to(tl.int64) * kv_s2 + (slot % BS) * kv_s3 + ds[None, :]
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + kv_s1, v.to(kv_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_pool_view(kv_layer: torch.Tensor):
    if kv_layer.stride(-1) != 1:
        raise ValueError("kv_layer: the head_dim axis must be contiguous (a view of the pool, never a copy)")


def write_kv_triton(kv_layer, k, v, slot_mapping) -> None:
    _check_pool_view(kv_layer)
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    n, kvh, d = k.shape
    _write_kv_kernel[(n,)](
        k, v, slot_mapping, kv_layer, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        KVH=kvh, D=d, HP=triton.next_power_of_2(kvh), DP=triton.next_power_of_2(d),
        BS=kv_layer.shape[3], num_warps=4 if kvh * d >= 1024 else 1)


# ---------------------------------------------------------------------------------------------
# Decode (split-K over the context) + reduce
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(q_ptr, kv_ptr, bt_ptr, slot_ptr, ctx_ptr, out_ptr, part_o_ptr, part_ml_ptr,
                   q_s0, q_s1, kv_s0, kv_s1, kv_s2, kv_s3, bt_s0, o_s0, o_s1, qk_scale, num_splits,
                   H: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   DP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   IEEE: tl.constexpr, DEBUG: tl.constexpr, INTERP: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    bt_row = bt_ptr + slot * bt_s0

    gs = tl.arange(0, GP)
    gmask = gs < GROUP
    heads = kvh * GROUP + gs
    ds = tl.arange(0, DP)
    dmask = ds < D
    q = tl.load(q_ptr + seq.to(tl.int64) * q_s0 + heads[:, None] * q_s1 + ds[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    if SPLIT:
        per = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        start = split * per
        end = tl.minimum(start + per, ctx)
    else:
        start = 0
        end = ctx

    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    m, l, acc = _attend_range(q, m, l, acc, kv_ptr, bt_row, start, end, gs, ds, dmask, kv_s0, kv_s1, kv_s2,
                              kv_s3, kvh, qk_scale, BS=BS, BLOCK_N=BLOCK_N, MASK=BOUND, DP_EQ_D=DP == D,
                              IEEE=IEEE, DEBUG=DEBUG, INTERP=INTERP)

    if SPLIT:
        row = (seq * H + heads).to(tl.int64) * num_splits + split          # [GP]
        tl.store(part_o_ptr + row[:, None] * DP + ds[None, :], acc, mask=gmask[:, None])
        tl.store(part_ml_ptr + row * 2, m, mask=gmask)
        tl.store(part_ml_ptr + row * 2 + 1, l, mask=gmask)
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * o_s0 + heads[:, None] * o_s1 + ds[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_ml_ptr, out_ptr, o_s0, o_s1, num_splits,
                          H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SP)
    smask = sp < num_splits
    row = (seq * H + h).to(tl.int64) * num_splits + sp
    m = tl.load(part_ml_ptr + row * 2, mask=smask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=smask, other=0.0)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)     # an empty context: every l is 0
    w = tl.where(l > 0, tl.exp2(m - m_all), 0.0)
    total = tl.sum(w * l, axis=0)
    ds = tl.arange(0, DP)
    acc = tl.load(part_o_ptr + row[:, None] * DP + ds[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * o_s0 + h * o_s1 + ds, out.to(out_ptr.dtype.element_ty),
             mask=ds < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(num_segments: int, kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """How many parts each segment's context is cut into: enough programs for ~2 waves of the
    SMs, each part at least MIN_SPLIT_TOKENS long at the bound `max_context_len`. Depends only on
    host numbers, so a CUDA graph captured at a static bound keeps its grid."""
    if device.type != "cuda":
        return 1
    want = -(-2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
             // max(1, num_segments * kv_heads))
    cap = -(-max(1, max_context_len) // MIN_SPLIT_TOKENS)
    n = max(1, min(want, cap, MAX_SPLITS))
    return 1 << (n.bit_length() - 1)          # a power of two (33 splits ran 2.8x slower than 32)


def decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    if interpreter_on():
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64 if head_dim > 64 else 128, num_warps=4, num_stages=3)


def alloc_partials(num_segments: int, heads: int, num_splits: int, head_dim_pad: int, device):
    """Split-K workspace, by shape only: accumulators [S, H, splits, DP] and (max, sum) pairs
    [S, H, splits, 2], fp32. Every program writes its entries (empty parts included)."""
    return (torch.empty((num_segments, heads, num_splits, head_dim_pad), dtype=torch.float32, device=device),
            torch.empty((num_segments, heads, num_splits, 2), dtype=torch.float32, device=device))


def paged_decode_triton(q, kv_layer, block_tables, slot_ids, context_lens, max_context_len: int,
                        scale: float, num_splits: int | None = None, config: dict | None = None,
                        out: torch.Tensor | None = None):
    """`num_splits` (default: `decode_splits`), `config` (tile sizes) and `out` (a preallocated
    output, e.g. a CUDA-graph buffer) are for tests and benchmarks; the dispatcher passes none."""
    _check_pool_view(kv_layer)
    q = _last_dim_contiguous(q)
    n, heads, d = q.shape
    kvh = kv_layer.shape[2]
    group = heads // kvh
    if num_splits is None:
        num_splits = decode_splits(n, kvh, max_context_len, q.device)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    cfg = dict(decode_config(d, q.dtype))
    cfg.update(config or {})
    dp = triton.next_power_of_2(d)
    out = torch.empty_like(q) if out is None else out
    split = num_splits > 1
    if split:
        part_o, part_ml = alloc_partials(n, heads, num_splits, dp, q.device)
    else:
        part_o = part_ml = out
    debug = kv_debug()
    extra = dict(debug=True) if debug else {}
    _decode_kernel[(n, kvh, num_splits)](
        q, kv_layer, block_tables, slot_ids, context_lens, out, part_o, part_ml,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
        kv_layer.stride(3), block_tables.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E, num_splits,
        H=heads, GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=d, DP=dp,
        BS=kv_layer.shape[3], BLOCK_N=cfg["BLOCK_N"], SPLIT=split, IEEE=q.dtype == torch.float32 or interpreter_on(),
        DEBUG=debug, INTERP=interpreter_on(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **extra)
    if split:
        _decode_reduce_kernel[(n, heads)](
            part_o, part_ml, out, out.stride(0), out.stride(1), num_splits,
            H=heads, D=d, DP=dp, SP=max(2, triton.next_power_of_2(num_splits)), num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# Prefill over a cached prefix (varlen, causal)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prefill_kernel(q_ptr, kv_ptr, bt_ptr, slot_ptr, cu_ptr, ctx_ptr, out_ptr,
                    q_s0, q_s1, kv_s0, kv_s1, kv_s2, kv_s3, bt_s0, o_s0, o_s1, qk_scale, num_segments,
                    GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                    DEBUG: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    # segment i owns the tiles [cu[i] // BLOCK_M + i, cu[i+1] // BLOCK_M + i + 1)
    lo = pid * 0
    hi = lo + num_segments - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_ptr + mid) // BLOCK_M + mid <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    seg = lo
    q0 = tl.load(cu_ptr + seg)
    seqlen = tl.load(cu_ptr + seg + 1) - q0
    tile = pid - (q0 // BLOCK_M + seg)
    ctx = tl.load(ctx_ptr + seg)
    slot = tl.load(slot_ptr + seg).to(tl.int64)
    bt_row = bt_ptr + slot * bt_s0

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < seqlen
    qpos = ctx - seqlen + rows
    ds = tl.arange(0, DP)
    dmask = ds < D
    tok = (q0 + rows).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * q_s0 + h * q_s1 + ds[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    # keys up to the tile's last query position (none for a tile past the segment)
    # (clamped at 0: a graph's pad row may hold more tokens than its context, and attends nothing)
    kend = tl.maximum(tl.where(tile * BLOCK_M < seqlen, ctx - seqlen + tl.minimum(tile * BLOCK_M + BLOCK_M, seqlen), 0), 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    # tiles of keys every row of the tile sees (no mask), then the diagonal tiles (causal mask)
    kfull = tl.maximum(tl.where(tile * BLOCK_M < seqlen, (ctx - seqlen + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N, 0), 0)
    m, l, acc = _attend_range(q, m, l, acc, kv_ptr, bt_row, 0, kfull, qpos, ds, dmask, kv_s0, kv_s1, kv_s2,
                              kv_s3, kvh, qk_scale, BS=BS, BLOCK_N=BLOCK_N, MASK=FULL, DP_EQ_D=DP == D,
                              IEEE=IEEE, DEBUG=DEBUG, INTERP=INTERP)
    m, l, acc = _attend_range(q, m, l, acc, kv_ptr, bt_row, kfull, kend, qpos, ds, dmask, kv_s0, kv_s1, kv_s2,
                              kv_s3, kvh, qk_scale, BS=BS, BLOCK_N=BLOCK_N, MASK=CAUSAL, DP_EQ_D=DP == D,
                              IEEE=IEEE, DEBUG=DEBUG, INTERP=INTERP)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * o_s0 + h * o_s1 + ds[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    if interpreter_on():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim > 64:   # the sweep in bench/suite/kernels_attention.py (H100, d 128)
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)


def paged_attention_triton(q, kv_layer, block_tables, slot_ids, cu_seqlens_q, context_lens,
                           max_seqlen_q: int, max_context_len: int, scale: float,
                           config: dict | None = None, out: torch.Tensor | None = None):
    """The grid is (T // BLOCK_M + S, heads): `max_seqlen_q` / `max_context_len` are not needed."""
    _check_pool_view(kv_layer)
    q = _last_dim_contiguous(q)
    t, heads, d = q.shape
    kvh = kv_layer.shape[2]
    n_seg = slot_ids.shape[0]
    cfg = dict(prefill_config(d, q.dtype))
    cfg.update(config or {})
    bm = cfg["BLOCK_M"]
    out = torch.empty_like(q) if out is None else out
    debug = kv_debug()
    extra = dict(debug=True) if debug else {}
    _prefill_kernel[(t // bm + n_seg, heads)](
        q, kv_layer, block_tables, slot_ids, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
        kv_layer.stride(3), block_tables.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E, n_seg,
        GROUP=heads // kvh, D=d, DP=triton.next_power_of_2(d), BS=kv_layer.shape[3],
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], IEEE=q.dtype == torch.float32 or interpreter_on(), DEBUG=debug,
        INTERP=interpreter_on(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    return out
