"""Runs the Bayes filter of `trail_kernels.probe` (its `probe_reference`, the one implementation)
over whole requests offline, one decode position g at a time, for evaluation and filter fitting.

Each request is a slot. g = 0 is the prompt step (the prompt mean fed as a one-token prompt
chunk, so the pooled mean is the stored mean); g >= 1 are decode rows holding the stored state.
Variants used by the baselines: `update_every=NEVER` (no evidence after the prompt: the prefill
probe or a given prior propagated by the predict step alone), and `init_log_post` (start from a
prompt predictor's distribution instead of the prompt step).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from trail.predictor.embed import DenseFeatures
from trail.predictor.probe_file import probe_params  # noqa: F401  (re-exported for older callers)
from trail_kernels.probe_params import ProbeParams
from trail_kernels.probe_reference import probe_reference
from trail_kernels.probe_state import ProbeState
from trail_kernels.row_flags import FIRST_CHUNK, LAST_CHUNK, PREFILL

NEVER = 1 << 30


def run_filter(params: ProbeParams, dense: DenseFeatures, max_new_tokens: int,
               init_log_post: torch.Tensor | None = None, record_argmax: bool = False, progress: bool = False,
               posterior_out: torch.Tensor | None = None):
    """Expected remaining length at every (request, g): fp32 [sum L] aligned with `dense.feats`
    (and, with `record_argmax`, the posterior's argmax bin there). `progress`: a bar over g.
    `posterior_out`: a [sum L, K] tensor filled in place with the posterior over the bins there
    (probabilities; trail.gittins ranks by it)."""
    dev = params.device
    n = len(dense.ids)
    lens = dense.total_len.to(dev).long()
    cu = dense.cu.to(dev).long()
    out = torch.zeros(int(cu[-1]), dtype=torch.float32, device=dev)
    arg = torch.zeros(int(cu[-1]), dtype=torch.long, device=dev) if record_argmax else None
    if posterior_out is not None and tuple(posterior_out.shape) != (int(cu[-1]), params.num_bins):
        raise ValueError(f"posterior_out must be [{int(cu[-1])}, {params.num_bins}], got {tuple(posterior_out.shape)}")
    if n == 0:
        return (out, arg) if record_argmax else out
    state = ProbeState.for_params(params, max_slots=n, max_rows=n, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    feats = dense.feats.to(dev)
    all_slots = torch.arange(n, device=dev)
    max_new = torch.full((n,), max_new_tokens, **i32)

    def step(slots, rows, flags, g):
        m = slots.numel()
        res = probe_reference(feats[rows].contiguous(), torch.arange(m + 1, **i32), slots.to(torch.int32),
                              torch.full((m,), flags, **i32), torch.full((m,), g, **i32), max_new[:m],
                              params, state, has_prefill=bool(flags & PREFILL), validate=False)
        out[rows] = res[slots]
        if arg is not None:
            arg[rows] = state.log_post[slots].argmax(-1)
        if posterior_out is not None:
            posterior_out[rows.to(posterior_out.device)] = state.log_post[slots].exp().to(posterior_out)

    # a request with no stored position (L = 0) has no row: cu[i] would be the next request's
    started = all_slots[lens > 0]
    if init_log_post is None:
        step(started, cu[started], PREFILL | FIRST_CHUNK | LAST_CHUNK, 0)
    else:
        if init_log_post.shape != (n, params.num_bins):
            raise ValueError(f"init_log_post must be [{n}, {params.num_bins}], got {tuple(init_log_post.shape)}")
        state.log_post[:n] = torch.log_softmax(init_log_post.to(dev, torch.float32), -1)
        step(started, cu[started], 0, 0)
    for g in tqdm(range(1, int(lens.max())), desc="filter steps", unit="g", disable=not progress, leave=False):
        slots = all_slots[lens > g]
        step(slots, cu[slots] + g, 0, g)
    return (out, arg) if record_argmax else out


def request_mae(est: torch.Tensor, dense: DenseFeatures, select: torch.Tensor | None = None) -> float:
    """Per request the mean |estimate - remaining| over its positions, then the mean over
    requests (optionally only where `select` [N] is True)."""
    per = per_request_abs_err(est, dense)
    if select is not None:
        per = per[select.to(per.device)]
    return float(per.mean()) if per.numel() else math.nan


def truth(dense: DenseFeatures) -> torch.Tensor:
    """Remaining length L - g at every stored position, aligned with `dense.feats`."""
    lens = dense.total_len.long().cpu()
    return torch.cat([torch.arange(int(L), 0, -1, dtype=torch.float32) for L in lens]) if len(lens) else torch.zeros(0)


def positions(dense: DenseFeatures) -> torch.Tensor:
    lens = dense.total_len.long().cpu()
    return torch.cat([torch.arange(int(L)) for L in lens]) if len(lens) else torch.zeros(0, dtype=torch.long)


def per_request_abs_err(est: torch.Tensor, dense: DenseFeatures) -> torch.Tensor:
    err = (est.float().cpu() - truth(dense)).abs()
    cu = dense.cu.long().cpu()
    seg = torch.repeat_interleave(torch.arange(len(dense.ids)), cu[1:] - cu[:-1])
    sums = torch.zeros(len(dense.ids), dtype=torch.float64).index_add_(0, seg, err.double())
    return sums / (cu[1:] - cu[:-1]).double()
