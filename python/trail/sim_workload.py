"""The simulator's workloads: a pool of recorded requests (prompt / output lengths, prompt-time
and per-step predictions: `load_recorded`, the shipped `trail/data/sim/recorded_predictions.npz`
by default), arrival processes, and `SimTrace`, one workload drawn from a pool that `trail.sim`
runs. Re-exported by `trail.sim`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

DEFAULT_RECORDED = Path(__file__).resolve().parent / "data" / "sim" / "recorded_predictions.npz"


@dataclass
class LengthPool:
    """Requests to draw from: prompt / output lengths, prompt-time predicted totals and per-step
    predicted remaining (`pred[cu[i] + g]` = estimate of the remaining length at position g)."""
    prompt_len: np.ndarray
    output_len: np.ndarray
    prompt_pred: np.ndarray
    cu: np.ndarray
    pred: np.ndarray
    max_new_tokens: int
    source: str = ""
    # float32 [sum L]: the Gittins key fed after g + 1 tokens, plus 1 (attach_posteriors)
    gittins: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_len)


def load_recorded(path: str | Path = DEFAULT_RECORDED, posteriors: str | Path | None = None) -> LengthPool:
    """Recorded lengths and probe predictions (bench/sim_record_predictions.py); by default the
    committed file (trail/data/sim/recorded_predictions.npz). `posteriors`: a posteriors npz
    (sim_record_predictions.py --posteriors) of the same requests: the pool keeps the requests it
    holds (in `path`'s order) and ranks by it (attach_posteriors)."""
    d = np.load(path)
    meta = json.loads(str(d["meta"]))
    pool = LengthPool(d["prompt_len"].astype(np.int64), d["output_len"].astype(np.int64),
                      d["prompt_pred"].astype(np.float64), d["cu"].astype(np.int64), d["pred"].astype(np.float32),
                      int(meta["max_new_tokens"]), source=f"recorded:{Path(path).name}")
    if posteriors is None:
        return pool
    q = np.load(posteriors)
    qmeta = json.loads(str(q["meta"]))
    at = {str(k): i for i, k in enumerate(q["ids"])}
    keep = [i for i, k in enumerate(d["ids"]) if str(k) in at]
    rows = [at[str(d["ids"][i])] for i in keep]
    if not keep or not np.array_equal(q["output_len"][rows], pool.output_len[keep]):
        raise ValueError(f"{posteriors}: no requests of {path}, or their output lengths differ")
    qcu = q["cu"]
    post = np.concatenate([q["post"][qcu[r]: qcu[r + 1]] for r in rows])
    L = pool.output_len[keep]
    cu = np.zeros(len(keep) + 1, np.int64)
    cu[1:] = np.cumsum(L)
    sub = LengthPool(pool.prompt_len[keep], L, pool.prompt_pred[keep], cu, np.zeros(int(cu[-1]), np.float32),
                     pool.max_new_tokens, source=f"{pool.source}+posteriors:{Path(posteriors).name}")
    return attach_posteriors(sub, post, qmeta["bin_values"])


def attach_posteriors(pool: LengthPool, post: np.ndarray, values) -> LengthPool:
    """Per position of `pool` the filter's posterior over the bins (`post` [sum L, K]): sets
    `pool.pred` to its expected remaining (the readout trail ranks by) and `pool.gittins` to its
    Gittins key (trail.gittins) as `simulate` consumes it: after g + 1 tokens it feeds the value at
    position g minus 1, so this holds the key of R - 1 plus 1 (exact, where the mean's minus 1 is)."""
    from trail.gittins import expected_remaining, gittins_key_np

    if post.shape[0] != int(pool.cu[-1]):
        raise ValueError(f"posteriors: {post.shape[0]} rows for {int(pool.cu[-1])} positions")
    g = np.concatenate([np.arange(x) for x in pool.output_len])
    cap = (pool.max_new_tokens - g).astype(np.float32)
    pool.pred = expected_remaining(post.astype(np.float32), values, cap=cap).numpy().astype(np.float32)
    pool.gittins = gittins_key_np(post, values, cap=cap, shift=1.0) + np.float32(1.0)
    return pool


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def burst_arrivals(n: int, rate: float, seed: int, burst: int = 200, burst_fraction: float = 0.5) -> np.ndarray:
    """Poisson at `rate` for (1 - burst_fraction) of the requests; the rest in bursts of `burst`
    requests arriving at once at uniformly chosen times over the same span."""
    rng = np.random.default_rng(seed)
    n_burst = int(n * burst_fraction) // burst * burst
    base = np.cumsum(rng.exponential(1.0 / rate, size=n - n_burst))
    times = rng.uniform(0, base[-1] if len(base) else 1.0, size=n_burst // burst) if n_burst else np.zeros(0)
    return np.sort(np.concatenate([base, np.repeat(times, burst)]))


@dataclass
class SimTrace:
    """One workload: arrays of length N (requests in any order; ids are the indices)."""
    arrival: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    max_new: np.ndarray
    prompt_pred: np.ndarray
    pred_cu: np.ndarray
    pred: np.ndarray        # float32 [sum output_len]: predicted remaining at g = 0 .. L - 1
    predictions: str = ""   # recorded / gittins / prefill / exact / noisy:<sd>

    def __len__(self) -> int:
        return len(self.arrival)

    def to_json(self) -> dict:
        return {"arrival": self.arrival.tolist(), "prompt_len": self.prompt_len.tolist(),
                "output_len": self.output_len.tolist(), "max_new": self.max_new.tolist(),
                "prompt_pred": self.prompt_pred.tolist(), "pred_cu": self.pred_cu.tolist(),
                "pred": self.pred.astype(float).round(3).tolist(), "predictions": self.predictions}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SimTrace":
        out = cls(np.asarray(d["arrival"], np.float64), np.asarray(d["prompt_len"], np.int64),
                  np.asarray(d["output_len"], np.int64), np.asarray(d["max_new"], np.int64),
                  np.asarray(d["prompt_pred"], np.float64), np.asarray(d["pred_cu"], np.int64),
                  np.asarray(d["pred"], np.float32), d.get("predictions", ""))
        out.validate()
        return out

    def validate(self) -> None:
        n = len(self.arrival)
        for name in ("prompt_len", "output_len", "max_new", "prompt_pred"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SimTrace.{name} has {len(getattr(self, name))} entries, arrival {n}")
        if (self.prompt_len < 1).any() or (self.output_len < 1).any() or (self.output_len > self.max_new).any():
            raise ValueError("SimTrace: prompt_len and output_len must be >= 1 and output_len <= max_new")
        if len(self.pred_cu) != n + 1 or int(self.pred_cu[-1]) != len(self.pred) or \
                not np.array_equal(np.diff(self.pred_cu), self.output_len):
            raise ValueError("SimTrace: pred_cu must delimit output_len predictions per request")
        if not (np.isfinite(self.pred).all() and (self.pred >= 0).all() and np.isfinite(self.arrival).all()):
            raise ValueError("SimTrace: predictions and arrivals must be finite (predictions >= 0)")


def make_trace(pool: LengthPool, arrival: np.ndarray, predictions: str = "recorded", seed: int = 0,
               resample: bool = True) -> SimTrace:
    """A trace of len(arrival) requests drawn from `pool` (with replacement when `resample`, else
    the first N in order). predictions: `recorded` (the pool's own), `gittins` (the Gittins key
    of the pool's posteriors, trail.gittins; admission still by the prompt prediction), `prefill` (the pool's first
    recorded prediction, the prefill probe's, counted down as tokens are generated: no per-step
    filter), `exact` (true remaining), `noisy:<sd>` (true lengths times a per-request lognormal
    factor exp(N(0, sd)), prompt-time and per-step alike)."""
    n = len(arrival)
    rng = np.random.default_rng(seed + 7919)
    idx = rng.integers(0, len(pool), size=n) if resample else np.arange(n) % len(pool)
    L = pool.output_len[idx]
    g = np.concatenate([np.arange(x) for x in L]) if n else np.zeros(0, np.int64)
    cu = np.zeros(n + 1, np.int64)
    cu[1:] = np.cumsum(L)
    true_rem = (np.repeat(L, L) - g).astype(np.float32)
    if predictions in ("recorded", "gittins"):
        src = pool.pred if predictions == "recorded" else pool.gittins
        if src is None:
            raise ValueError("predictions='gittins' needs a pool with posteriors (load_recorded(posteriors=...))")
        pred = np.concatenate([src[pool.cu[i]: pool.cu[i + 1]] for i in idx]).astype(np.float32)
        prompt_pred = pool.prompt_pred[idx]
    elif predictions == "prefill":
        first = pool.pred[pool.cu[idx]].astype(np.float64)
        pred = np.maximum(np.repeat(first, L) - g, 0.0).astype(np.float32)
        prompt_pred = pool.prompt_pred[idx]
    elif predictions == "exact":
        pred, prompt_pred = true_rem, L.astype(np.float64)
    elif predictions.startswith("noisy:"):
        sd = float(predictions.split(":", 1)[1])
        f = np.exp(rng.normal(0.0, sd, size=n))
        pred = (true_rem * np.repeat(f, L)).astype(np.float32)
        prompt_pred = L * f
    else:
        raise ValueError(f"predictions must be recorded, gittins, prefill, exact or noisy:<sd>, got {predictions!r}")
    tr = SimTrace(np.asarray(arrival, np.float64), pool.prompt_len[idx].copy(), L.copy(),
                  np.full(n, pool.max_new_tokens, np.int64), np.asarray(prompt_pred, np.float64), cu, pred,
                  predictions)
    tr.validate()
    return tr
