"""Gittins-index ranking over the filter's posterior (issue 26 item 2).

The probe's Bayes filter holds, per request, a posterior p over K bins of remaining output length;
trail ranks by its mean, sum_k p_k min(v_k, cap) (v: the bins' values, the mean training label in
each bin; cap: the tokens max_new_tokens still allows). The Gittins index ranks by how likely a
request is to finish soon for the work that takes:

    G = max_D  P(R <= D) / E[min(R, D)]          (serve first the largest G)

which is optimal for mean response time on one server when sizes come from a known distribution
(M/G/1 with preemption). Here each request has its own distribution, its posterior.

Model of R. The same one the expected-remaining key uses: R = min(v_k, cap) with probability p_k
(mass within a bin sits at the bin's value, not spread over the bin). For a discrete R the ratio
only rises at its support points (between them P(R <= D) is flat while E[min(R, D)] grows), so the
maximum over the K support points is the exact index of this model, not a grid approximation.
(Spreading each bin uniformly over its integers would add ~50 tokens of within-bin spread the
filter never estimated; the bin values keep the two keys on the same information.)

Key (smaller = served first): 1 / G, in tokens,

    key = min_D  E[min(R, D)] / P(R <= D)

the expected tokens spent per completion when a request is served for up to D tokens, at its best
D. It is <= the mean (D = the largest support point gives E[R] / 1) and equals it for a point mass
(key = its remaining length), so it is on the scale of the expected-remaining key and trail's
token-valued constants (margin 32 tokens, aging 0.15 tokens per step, c x the initial key) keep
their meaning; it falls below the mean by as much as the posterior puts on a short finish (a 30/70
mix of 23 and 495 tokens: mean 353, key 77).

`shift` subtracts tokens generated since the posterior was taken (R - shift, floored at 0): the
simulator feeds, after a step's token, the key of the posterior read before it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["gittins_key", "gittins_key_np", "expected_remaining"]


def _support(values: Sequence[float] | torch.Tensor, cap, shift, n: int, dtype, device) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=dtype, device=device).reshape(1, -1)
    if v.shape[1] > 1 and bool((v[0, 1:] < v[0, :-1]).any()):
        raise ValueError("gittins: bin values must be non-decreasing")
    if cap is not None:
        v = torch.minimum(v, torch.as_tensor(cap, dtype=dtype, device=device).reshape(-1, 1))
    if shift is not None:
        v = v - torch.as_tensor(shift, dtype=dtype, device=device).reshape(-1, 1)
    return v.clamp_min(0).expand(n, -1)


def _probs(post, dtype) -> torch.Tensor:
    p = torch.as_tensor(post).to(dtype)
    if p.dim() != 2:
        raise ValueError(f"gittins: posteriors must be [N, K], got {tuple(p.shape)}")
    p = p.clamp_min(0)
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def expected_remaining(post, values, cap=None, shift=None, dtype=torch.float32) -> torch.Tensor:
    """sum_k p_k max(min(v_k, cap) - shift, 0) per row: the key trail ranks by today (the filter's
    readout, trail_kernels.probe_reference, when shift is 0)."""
    p = _probs(post, dtype)
    return (p * _support(values, cap, shift, p.shape[0], dtype, p.device)).sum(-1)


def gittins_key(post, values, cap=None, shift=None, dtype=torch.float32) -> torch.Tensor:
    """1 / Gittins index per row, in tokens (see the module docstring): smaller = served first.

    post: [N, K] posterior over the bins (rows normalised here; float16 ok); values: [K] the bins'
    values (non-decreasing); cap: None, a number or [N] (max_new_tokens - generated at the
    posterior); shift: None, a number or [N] tokens to subtract. Returns `dtype` [N]; torch or
    numpy inputs, a torch tensor out (on post's device)."""
    p = _probs(post, dtype)
    n, k = p.shape
    v = _support(values, cap, shift, n, dtype, p.device)
    if v.shape[1] != k:
        raise ValueError(f"gittins: {v.shape[1]} bin values for {k} bins")
    if n == 0:
        return torch.zeros(0, dtype=dtype, device=p.device)
    # values are sorted (cap and shift keep the order), so P(R <= v_j) and E[min(R, v_j)] are
    # prefix sums: F_j = sum_{k<=j} p_k, E_j = sum_{k<=j} p_k v_k + v_j (1 - F_j). Tied values
    # (bins capped at the same cap) have equal E_j and the largest F_j, the true P(R <= D), at the
    # last of them, so the min picks the right ratio.
    f = p.cumsum(-1)
    e = (p * v).cumsum(-1) + v * (1 - f).clamp_min(0)
    ratio = torch.where(f > 0, e / f.clamp_min(torch.finfo(dtype).tiny), torch.full_like(e, float("inf")))
    return ratio.min(-1).values


def gittins_key_np(post: np.ndarray, values, cap=None, shift=None, chunk: int = 1 << 16) -> np.ndarray:
    """gittins_key over a large numpy array in chunks (float32 out): the simulator's per-position
    keys."""
    out = np.empty(len(post), np.float32)
    for s in range(0, len(post), chunk):
        sl = slice(s, s + chunk)
        c = None if cap is None or np.ndim(cap) == 0 else np.asarray(cap)[sl]
        sh = None if shift is None or np.ndim(shift) == 0 else np.asarray(shift)[sl]
        out[sl] = gittins_key(torch.from_numpy(np.asarray(post[sl], np.float32)), values,
                              cap if c is None and cap is not None else c,
                              shift if sh is None and shift is not None else sh).numpy()
    return out
