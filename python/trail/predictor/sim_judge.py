"""Judges recorded predictions by the scheduling they buy: the simulator (`trail.sim`, the real
policy step over a step-time model) replays requests drawn from a recorded-predictions npz under
fcfs, sjf_prompt, trail and oracle at several loads (x fcfs saturation), and reports the fraction
of the oracle's mean-latency gain over fcfs that trail and sjf_prompt reach (`sim.compare`; n/a
where the oracle gains < 10%), with the ratios to fcfs (mean, p99).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

from tqdm.auto import tqdm

from trail.scheduler_types import POLICIES as SCHEDULER_POLICIES

logger = logging.getLogger(__name__)

POLICIES = {p: {"policy": p} for p in SCHEDULER_POLICIES}     # each with its defaults


def judge(npz: str | os.PathLike, loads: Sequence[float] = (0.9, 1.0, 1.1), seeds: Sequence[int] = (0, 1, 2),
          n: int = 2000, regime: str = "ample", progress: bool = True) -> dict:
    """{load: {policy: compare-row}} plus the saturation rate; `regime`: ample | kv (sim.regime_engine)."""
    from trail import sim
    from trail.predictor.recorded import check_recorded

    meta = check_recorded(npz)
    pool = sim.load_recorded(npz)
    sm, spec = sim.default_step_model(), sim.llama3_8b_kv_spec()
    eng = sim.regime_engine(regime, pool)
    sat = sim.saturation_rate(pool, eng, spec, sm, n=n)
    out = {"npz": str(npz), "meta": meta, "regime": regime, "n": n, "seeds": list(seeds), "saturation_rps": sat,
           "pool_requests": len(pool), "loads": {}}
    for load in tqdm(list(loads), desc="sim loads", unit="load", disable=not progress):
        raw = sim.run_policies(pool, eng, spec, sm, lambda k, s, r=load * sat: sim.poisson_arrivals(k, r, s),
                               seeds, POLICIES, "recorded", n=n)
        cmp = sim.compare(raw)
        out["loads"][f"{load:g}"] = {p: {k: cmp[p].get(k) for k in (
            "mean_latency", "mean_latency_vs_fcfs", "p99_latency_vs_fcfs", "mean_ttft_vs_fcfs", "oracle_fraction",
            "oracle_fraction_sd", "mean_latency_vs_sjf_prompt")} for p in cmp}
        # how many seeds the oracle fraction averages (sim.compare skips seeds where the oracle gains
        # < 10% over fcfs; one seed's fraction otherwise shows as "± 0.000") and the oracle's gain per seed
        gains = [1.0 - o["mean_latency"] / f["mean_latency"] for f, o in zip(raw["fcfs"], raw["oracle"])]
        for p in out["loads"][f"{load:g}"].values():
            p["oracle_fraction_seeds"] = sum(g >= 0.1 for g in gains)
            p["oracle_gain_per_seed"] = gains
        logger.info("load %.2f: oracle fraction trail %.3f, sjf_prompt %.3f", load,
                    cmp["trail"].get("oracle_fraction", math.nan), cmp["sjf_prompt"].get("oracle_fraction", math.nan))
    return out


def format_judge(res: dict) -> str:
    def f(x, spec=".3f"):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [f"{res['npz']}: {res['pool_requests']} requests resampled to {res['n']} per run, seeds {res['seeds']}, "
             f"{res['regime']} regime, fcfs saturation {res['saturation_rps']:.2f} req/s",
             "| load | policy | mean/fcfs | p99/fcfs | oracle frac (± sd over seeds) | seeds counted |",
             "|---|---|---|---|---|---|"]
    for load, rows in res["loads"].items():
        for pol in ("sjf_prompt", "trail", "oracle"):
            d = rows.get(pol)
            if d:
                lines.append(f"| {load} | {pol} | {f(d['mean_latency_vs_fcfs'])} | {f(d['p99_latency_vs_fcfs'], '.2f')} | "
                             f"{f(d.get('oracle_fraction'))} ± {f(d.get('oracle_fraction_sd'))} | "
                             f"{d.get('oracle_fraction_seeds', 'n/a')}/{len(res['seeds'])} |")
    return "\n".join(lines)
