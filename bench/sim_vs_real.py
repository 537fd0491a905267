"""The simulator's prediction of a serving run (bench/serve.py): the same requests (trace ids,
lengths, arrivals), the same engine limits and policies, the shipped probe's predictions recorded
on the same requests (trail/data/sim/recorded_predictions.npz), and a two-class step-time model
(decode-only steps replay a CUDA graph; steps with a prefill row run eagerly).

    python bench/sim_vs_real.py RUN_DIR [RUN_DIR ...] [--out DIR] [--step-model FILE]

RUN_DIR holds serve.json (any bench/serve.py version: older runs without per-cell request lists
are rebuilt from their seeds, exactly as serve.py drew them) and, from the newer serve.py, the
engine's per-step telemetry (serve_steps.npz) from which the step-time model is fitted
(`fit_step_model`). Without telemetry the model comes from the engine step benchmark
(bench/results/h100_2026-11-27/engine_step_graphs.json: graph vs eager steps of SmolLM2) and its
prefill cost per token is calibrated so that the simulated fcfs all-at-once run takes the run's
measured saturation makespan. Writes sim_vs_real.json and sim_vs_real.md: per cell and policy the
real and simulated mean latency, TTFT, ratio to fcfs, preemptions, and the simulated mixed-step
count and time share. The pool, its draws, the policy variants and the engines' memory regimes are
bench/common.py's, the ones bench/serve.py serves.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

if not __package__:      # run as `python bench/sim_vs_real.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (PREDICTION_CONTROLS, RECORDED, ROOT, SHIPPED_PROBE_RECORDED, VARIANTS,  # noqa: E402
                          held_out_pool, prefill_only, run_engine_config, workload_indices)
from trail import sim  # noqa: E402
from trail.engine_config import EngineConfig  # noqa: E402
from trail.kv_cache_spec import KVCacheSpec  # noqa: E402
from trail.telemetry import STEP_FIELDS  # noqa: E402

logger = logging.getLogger("sim_vs_real")
# a committed summary of the engine step benchmark (bench/suite/model_engine_step.py)
ENGINE_STEP_BENCH = ROOT / "bench" / "results" / "h100_2026-11-27" / "engine_step_graphs.json"


# ------------------------------------------------------------------------------------------------
# The requests of a serving run
# ------------------------------------------------------------------------------------------------
def sim_trace(pool: Mapping, idx: Sequence[int], arrivals: np.ndarray, max_new: int = 512,
              predictions: Sequence[np.ndarray] | None = None) -> sim.SimTrace:
    """A SimTrace of pool entries `idx` at `arrivals` with their recorded predictions
    (`predictions`: per-request arrays instead, e.g. recorded by the real engine)."""
    idx = np.asarray(idx, np.int64)
    L = pool["output_len"][idx]
    cu = np.zeros(len(idx) + 1, np.int64)
    cu[1:] = np.cumsum(L)
    preds = []
    for k, i in enumerate(idx.tolist()):
        p = pool["pred"][i] if predictions is None else np.asarray(predictions[k], np.float32)
        p = p[: L[k]] if len(p) >= L[k] else np.concatenate([p, np.full(L[k] - len(p), p[-1] if len(p) else 0.0, np.float32)])
        preds.append(np.maximum(p, 0.0))
    pred = np.concatenate(preds) if preds else np.zeros(0, np.float32)
    tr = sim.SimTrace(np.asarray(arrivals, np.float64), pool["prompt_len"][idx].copy(), L.copy(),
                      np.full(len(idx), max_new, np.int64), pool["prompt_pred"][idx].copy(), cu, pred.astype(np.float32),
                      "recorded" if predictions is None else "recorded_by_engine")
    tr.validate()
    return tr


def run_recorded(run: Mapping) -> Path:
    """The recorded predictions a serving run fed (its `recorded` path; older runs name the file
    only in their `predictions` label)."""
    if run.get("recorded"):
        return Path(run["recorded"]) if Path(run["recorded"]).is_absolute() else ROOT / run["recorded"]
    for path in (SHIPPED_PROBE_RECORDED, RECORDED):
        if path.name in str(run.get("predictions", "")):
            return path
    return RECORDED


def run_kv_spec(run: Mapping) -> KVCacheSpec:
    """The KV layout of the run's model shape (swap bytes depend on it)."""
    return sim.llama3_8b_kv_spec() if "llama3-8b" in str(run.get("model", "")) else smollm2_kv_spec()


def smollm2_kv_spec(block_size: int = 16) -> KVCacheSpec:
    from trail.models.config import preset

    c = preset("smollm2-135m")
    return KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, dtype=torch.bfloat16, block_size=block_size)


# ------------------------------------------------------------------------------------------------
# Step-time models
# ------------------------------------------------------------------------------------------------
def fit_step_model(steps: np.ndarray, fields: Sequence[str] = STEP_FIELDS, source: str = "") -> sim.StepTimeModel:
    """Least-squares fit of the two-class step model to engine telemetry rows (STEP_FIELDS): the
    wall time of a step is host_s + sync_wait_s (schedule to postprocess) plus the median gap
    to the next step when the engine stepped back to back (the replay loop's own overhead).
    Decode-only steps: base + per_decode * rows. Steps with prefill tokens: that + mixed_base +
    per_prefill_token * prefill tokens + mixed_per_row * rows. The slowest 1% of each class
    (collector pauses) are left out."""
    s = np.asarray(steps, np.float64)
    f = {name: i for i, name in enumerate(fields)}
    wall = s[:, f["host_s"]] + s[:, f["sync_wait_s"]]
    gaps = np.diff(s[:, f["t"]]) - wall[:-1]
    gap = float(np.median(gaps[(gaps >= 0) & (gaps < 0.01)])) if len(gaps) and ((gaps >= 0) & (gaps < 0.01)).any() else 0.0
    wall = wall + gap
    rows, pf = s[:, f["rows"]], s[:, f["prefill_tokens"]]
    mixed = pf > 0

    def trimmed(mask):
        m = mask.copy()
        if m.sum() > 20:
            m &= wall <= np.percentile(wall[mask], 99)
        return m

    dm = trimmed(~mixed)
    if dm.sum() >= 2 and np.ptp(rows[dm]) > 0:
        per_decode, base = np.polyfit(rows[dm], wall[dm], 1)
    else:
        base, per_decode = (float(np.median(wall[dm])) if dm.any() else 0.0), 0.0
    mm = trimmed(mixed)
    mixed_base = per_pf = per_row = 0.0
    if mm.any():
        resid = wall[mm] - (base + per_decode * s[mm, f["decode_rows"]])
        X = np.stack([np.ones(mm.sum()), pf[mm], rows[mm]], 1)
        usable = [0] + [j for j in (1, 2) if np.ptp(X[:, j]) > 0 and mm.sum() > 3]
        coef, *_ = np.linalg.lstsq(X[:, usable], resid, rcond=None)
        vals = dict(zip(usable, coef))
        mixed_base, per_pf, per_row = vals.get(0, 0.0), max(vals.get(1, 0.0), 0.0), vals.get(2, 0.0)
    return sim.StepTimeModel(base_s=float(base), per_decode_s=float(max(per_decode, 0.0)),
                             per_prefill_token_s=float(per_pf), per_ctx_token_s=0.0,
                             source=source or f"fit to {len(s)} engine steps ({int(mixed.sum())} mixed)",
                             mixed_base_s=float(mixed_base), mixed_per_row_s=float(per_row))


def step_model_from_engine_bench(path: str | Path = ENGINE_STEP_BENCH, model: str = "smollm2-135m",
                                 max_batch: int = 64, per_prefill_token_s: float = 0.0,
                                 min_eager_batch: int = 8) -> sim.StepTimeModel:
    """Two-class model from the engine step benchmark (decode steps, graph and eager, per batch):
    graph steps -> base + per_decode * rows; eager minus graph at the same batch (median over
    batches in [min_eager_batch, max_batch]) -> mixed_base. The prefill cost per token is not in that
    benchmark: pass it (or calibrate it with `calibrate_prefill`)."""
    res = [r for r in json.loads(Path(path).read_text())["results"] if r["model"] == model and r["batch"] <= max_batch]
    graph = {r["batch"]: r["step_ms"] / 1e3 for r in res if not r["eager"]}
    eager = {r["batch"]: r["step_ms"] / 1e3 for r in res if r["eager"]}
    b = np.array(sorted(graph))
    per_decode, base = np.polyfit(b, [graph[x] for x in b], 1) if len(b) > 1 else (0.0, graph[b[0]])
    # eager - graph at the same batch: flat from batch 16 to 64 on SmolLM2 (launch-bound); batch 1
    # (an outlier, 41 ms eager) is left out when larger batches exist
    both = np.array(sorted(set(graph) & set(eager)))
    if (both >= min_eager_batch).any():
        both = both[both >= min_eager_batch]
    extra = np.array([eager[x] - graph[x] for x in both])
    mixed_base, per_row = float(np.median(extra)), 0.0
    return sim.StepTimeModel(base_s=float(base), per_decode_s=float(max(per_decode, 0.0)),
                             per_prefill_token_s=float(per_prefill_token_s), per_ctx_token_s=0.0,
                             source=f"engine step benchmark {Path(path).name} ({model}: graph decode, eager extra)",
                             mixed_base_s=float(mixed_base), mixed_per_row_s=float(per_row))


def calibrate_prefill(model: sim.StepTimeModel, trace: sim.SimTrace, engine: EngineConfig, spec: KVCacheSpec,
                      target_makespan: float, hi: float = 1e-3) -> sim.StepTimeModel:
    """per_prefill_token_s (bisection in [0, hi]) so that the simulated fcfs run of `trace` takes
    `target_makespan`; 0 if even that is too slow."""
    from dataclasses import replace

    def span(x):
        r = sim.simulate(trace, engine.with_policy("fcfs"), spec, replace(model, per_prefill_token_s=x))
        return float(r.finish.max() - r.arrival.min())

    s0 = span(0.0)
    if s0 >= target_makespan:
        logger.warning("calibration: the step model alone (%.2f s) already exceeds the target makespan %.2f s",
                       s0, target_makespan)
        return replace(model, per_prefill_token_s=0.0, source=model.source + "; prefill/token 0 (over target)")
    lo = 0.0
    while span(hi) < target_makespan and hi < 1.0:
        hi *= 4
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if span(mid) < target_makespan else (lo, mid)
    x = 0.5 * (lo + hi)
    return replace(model, per_prefill_token_s=x,
                   source=model.source + f"; prefill {x * 1e6:.2f} us/token calibrated to a {target_makespan:.2f} s makespan")


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------
def cell_requests(run: Mapping, cell: Mapping, pool: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(pool indices, arrivals) of a cell: as recorded by the newer serve.py, else re-drawn."""
    if "request_ids" in cell:
        where = {k: i for i, k in enumerate(pool["ids"])}
        return np.array([where[k] for k in cell["request_ids"]]), np.asarray(cell["arrivals"], np.float64)
    return workload_indices(len(pool["ids"]), int(run["num_requests"]), cell.get("rate_req_s"), int(cell["seed"]))[:2]


def simulate_cell(run: Mapping, cell: Mapping, pool: Mapping, model: sim.StepTimeModel, spec: KVCacheSpec,
                  policies: Sequence[str] | None = None, overrides: Mapping[str, Mapping] | None = None,
                  n_override: int | None = None, extra: Mapping[str, tuple] | None = None) -> dict:
    """{policy: sim metrics + step summary} for one cell of a serving run. `overrides`: policy
    name -> options replacing bench.common.VARIANTS' (a what-if); `extra`: more names -> (policy,
    options)."""
    table = dict(VARIANTS)
    table.update(extra or {})
    if n_override is None:
        idx, arr = cell_requests(run, cell, pool)
    else:
        idx, arr, _ = workload_indices(len(pool["ids"]), n_override, cell.get("rate_req_s"), int(cell["seed"]))
    tr = sim_trace(pool, idx, arr)
    out = {}
    for name in policies or list(cell["policies"]):
        policy, opts = table[name]
        control = PREDICTION_CONTROLS.get(name)
        trace = tr if control is None else sim_trace(pool, idx, arr, predictions=[prefill_only(pool["pred"][i]) for i in idx])
        opts = dict(opts)
        if overrides and name in overrides:
            opts.update(overrides[name])
        eng = run_engine_config(cell["regime"], pool, run, policy, opts)
        r = sim.simulate(trace, eng, spec, model, record_steps=True)
        m = r.metrics()
        m.update(r.step_summary())
        out[name] = m
    base = out.get("fcfs")
    for m in out.values():
        if base:
            m["ratio_to_fcfs"] = m["mean_latency"] / base["mean_latency"]
            m["ttft_ratio_to_fcfs"] = m["mean_ttft"] / max(base["mean_ttft"], 1e-12)
    return out


def compare_run(run_dir: Path, model: sim.StepTimeModel | None, spec: KVCacheSpec | None = None) -> dict:
    run = json.loads((run_dir / "serve.json").read_text())
    spec = spec or run_kv_spec(run)
    pool = held_out_pool(max_prompt=int(run.get("max_prompt", 512)), max_output=int(run.get("max_output", 512)),
                         recorded=run_recorded(run))
    if model is None:
        model = run_step_model(run_dir, run, pool, spec)
    rows = []
    for cell in run["cells"]:
        simd = simulate_cell(run, cell, pool, model, spec)
        for name, real in cell["policies"].items():
            s = simd[name]
            rows.append({"regime": cell["regime"], "load": cell["load"], "seed": cell["seed"], "policy": name,
                         "real_mean_s": real["mean_latency_s"], "sim_mean_s": s["mean_latency"],
                         "real_ratio": real.get("latency_ratio_to_fcfs"), "sim_ratio": s.get("ratio_to_fcfs"),
                         "real_ttft_s": real["mean_ttft_s"], "sim_ttft_s": s["mean_ttft"],
                         "real_ttft_ratio": real.get("ttft_ratio_to_fcfs"), "sim_ttft_ratio": s.get("ttft_ratio_to_fcfs"),
                         "real_preemptions": real["preemptions"], "sim_preemptions": s["preemptions_total"],
                         "sim_mixed_steps": s["mixed_steps"], "sim_mixed_time_share": s["mixed_time_share"],
                         "sim_steps": s["steps"]})
    return {"run": str(run_dir), "step_model": model.__dict__, "rows": rows}


def run_step_model(run_dir: Path, run: Mapping, pool: Mapping, spec: KVCacheSpec) -> sim.StepTimeModel:
    """The run's own telemetry fit if it has one, else the engine step benchmark calibrated to
    the run's ample saturation makespan."""
    tel = run_dir / "serve_steps.npz"
    if tel.is_file():
        d = np.load(tel)
        steps = np.concatenate([d[k] for k in d.files if k.startswith("steps/")])
        fields = [str(x) for x in d["fields"]] if "fields" in d.files else STEP_FIELDS
        return fit_step_model(steps, fields, source=f"fit to {run_dir.name}/serve_steps.npz ({len(steps)} steps)")
    model = step_model_from_engine_bench()
    sat = run.get("saturation_req_s_ample")
    if sat:
        n = int(run["num_requests"])
        idx, arr, _ = workload_indices(len(pool["ids"]), n, None, 1000)
        model = calibrate_prefill(model, sim_trace(pool, idx, arr), run_engine_config("ample", pool, run), spec, n / sat)
    return model


def _fmt(x, spec=".3f"):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(result: dict) -> str:
    lines = [f"## {result['run']}", "", f"step model: `{json.dumps({k: (round(v, 7) if isinstance(v, float) else v) for k, v in result['step_model'].items()})}`", "",
             "| regime | load | seed | policy | real mean s | sim mean s | real /fcfs | sim /fcfs | real TTFT s | sim TTFT s "
             "| real preempt | sim preempt | sim mixed steps | sim mixed time |", "|" + "---|" * 14]
    for r in result["rows"]:
        lines.append(f"| {r['regime']} | {r['load']} | {r['seed']} | {r['policy']} | {_fmt(r['real_mean_s'], '.2f')} | "
                     f"{_fmt(r['sim_mean_s'], '.2f')} | {_fmt(r['real_ratio'])} | {_fmt(r['sim_ratio'])} | "
                     f"{_fmt(r['real_ttft_s'])} | {_fmt(r['sim_ttft_s'])} | {r['real_preemptions']} | "
                     f"{r['sim_preemptions']} | {r['sim_mixed_steps']} | {_fmt(r['sim_mixed_time_share'], '.0%')} |")
    rr = np.array([r["real_ratio"] for r in result["rows"] if r["policy"] != "fcfs"], float)
    sr = np.array([r["sim_ratio"] for r in result["rows"] if r["policy"] != "fcfs"], float)
    if len(rr) > 1:
        lines += ["", f"ratio to fcfs, sim vs real over {len(rr)} policy cells: Pearson r = "
                  f"{np.corrcoef(rr, sr)[0, 1]:.2f}, mean |sim - real| = {np.abs(sr - rr).mean():.3f}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="serving run folders (serve.json [+ serve_steps.npz])")
    ap.add_argument("--out", default=None, help="folder for sim_vs_real.{json,md} (default: the first run's)")
    ap.add_argument("--step-model", default=None, help="a StepTimeModel JSON instead of fitting / calibrating")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = sim.StepTimeModel.from_json(args.step_model) if args.step_model else None
    results = [compare_run(Path(r), model) for r in args.runs]
    out = Path(args.out or args.runs[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_vs_real.json").write_text(json.dumps(results, indent=1))
    # the (first) run's step model, reusable with --step-model
    (out / "step_model.json").write_text(json.dumps({"model": results[0]["step_model"]}, indent=1))
    (out / "sim_vs_real.md").write_text("\n".join(markdown(r) for r in results))
    logger.info("wrote %s", out / "sim_vs_real.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
