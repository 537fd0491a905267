"""The probe step in plain torch (fp32, unfused): `probe_reference`, the one definition of what the
kernels compute (trail_kernels/probe.py's docstring), run by probe_step on CPU and by the predictor
pipeline's filter (trail.predictor.filter_adapter); `log_predict` is its multi-step predict over
the transition tables. No host sync on GPU unless asked to validate.
"""
from __future__ import annotations

import math

import torch

from trail_kernels.probe_params import POW_BITS, ProbeParams
from trail_kernels.probe_state import ProbeState
from trail_kernels.probe_validation import check_step, validate_step
from trail_kernels.row_flags import FIRST_CHUNK, LAST_CHUNK, PREFILL, RECOMPUTE


def log_predict(log_p: torch.Tensor, log_pows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """log of (T^steps p) per row, in log space: rows [n, K], steps [n] (< 2^POW_BITS)."""
    k = log_p.shape[-1]
    for j in range(POW_BITS):
        moved = torch.logsumexp(log_p[:, :, None] + log_pows[j, :k, :k][None], dim=1)
        log_p = torch.where((((steps >> j) & 1) != 0)[:, None], moved, log_p)
    return log_p


def _log_normalise_rows(lp: torch.Tensor) -> torch.Tensor:
    """Rows minus their logsumexp, shifted first so that huge offsets (-1e30) do not absorb it."""
    z = lp - lp.amax(-1, keepdim=True)
    return z - torch.log(torch.exp(z).sum(-1, keepdim=True))


def probe_reference(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens,
                    params: ProbeParams, state: ProbeState, *, has_prefill: bool = True,
                    validate: bool | None = None) -> torch.Tensor:
    """The same function as the kernels, unfused, in fp32. Updates `state` in place and returns
    `state.expected_remaining`. `validate` (default: on CPU only) runs `validate_step` first."""
    check_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state)
    if validate is None:
        validate = not states.is_cuda
    if validate:
        validate_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, state)
    n = slot_ids.numel()
    if n == 0:
        return state.expected_remaining
    dev, k = states.device, params.num_bins
    slots = slot_ids.long()
    in_range = (slots >= 0) & (slots < state.num_slots)
    sl = torch.where(in_range, slots, torch.full_like(slots, state.scratch_slot))
    fl = flags.long()
    is_pf = (fl & PREFILL) != 0
    first, last, rec = (fl & FIRST_CHUNK) != 0, (fl & LAST_CHUNK) != 0, (fl & RECOMPUTE) != 0
    cu = cu_seqlens.long()

    if has_prefill:
        pool = is_pf & ~rec & in_range
        tok = torch.arange(states.shape[0], device=dev)
        seg = torch.searchsorted(cu[1:], tok, right=True)
        tok_ok = (seg < n) & (tok >= cu[0])
        seg = seg.clamp(max=n - 1)
        weight = (tok_ok & pool[seg]).float()
        chunk = torch.zeros(n, states.shape[1], device=dev).index_add_(0, seg, states.float() * weight[:, None])
        count = (cu[1:] - cu[:-1]).int()
        old_sum, old_cnt = state.pool_sum[sl], state.pool_count[sl]
        new_sum = torch.where(first[:, None], chunk, old_sum + chunk)
        new_cnt = torch.where(first, count, old_cnt + count)
        state.pool_sum[sl] = torch.where(pool[:, None], new_sum, old_sum)
        state.pool_count[sl] = torch.where(pool, new_cnt, old_cnt)

    active = in_range & ~rec & (~is_pf | last)
    is_init = active & is_pf
    is_dec = active & ~is_pf
    last_tok = (cu[1:] - 1).clamp(0, max(states.shape[0] - 1, 0))
    x = states[last_tok].float()
    if has_prefill:
        mean = state.pool_sum[sl] / state.pool_count[sl].clamp(min=1)[:, None].float()
        x = torch.where(is_init[:, None], mean, x)
    hidden = torch.relu(x @ params.fc1_weight.float().T + params.fc1_bias)
    logq = torch.log_softmax(hidden @ params.fc2_weight.float().T + params.fc2_bias, dim=-1)

    gen = num_generated.long()
    lp_old = state.log_post[sl]
    steps = torch.where(is_dec, (gen - state.post_gen[sl]).clamp(0, 2 ** POW_BITS - 1), 0)
    lp_pred = log_predict(lp_old, params.log_transition_pows, steps)
    # evidence from a non-finite state (NaN / inf in the layer output) is no evidence: a decode row
    # skips the update, a prompt step starts from the prior
    q_ok = ~(torch.isnan(logq) | torch.isposinf(logq)).any(-1)
    do_upd = is_dec & q_ok & ((gen - state.upd_gen[sl]) >= params.update_every)
    lp = torch.where(do_upd[:, None], lp_pred + params.alpha_used * (logq - params.log_prior_used), lp_pred)
    init_lp = torch.where(q_ok[:, None], logq, params.log_prior_used.expand_as(logq))
    lp = torch.where(is_init[:, None], init_lp, lp)
    lp = _log_normalise_rows(lp)
    if params.eps > 0:
        floored = torch.logaddexp(lp, torch.full_like(lp, math.log(params.eps / k))) - math.log1p(params.eps)
        lp = _log_normalise_rows(torch.where((do_upd | is_init)[:, None], floored, lp))
    cap = (max_new_tokens.long() - gen).clamp(min=0).float()
    expected = (lp.exp() * torch.minimum(params.values[None, :], cap[:, None])).sum(-1)

    state.log_post[sl] = torch.where(active[:, None], lp, lp_old)
    state.post_gen[sl] = torch.where(active, num_generated, state.post_gen[sl])
    state.upd_gen[sl] = torch.where(do_upd | is_init, num_generated, state.upd_gen[sl])
    state.expected_remaining[sl] = torch.where(active, expected, state.expected_remaining[sl])
    return state.expected_remaining
