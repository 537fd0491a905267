"""Capacity at an SLO (issue 25, item 2), defined before any run: a request meets the SLO when its
latency is at most `factor` (2) times its latency served alone; a policy's capacity is the highest
Poisson arrival rate at which at least `target` (90%) of requests meet it, bisected to `rel_tol`
(2%, relative). The headline: "at the same SLO trail serves N times fcfs's load".

This module holds the definition (meets_slo, slo_attainment), a generic bisection on any
attainment curve (capacity_search), the simulator's side (solo latencies by simulating each
request alone, sim_capacity over policies on common random numbers) and the real engine's side,
where solo latency is measured on a few requests and fitted (engine_solo_model).

    python bench/capacity.py sim --regime ample --policies fcfs,sjf_prompt,trail,oracle \
        --n 1000 --seeds 0,1 --out DIR          # writes DIR/capacity.json and DIR/capacity.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

if not __package__:      # run as `python bench/capacity.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, queue_growth, sim_policies  # noqa: E402
from trail import sim  # noqa: E402

logger = logging.getLogger(__name__)

# the Llama-3-8B fit to this engine's serving telemetry (bench/sim_fit_engine.py --serve), package data
ENGINE_FIT_8B = sim.DATA_DIR / "step_fit_serve_llama3-8b.json"   # validated against serving runs
DEFAULT_OUT = ROOT / "bench" / "results" / "capacity"


# ------------------------------------------------------------------------------------------------
# The SLO
# ------------------------------------------------------------------------------------------------
def meets_slo(latency, solo_latency, factor: float = 2.0) -> np.ndarray:
    """Per request: latency <= factor * latency served alone (exactly factor times meets it)."""
    latency, solo_latency = np.asarray(latency, np.float64), np.asarray(solo_latency, np.float64)
    if latency.shape != solo_latency.shape:
        raise ValueError(f"latency {latency.shape} and solo_latency {solo_latency.shape} differ in shape")
    return latency <= factor * solo_latency


def slo_attainment(latency, solo_latency, factor: float = 2.0) -> float:
    """Fraction of requests meeting the SLO (nan for no requests)."""
    ok = meets_slo(latency, solo_latency, factor)
    return float(ok.mean()) if ok.size else math.nan


# ------------------------------------------------------------------------------------------------
# Bisection on an attainment curve
# ------------------------------------------------------------------------------------------------
def monotonicity_violations(evaluations: Sequence[dict], tol: float = 0.0) -> list[tuple[float, float]]:
    """(lower rate, higher rate) pairs whose attainment rose with the rate by more than `tol`."""
    ev = sorted(evaluations, key=lambda e: e["rate"])
    return [(a["rate"], b["rate"]) for i, a in enumerate(ev) for b in ev[i + 1:]
            if b["rate"] > a["rate"] and b["attainment"] > a["attainment"] + tol]


def capacity_search(attainment_at: Callable[[float], float], lo: float, hi: float, target: float = 0.9,
                    rel_tol: float = 0.02, max_evals: int = 12, expand: float = 2.0,
                    monotone_tol: float = 0.0) -> dict:
    """The highest rate whose attainment is >= target. Brackets first (lo fails: step down by
    `expand` until one passes; lo passes: try hi, then step up by `expand` until one fails), then
    bisects geometrically until the lowest failing rate / highest passing rate <= 1 + rel_tol.

    The search assumes attainment falls with the rate; measured attainment is noisy and need not.
    Every evaluation is listed so a reader can see that, and `monotone` is False when some
    attainment rose with the rate by more than `monotone_tol` (`violations` lists the pairs).
    Returns capacity (the highest passing rate, None if none passed), hi (the lowest failing rate
    above it, None if none failed), bracketed (both found), converged (bracketed within rel_tol:
    False when max_evals ran out first) and the evaluations in the order made."""
    if not 0 < lo < hi or expand <= 1 or rel_tol <= 0:
        raise ValueError(f"need 0 < lo < hi, expand > 1, rel_tol > 0; got {lo}, {hi}, {expand}, {rel_tol}")
    evaluations: list[dict] = []

    def passes(rate: float) -> bool:
        a = float(attainment_at(rate))
        evaluations.append({"rate": rate, "attainment": a, "passed": a >= target})
        logger.debug("rate %.4g: attainment %.4f", rate, a)
        return a >= target

    def budget_left() -> bool:
        return len(evaluations) < max_evals

    passed = failed = None
    if passes(lo):
        passed, rate = lo, hi
        while failed is None and budget_left():
            if passes(rate):
                passed, rate = rate, rate * expand
            else:
                failed = rate
    else:
        failed, rate = lo, lo / expand
        while passed is None and budget_left():
            if passes(rate):
                passed = rate
            else:
                failed, rate = rate, rate / expand
    bracketed = passed is not None and failed is not None
    while bracketed and failed / passed > 1 + rel_tol and budget_left():
        mid = math.sqrt(passed * failed)
        if passes(mid):
            passed = mid
        else:
            failed = mid
    violations = monotonicity_violations(evaluations, monotone_tol)
    return {"capacity": passed, "hi": failed, "bracketed": bracketed,
            "converged": bracketed and failed / passed <= 1 + rel_tol,
            "monotone": not violations, "violations": violations, "target": target, "rel_tol": rel_tol,
            "evaluations": evaluations}


# ------------------------------------------------------------------------------------------------
# The simulator: solo latency, common random numbers, capacity per policy
# ------------------------------------------------------------------------------------------------
def one_request_trace(prompt_len: int, output_len: int, max_new: int) -> sim.SimTrace:
    """A trace of one request arriving at 0 with exact predictions (alone, no ranking matters)."""
    return sim.SimTrace(np.zeros(1), np.array([prompt_len]), np.array([output_len]), np.array([max_new]),
                        np.array([float(output_len)]), np.array([0, output_len]),
                        np.arange(output_len, 0, -1, dtype=np.float32), "exact")


def sim_solo_latency(trace: sim.SimTrace, engine, spec, step_model: sim.StepTimeModel) -> np.ndarray:
    """Every request's latency served alone under `engine` and `step_model` (solo_latency_by_lengths)."""
    return solo_latency_by_lengths(trace.prompt_len, trace.output_len, trace.max_new, engine, spec, step_model)


def solo_latency_by_lengths(prompt_len, output_len, max_new, engine, spec, step_model) -> np.ndarray:
    """Alone and with noise-free steps, a request runs the same steps whatever its true length
    until it stops, so one simulation per distinct (prompt_len, max_new), run to the longest output
    among them, gives every shorter one too: its L-th token comes at the end of step
    (steps - longest + L), since after the prefill chunks every step samples one token."""
    prompt_len, output_len, max_new = (np.asarray(x, np.int64) for x in (prompt_len, output_len, max_new))
    out = np.empty(len(prompt_len))
    for p, m in np.unique(np.stack([prompt_len, max_new], axis=1), axis=0):
        rows = np.flatnonzero((prompt_len == p) & (max_new == m))
        longest = int(output_len[rows].max())
        log = sim.simulate(one_request_trace(int(p), longest, int(m)), engine, spec, step_model,
                           record_steps=True).step_log
        step_end = log[:, sim.STEP_LOG_FIELDS.index("t")] + log[:, sim.STEP_LOG_FIELDS.index("dt")]
        out[rows] = step_end[len(step_end) - longest + output_len[rows] - 1]
    return out


def unit_rate_arrivals(n: int, seed: int) -> np.ndarray:
    """Poisson arrivals at 1 req/s; at rate r they are this / r (one draw shared by all rates)."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0, size=n))


class SimAttainmentCurve:
    """rate -> SLO attainment pooled over the traces, each with its unit-rate arrivals / rate.
    Also keeps, per rate, the mean over traces of bench.common.queue_growth: a capacity above
    the saturation rate is a finite run's transient (the queue still growing), not a steady state."""

    def __init__(self, unit_traces, solo, engine, spec, step_model, factor: float = 2.0):
        self.unit_traces, self.solo, self.engine, self.spec = unit_traces, solo, engine, spec
        self.step_model, self.factor = step_model, factor
        self.queue_growth: dict[float, float] = {}

    def __call__(self, rate: float) -> float:
        met, growth = [], []
        for tr, s in zip(self.unit_traces, self.solo):
            res = sim.simulate(dataclasses.replace(tr, arrival=tr.arrival / rate), self.engine, self.spec,
                               self.step_model)
            latency = res.finish - res.arrival
            met.append(meets_slo(latency, s, self.factor))
            growth.append(queue_growth(res.arrival, res.first_token - res.arrival, latency))
        self.queue_growth[rate] = float(np.mean(growth))
        return float(np.concatenate(met).mean())


def sim_capacity(pool: sim.LengthPool, regime: str, policies: Sequence[str], step_model: sim.StepTimeModel,
                 spec, n: int = 1000, seeds: Sequence[int] = (0, 1), predictions: str = "recorded",
                 factor: float = 2.0, target: float = 0.9, rel_tol: float = 0.02, max_evals: int = 12,
                 bracket: tuple[float, float] = (0.5, 1.0), progress: bool = False) -> dict:
    """Capacity of each policy (names of bench.common.VARIANTS) in `regime`, on the same requests
    and unit-rate arrival draws per seed for every policy; attainment at a rate pools all seeds.
    Solo latencies come from the fcfs engine of the regime (one reference for all policies). The
    search starts from `bracket` x fcfs's saturation rate. Per policy: capacity in req/s, as a
    multiple of fcfs's saturation rate and of fcfs's capacity (when fcfs is among the policies)."""
    from tqdm.auto import tqdm

    engine = sim.regime_engine(regime, pool)
    saturation = sim.saturation_rate(pool, engine, spec, step_model)
    unit_traces = [sim.make_trace(pool, unit_rate_arrivals(n, s), predictions, seed=s) for s in seeds]
    solo_all = solo_latency_by_lengths(*(np.concatenate([getattr(tr, k) for tr in unit_traces])
                                         for k in ("prompt_len", "output_len", "max_new")),
                                       engine.with_policy("fcfs"), spec, step_model)
    solo = np.split(solo_all, np.cumsum([len(tr) for tr in unit_traces])[:-1])
    logger.info("%s regime: fcfs saturates at %.3f req/s; %d requests x %d seeds", regime, saturation, n, len(seeds))
    out: dict = {}
    for name, opts in tqdm(sim_policies(policies).items(), desc="policies", disable=not progress):
        opts = dict(opts)
        eng = engine.with_policy(opts.pop("policy"), **opts)
        curve = SimAttainmentCurve(unit_traces, solo, eng, spec, step_model, factor)
        search = capacity_search(curve, bracket[0] * saturation, bracket[1] * saturation, target, rel_tol, max_evals)
        for e in search["evaluations"]:
            e["queue_growth"] = curve.queue_growth[e["rate"]]
        cap = search["capacity"]
        out[name] = {"capacity_rps": cap, "x_fcfs_saturation": None if cap is None else cap / saturation,
                     "queue_growth_at_capacity": None if cap is None else curve.queue_growth[cap],
                     "search": search}
        logger.info("%s: capacity %s req/s after %d evaluations", name, cap, len(search["evaluations"]))
    fcfs_cap = out.get("fcfs", {}).get("capacity_rps")
    for r in out.values():
        r["x_fcfs_capacity"] = None if not fcfs_cap or r["capacity_rps"] is None else r["capacity_rps"] / fcfs_cap
    return {"slo": {"factor": factor, "target": target, "rel_tol": rel_tol}, "regime": regime, "n": n,
            "seeds": list(seeds), "predictions": predictions, "step_model": step_model.source,
            "fcfs_saturation_rps": saturation, "solo_latency_mean_s": float(np.concatenate(solo).mean()),
            "policies": out}


# ------------------------------------------------------------------------------------------------
# The real engine: solo latency fitted from a few measured solo runs
# ------------------------------------------------------------------------------------------------
def engine_solo_model(prompt_len, output_len, solo_latency) -> dict:
    """Least-squares fit solo latency = a + b * prompt_len + c * output_len from requests each
    served alone on the engine (the GPU runner measures ~16 of varied lengths). Returns the
    coefficients and residual stats (rms and max, absolute s and relative to the measured)."""
    p, o, y = (np.asarray(x, np.float64) for x in (prompt_len, output_len, solo_latency))
    design = np.stack([np.ones_like(p), p, o], axis=1)
    if len(y) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError("need >= 3 solo runs whose prompt and output lengths vary independently")
    (a, b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ np.array([a, b, c])
    return {"a_s": float(a), "b_s_per_prompt_token": float(b), "c_s_per_output_token": float(c), "n": int(len(y)),
            "residual_rms_s": float(np.sqrt(np.mean(resid ** 2))), "residual_max_abs_s": float(np.abs(resid).max()),
            "residual_max_rel": float(np.abs(resid / y).max())}


def solo_latency_from_fit(fit: dict, prompt_len, output_len) -> np.ndarray:
    """Solo latency of each request predicted by an engine_solo_model fit."""
    return (fit["a_s"] + fit["b_s_per_prompt_token"] * np.asarray(prompt_len, np.float64)
            + fit["c_s_per_output_token"] * np.asarray(output_len, np.float64))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict, wall_s: float) -> str:
    slo = result["slo"]
    lines = [f"# Capacity at an SLO: {result['regime']} regime",
             "", f"SLO: latency <= {slo['factor']:g} x latency served alone; capacity: the highest Poisson rate "
             f"with >= {slo['target']:.0%} of requests meeting it, bisected to {slo['rel_tol']:.0%}. "
             f"{result['n']} requests x seeds {result['seeds']} ({result['predictions']} predictions), step model: "
             f"{result['step_model']}. fcfs saturation: {result['fcfs_saturation_rps']:.3f} req/s. "
             f"Wall time {wall_s:.0f} s. Queue growth (bench.common.queue_growth, at the capacity rate): TTFT "
             "growth over the run in mean service times; well above 0 means the rate is not sustained and "
             "the capacity is a finite run's transient.", "",
             "| policy | capacity req/s | x fcfs saturation | x fcfs capacity | queue growth there | evaluations "
             "| bracketed | converged | monotone |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["policies"].items():
        s = r["search"]
        lines.append(f"| {name} | {_fmt(r['capacity_rps'], '.3f')} | {_fmt(r['x_fcfs_saturation'], '.3f')} | "
                     f"{_fmt(r['x_fcfs_capacity'], '.3f')} | {_fmt(r['queue_growth_at_capacity'], '.2f')} | "
                     f"{len(s['evaluations'])} | {s['bracketed']} | "
                     f"{s['converged']} | {s['monotone']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sim", help="capacity of each policy in the simulator")
    s.add_argument("--regime", choices=("ample", "kv"), default="ample")
    s.add_argument("--policies", default="fcfs,sjf_prompt,trail,oracle")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seeds", default="0,1")
    s.add_argument("--predictions", default="recorded")
    s.add_argument("--step-fit", type=Path, default=ENGINE_FIT_8B)
    s.add_argument("--factor", type=float, default=2.0)
    s.add_argument("--target", type=float, default=0.9)
    s.add_argument("--rel-tol", type=float, default=0.02)
    s.add_argument("--max-evals", type=int, default=12)
    s.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    result = sim_capacity(sim.load_recorded(), args.regime, args.policies.split(","),
                          sim.StepTimeModel.from_json(args.step_fit), sim.llama3_8b_kv_spec(), n=args.n,
                          seeds=[int(x) for x in args.seeds.split(",")], predictions=args.predictions,
                          factor=args.factor, target=args.target, rel_tol=args.rel_tol, max_evals=args.max_evals,
                          progress=True)
    wall = time.time() - t0
    result["step_fit_file"], result["wall_s"] = args.step_fit.name, wall
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(result, indent=1))
    table = markdown(result, wall)
    (args.out / "capacity.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
