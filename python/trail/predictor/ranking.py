"""Ranking quality of length predictions: what a scheduler that orders by them actually uses.

- `spearman`, `kendall_tau_b`, `pairwise_accuracy` on two 1-D arrays (no scipy needed);
- `alive_rank_correlation`: at each position g (a grid, every `step` tokens), the requests still
  running there (L > g) ranked by predicted vs true remaining length, averaged over g — the order
  among requests that are alive at the same decode step;
- `ranking_stats`: all three for, e.g., prompt-time predictions of the total length (what orders
  admission) against the true totals.
Pairwise accuracy counts pairs whose true values differ; a tie in the prediction counts one half.
"""
from __future__ import annotations

import math

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    n = len(x)
    while start < n:
        end = start + 1
        while end < n and xs[end] == xs[start]:
            end += 1
        ranks[order[start:end]] = 0.5 * (start + end - 1)
        start = end
    return ranks


def _paired(a, b, name: str):
    """(a, b) as float64 arrays of one length; None when fewer than two pairs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) != len(b):
        raise ValueError(f"{name}: lengths differ ({len(a)} vs {len(b)})")
    return (a, b) if len(a) >= 2 else None


def spearman(a, b) -> float:
    pair = _paired(a, b, "spearman")
    if pair is None:
        return math.nan
    a, b = pair
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def _pair_signs(a: np.ndarray, b: np.ndarray, chunk: int = 1024):
    """(concordant, discordant, ties only in a, ties only in b, pairs) over i < j, chunked O(n^2)."""
    n = len(a)
    c = d = ta = tb = 0
    for s in range(0, n, chunk):
        ai, bi = a[s: s + chunk, None], b[s: s + chunk, None]
        j = np.arange(n)[None, :]
        upper = j > np.arange(s, min(s + chunk, n))[:, None]
        sa, sb = np.sign(a[None, :] - ai), np.sign(b[None, :] - bi)
        prod = sa * sb
        c += int(((prod > 0) & upper).sum())
        d += int(((prod < 0) & upper).sum())
        ta += int(((sa == 0) & (sb != 0) & upper).sum())
        tb += int(((sb == 0) & (sa != 0) & upper).sum())
    return c, d, ta, tb


def _tau_b(c: int, d: int, ta: int, tb: int) -> float:
    den = math.sqrt(float(c + d + ta) * float(c + d + tb))
    return (c - d) / den if den > 0 else math.nan


def _accuracy(c: int, d: int, tp: int) -> float:
    """tp: pairs tied in the prediction, not in the truth (they count one half)."""
    total = c + d + tp
    return (c + 0.5 * tp) / total if total else math.nan


def kendall_tau_b(a, b) -> float:
    pair = _paired(a, b, "kendall_tau_b")
    return math.nan if pair is None else _tau_b(*_pair_signs(*pair))


def pairwise_accuracy(pred, true) -> float:
    """Of the pairs whose true values differ, the fraction the prediction orders the same way
    (prediction ties count 1/2)."""
    c, d, tp, _ = _pair_signs(np.asarray(pred, np.float64), np.asarray(true, np.float64))
    return _accuracy(c, d, tp)


def ranking_stats(pred, true) -> dict:
    """Spearman, Kendall's tau-b and pairwise accuracy (one O(n^2) pair count for both)."""
    pair = _paired(pred, true, "ranking_stats")
    tau = acc = math.nan
    if pair is not None:
        c, d, ta, tb = _pair_signs(*pair)
        tau, acc = _tau_b(c, d, ta, tb), _accuracy(c, d, ta)
    return {"spearman": spearman(pred, true), "kendall_tau_b": tau, "pairwise_accuracy": acc, "n": int(len(pred))}


def alive_rank_correlation(est: np.ndarray, cu: np.ndarray, lens: np.ndarray, step: int = 8,
                           min_alive: int = 10, kendall_max_n: int = 600) -> dict:
    """Rank correlation between predicted (`est[cu[i] + g]`) and true (L_i - g) remaining length
    among the requests alive at g, for g = 0, step, 2 step, ... while >= `min_alive` are alive.
    A constant prediction where the truth varies scores 0 at that g. Returns the unweighted means
    over those g and the per-g values. Kendall's tau (O(n^2)) uses at most `kendall_max_n`
    evenly spaced alive requests per g."""
    est, cu, lens = np.asarray(est, np.float64), np.asarray(cu, np.int64), np.asarray(lens, np.int64)
    per_g = []
    g = 0
    while True:
        alive = np.nonzero(lens > g)[0]
        if len(alive) < min_alive:
            break
        p, t = est[cu[alive] + g], (lens[alive] - g).astype(np.float64)
        sub = np.linspace(0, len(alive) - 1, kendall_max_n).astype(np.int64) if len(alive) > kendall_max_n else slice(None)
        sp, kt = spearman(p, t), kendall_tau_b(p[sub], t[sub])
        if np.ptp(t) > 0 and np.ptp(p) == 0:     # no ranking information: counts as 0, not as missing
            sp = kt = 0.0
        per_g.append({"g": g, "alive": int(len(alive)), "spearman": sp, "kendall_tau_b": kt})
        g += step
    def mean(key):
        v = np.array([r[key] for r in per_g], dtype=np.float64)
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else math.nan
    return {"spearman": mean("spearman"), "kendall_tau_b": mean("kendall_tau_b"), "steps": len(per_g),
            "step": step, "min_alive": min_alive, "per_g": per_g}
