"""The probe step as Triton kernels, for CUDA tensors: `probe_triton` launches them (what probe_step
calls on the GPU), `pick_config` picks their tiles. Same function as trail_kernels/probe_reference.py.

Two kernels: `_probe_pool_kernel` (prefill chunks only; skipped when the step has none) and
`_probe_fused_kernel` (MLP + filter + readout). A decode-only step (`has_prefill=False`) is ONE
launch. The fused kernel splits the hidden units over programs; partial logits go to a workspace
in `ProbeState` and the last program of a row tile (an atomic arrival counter, which it resets)
sums them in a fixed order, so results are deterministic and the workspace needs no clearing.
"""
from __future__ import annotations

import math

import torch

from trail_kernels.dispatch import interpreter_on, triton_available
from trail_kernels.probe_params import POW_BITS, padded_num_bins
from trail_kernels.probe_state import MAX_BLOCK_M, MIN_BLOCK_H, MIN_BLOCK_M

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_pool_kernel(states_ptr, state_stride, cu_ptr, slot_ptr, flags_ptr, pool_sum_ptr,
                           pool_cnt_ptr, num_slots, d,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        seg = tl.program_id(0)
        dblk = tl.program_id(1)
        fl = tl.load(flags_ptr + seg)
        slot = tl.load(slot_ptr + seg)
        pooled = ((fl & 1) != 0) & ((fl & 8) == 0) & (slot >= 0) & (slot < num_slots)
        if pooled:
            start = tl.load(cu_ptr + seg)
            end = tl.load(cu_ptr + seg + 1)
            cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
            cmask = cols < d
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            t0 = start
            while t0 < end:  # a while loop: the interpreter cannot range() over loaded scalars
                toks = t0 + tl.arange(0, BLOCK_T)
                x = tl.load(states_ptr + toks.to(tl.int64)[:, None] * state_stride + cols[None, :],
                            mask=(toks < end)[:, None] & cmask[None, :], other=0.0)
                acc += tl.sum(x.to(tl.float32), axis=0)
                t0 += BLOCK_T
            first = (fl & 2) != 0
            row = pool_sum_ptr + slot.to(tl.int64) * d + cols
            old = tl.load(row, mask=cmask, other=0.0)
            tl.store(row, tl.where(first, 0.0, old) + acc, mask=cmask)
            if dblk == 0:
                old_cnt = tl.load(pool_cnt_ptr + slot)
                old_cnt = tl.where(first, 0, old_cnt)
                tl.store(pool_cnt_ptr + slot, old_cnt + (end - start))

    @triton.jit
    def _row_meta(rows, n_rows, slot_ptr, flags_ptr, num_slots):
        """Per-row slot (int64, 0 where invalid) and the masks: active, prompt-init, decode."""
        rmask = rows < n_rows
        slot = tl.load(slot_ptr + rows, mask=rmask, other=-1)
        in_range = (slot >= 0) & (slot < num_slots)
        fl = tl.load(flags_ptr + rows, mask=rmask, other=0)
        is_pf = (fl & 1) != 0
        active = rmask & in_range & ((fl & 8) == 0) & ((~is_pf) | ((fl & 4) != 0))
        return tl.where(in_range, slot, 0).to(tl.int64), active, active & is_pf, active & (~is_pf)

    @triton.jit
    def _log_normalise(lp):
        z = lp - tl.max(lp, axis=1)[:, None]
        return z - tl.log(tl.sum(tl.exp(z), axis=1))[:, None]

    @triton.jit
    def _filter_rows(rows, n_rows, slot_ptr, flags_ptr, gen_ptr, max_new_ptr, b2_ptr, lpows_ptr,
                     values_ptr, logpi_ptr, log_post_ptr, post_gen_ptr, upd_gen_ptr, out_ptr,
                     partial_ptr, partial_stride, num_slots, alpha, log_floor, eps_log1p, update_every,
                     NH: tl.constexpr, FILTER_M: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     FLOOR: tl.constexpr, POWS: tl.constexpr):
        """Sum the partial logits of `rows`, then predict / update / floor / read out, in log space."""
        slot, active, is_init, is_dec = _row_meta(rows, n_rows, slot_ptr, flags_ptr, num_slots)
        rmask = rows < n_rows
        ks = tl.arange(0, KP)
        kmask = ks < K
        logits = tl.zeros([FILTER_M, KP], dtype=tl.float32)
        for j in range(0, NH):
            logits += tl.load(partial_ptr + j * partial_stride + rows[:, None] * KP + ks[None, :],
                              mask=rmask[:, None], other=0.0, cache_modifier=".cg")
        logits += tl.load(b2_ptr + ks, mask=kmask, other=0.0)[None, :]
        logq = _log_normalise(tl.where(kmask[None, :], logits, float("-inf")))

        # predict s steps: lp <- log (T^s p), s in binary over log (T^(2^j)) tables (logsumexp)
        gen = tl.load(gen_ptr + rows, mask=rmask, other=0)
        lp = tl.load(log_post_ptr + slot[:, None] * K + ks[None, :], mask=active[:, None] & kmask[None, :],
                     other=0.0)
        lp = tl.where(kmask[None, :], lp, float("-inf"))
        post_gen = tl.load(post_gen_ptr + slot, mask=active, other=0)
        steps = tl.where(is_dec, tl.minimum(tl.maximum(gen - post_gen, 0), (1 << POWS) - 1), 0)
        most = tl.max(steps, axis=0)
        j = 0
        while (most >> j) > 0:    # a while loop: unrolled ifs over 3-D tiles break Triton's layout pass
            la = tl.load(lpows_ptr + j * KP * KP + ks[:, None] * KP + ks[None, :])
            t = lp[:, :, None] + la[None, :, :]
            tm = tl.max(t, axis=1)
            tm = tl.where(tm == float("-inf"), 0.0, tm)
            moved = tl.log(tl.sum(tl.exp(t - tm[:, None, :]), axis=1)) + tm
            lp = tl.where((((steps >> j) & 1) != 0)[:, None], moved, lp)
            j += 1

        # update with the probe's evidence, renormalise, floor
        # evidence from a non-finite state (NaN / inf in the layer output) is no evidence
        bad_q = ((logq != logq) | (logq == float("inf"))) & kmask[None, :]
        q_ok = tl.sum(bad_q.to(tl.int32), axis=1) == 0
        upd_gen = tl.load(upd_gen_ptr + slot, mask=active, other=0)
        do_upd = is_dec & q_ok & ((gen - upd_gen) >= update_every)
        logpi = tl.load(logpi_ptr + ks, mask=kmask, other=0.0)
        lp = tl.where(do_upd[:, None], lp + alpha * (logq - logpi[None, :]), lp)
        init_lp = tl.where(q_ok[:, None], logq, tl.where(kmask[None, :], logpi[None, :], float("-inf")))
        lp = _log_normalise(tl.where(is_init[:, None], init_lp, lp))
        if FLOOR:
            mf = tl.maximum(lp, log_floor)
            floored = mf + tl.log(tl.exp(lp - mf) + tl.exp(log_floor - mf)) - eps_log1p
            floored = tl.where(kmask[None, :], floored, float("-inf"))
            lp = _log_normalise(tl.where((do_upd | is_init)[:, None], floored, lp))

        # readout and the slot's new state
        max_new = tl.load(max_new_ptr + rows, mask=rmask, other=0)
        cap = tl.maximum(max_new - gen, 0).to(tl.float32)
        vals = tl.load(values_ptr + ks, mask=kmask, other=0.0)
        expected = tl.sum(tl.exp(lp) * tl.minimum(vals[None, :], cap[:, None]), axis=1)
        tl.store(log_post_ptr + slot[:, None] * K + ks[None, :], lp, mask=active[:, None] & kmask[None, :])
        tl.store(post_gen_ptr + slot, gen, mask=active)
        tl.store(upd_gen_ptr + slot, gen, mask=do_upd | is_init)
        tl.store(out_ptr + slot, expected, mask=active)

    @triton.jit
    def _probe_fused_kernel(
            states_ptr, state_stride, cu_ptr, slot_ptr, flags_ptr, gen_ptr, max_new_ptr,
            w1_ptr, b1_ptr, w2_ptr, b2_ptr, lpows_ptr, values_ptr, logpi_ptr,
            log_post_ptr, pool_sum_ptr, pool_cnt_ptr, post_gen_ptr, upd_gen_ptr, out_ptr,
            partial_ptr, counter_ptr,
            n_rows, num_slots, partial_stride, alpha, log_floor, eps_log1p, update_every,
            d: tl.constexpr, h: tl.constexpr, K: tl.constexpr, FLOOR: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FILTER_M: tl.constexpr,
            KP: tl.constexpr, DOT_MODE: tl.constexpr, HAS_PREFILL: tl.constexpr, POWS: tl.constexpr):
        tile = tl.program_id(0)
        hblk = tl.program_id(1)
        NH: tl.constexpr = (h + BLOCK_H - 1) // BLOCK_H
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        slot, active, is_init, is_dec = _row_meta(rows, n_rows, slot_ptr, flags_ptr, num_slots)
        tok = (tl.load(cu_ptr + rows + 1, mask=rmask, other=1) - 1).to(tl.int64)

        # hidden[:, hblk] = relu(x @ W1[hblk]^T + b1), x = newest state (decode) or prompt mean
        hs = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = hs < h
        if HAS_PREFILL:
            cnt = tl.load(pool_cnt_ptr + slot, mask=is_init, other=1)
            inv_cnt = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            x = tl.load(states_ptr + tok[:, None] * state_stride + cols[None, :],
                        mask=is_dec[:, None] & cmask[None, :], other=0.0)
            w = tl.load(w1_ptr + hs.to(tl.int64)[:, None] * d + cols[None, :],
                        mask=hmask[:, None] & cmask[None, :], other=0.0)
            if DOT_MODE == 1:      # states and weights in one 16-bit type, decode rows only
                acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
            else:
                xf = x.to(tl.float32)
                if HAS_PREFILL:
                    xp = tl.load(pool_sum_ptr + slot[:, None] * d + cols[None, :],
                                 mask=is_init[:, None] & cmask[None, :], other=0.0)
                    xf += xp * inv_cnt[:, None]
                if DOT_MODE == 2:  # fp32 rows into 16-bit dots: x = hi + mid + lo, ~fp32 precision
                    hi = xf.to(w.dtype)
                    rest = xf - hi.to(tl.float32)
                    mid = rest.to(w.dtype)
                    lo = (rest - mid.to(tl.float32)).to(w.dtype)
                    acc = tl.dot(hi, tl.trans(w), acc)
                    acc = tl.dot(mid, tl.trans(w), acc)
                    acc = tl.dot(lo, tl.trans(w), acc)
                else:
                    acc = tl.dot(xf, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        b1 = tl.load(b1_ptr + hs, mask=hmask, other=0.0)
        hidden = tl.maximum(acc + b1[None, :], 0.0)
        ks = tl.arange(0, KP)
        w2 = tl.load(w2_ptr + ks[:, None] * h + hs[None, :], mask=(ks < K)[:, None] & hmask[None, :],
                     other=0.0).to(tl.float32)
        part = tl.dot(hidden, tl.trans(w2), input_precision="ieee")
        tl.store(partial_ptr + hblk * partial_stride + rows[:, None] * KP + ks[None, :], part,
                 mask=rmask[:, None])

        # The last program of this row tile to arrive sums the partial logits (fixed order) and
        # runs the filter, FILTER_M rows at a time; it resets the counter for the next launch.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1)
        if arrived == NH - 1:
            tl.debug_barrier()
            tl.store(counter_ptr + tile, 0)
            for r0 in range(0, BLOCK_M, FILTER_M):
                sub = tile * BLOCK_M + r0 + tl.arange(0, FILTER_M)
                _filter_rows(sub, n_rows, slot_ptr, flags_ptr, gen_ptr, max_new_ptr, b2_ptr, lpows_ptr,
                             values_ptr, logpi_ptr, log_post_ptr, post_gen_ptr, upd_gen_ptr, out_ptr,
                             partial_ptr, partial_stride, num_slots, alpha, log_floor, eps_log1p,
                             update_every, NH=NH, FILTER_M=FILTER_M, K=K, KP=KP, FLOOR=FLOOR, POWS=POWS)


def pick_config(n_rows: int, d: int, h: int, fp32_operands: bool = False) -> dict:
    """Tile sizes for the fused kernel (a heuristic; bench/suite/kernels_probe.py sweeps others).
    fp32 operands (fp32 weights or states) take twice the shared memory per tile: BLOCK_D halves."""
    if interpreter_on():
        return dict(BLOCK_M=16, BLOCK_H=min(32, max(16, 1 << (h - 1).bit_length())),
                    BLOCK_D=min(64, max(16, 1 << (d - 1).bit_length())), num_warps=4, num_stages=1)
    if n_rows <= 16:
        bm, bh = 16, 16
    elif n_rows <= 64:
        bm, bh = 32, 32
    elif n_rows <= 256:
        bm, bh = 64, 32
    else:
        bm, bh = 64, 64
    return dict(BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=64 if fp32_operands else 128, num_warps=4, num_stages=3)


def probe_triton(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state,
                 has_prefill, config):
    n, d = slot_ids.numel(), states.shape[1]
    if n == 0:
        return state.expected_remaining
    h, k = params.probe_hidden, params.num_bins
    w1 = params.fc1_weight
    low_precision = w1.dtype in (torch.bfloat16, torch.float16) and states.dtype == w1.dtype
    cfg = dict(pick_config(n, d, h, fp32_operands=not low_precision))
    cfg.update(config or {})
    bm, bh = cfg["BLOCK_M"], cfg["BLOCK_H"]
    if bm % MIN_BLOCK_M or bm > MAX_BLOCK_M or bh < MIN_BLOCK_H:
        raise ValueError(f"probe: BLOCK_M must be a multiple of {MIN_BLOCK_M} up to {MAX_BLOCK_M} and "
                         f"BLOCK_H >= {MIN_BLOCK_H}, got {cfg}")
    if has_prefill:
        block_d_pool = 128 if not interpreter_on() else 64
        _probe_pool_kernel[(n, triton.cdiv(d, block_d_pool))](
            states, states.stride(0), cu_seqlens, slot_ids, flags, state.pool_sum, state.pool_count,
            state.num_slots, d, BLOCK_T=16, BLOCK_D=block_d_pool, num_warps=4)
    dot_mode = 0 if interpreter_on() or not low_precision else (2 if has_prefill else 1)
    kp = padded_num_bins(k)
    eps = params.eps
    _probe_fused_kernel[(triton.cdiv(n, bm), triton.cdiv(h, bh))](
        states, states.stride(0), cu_seqlens, slot_ids, flags, num_generated, max_new_tokens,
        w1, params.fc1_bias, params.fc2_weight, params.fc2_bias, params.log_transition_pows,
        params.values, params.log_prior_used,
        state.log_post, state.pool_sum, state.pool_count, state.post_gen, state.upd_gen,
        state.expected_remaining, state.partials, state.tile_counters,
        n, state.num_slots, state.partials.stride(0), params.alpha_used,
        math.log(eps / k) if eps > 0 else 0.0, math.log1p(eps), params.update_every,
        d=d, h=h, K=k, FLOOR=eps > 0, BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=cfg["BLOCK_D"], FILTER_M=MIN_BLOCK_M, KP=kp,
        DOT_MODE=dot_mode,
        HAS_PREFILL=bool(has_prefill), POWS=POW_BITS,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return state.expected_remaining
