"""Why runs 3-4 (ample, 1.1x of 82.8 req/s, H100, overlapped engine) vary so much across seeds, and
what a conclusive run needs (CPU, simulator). Fits the step-time model two ways from the runs'
telemetry: sim_vs_real.fit_step_model (host + sync time per step + the median gap) and a *period*
fit (the time between consecutive step starts, which is what an overlapped loop delivers; steps
>= 10 ms, i.e. stalls, left out). Then, per model: the simulated sustained saturation rate, and
trail (c 0.8) / trail c=0 / sjf_prompt / oracle vs fcfs at 1.0x / 1.1x / 1.2x of the *run's*
82.8 req/s with 500 and 2,000 requests x 5 seeds.

    python bench/serve_knee.py [--out DIR]                       # -> DIR/knee.json (loads 1.0-1.2)
    python bench/serve_knee.py --period-only --loads 1.3,1.4,1.5  # (renamed knee_high_load.json)

The runs' serve.json and serve_steps.npz are raw data no longer in the tree: restore them first
(bench/results/MANIFEST.md names the commit), e.g.
    git show C:bench/results/h100_2026-11-27/serve_run3/serve_steps.npz > .../serve_run3/serve_steps.npz
or pass other run folders with --runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if not __package__:      # run as `python bench/serve_knee.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import serve_diagnose as sd  # noqa: E402
from bench import sim_vs_real as svr  # noqa: E402
from bench.common import ROOT, held_out_pool  # noqa: E402
from trail import sim  # noqa: E402
from trail.telemetry import STEP_FIELDS  # noqa: E402

RUNS = [ROOT / "bench/results/h100_2026-11-27/serve_run3", ROOT / "bench/results/h100_2026-11-27/serve_run4"]


def all_steps(runs=RUNS) -> np.ndarray:
    """Per-cell step arrays (policy runs only, not the saturation probes)."""
    out = []
    for r in runs:
        d = np.load(r / "serve_steps.npz")
        out += [d[k] for k in d.files if k.startswith("steps/ample/")]
    return out


def period_fit(cells) -> sim.StepTimeModel:
    f = {n: i for i, n in enumerate(STEP_FIELDS)}
    X, y = [], []
    for s in cells:
        dt = np.diff(s[:, f["t"]])
        keep = dt < 0.010
        X.append(s[:-1][keep])
        y.append(dt[keep])
    s, y = np.concatenate(X), np.concatenate(y)
    rows, pf, dec = s[:, f["rows"]], s[:, f["prefill_tokens"]], s[:, f["decode_rows"]]
    m = pf > 0
    per_decode, base = np.polyfit(rows[~m], y[~m], 1)
    resid = y[m] - (base + per_decode * dec[m])
    A = np.stack([np.ones(m.sum()), pf[m], rows[m]], 1)
    (mb, ppt, pr), *_ = np.linalg.lstsq(A, resid, rcond=None)
    return sim.StepTimeModel(base_s=float(base), per_decode_s=float(per_decode), per_prefill_token_s=float(max(ppt, 0)),
                             per_ctx_token_s=0.0, mixed_base_s=float(mb), mixed_per_row_s=float(pr),
                             source=f"period fit (step start to step start, < 10 ms) to {len(y)} steps of runs 3-4")


def stall_table(runs=RUNS) -> list[dict]:
    f = {n: i for i, n in enumerate(STEP_FIELDS)}
    rows = []
    for r in runs:
        d, R = np.load(r / "serve_steps.npz"), json.loads((r / "serve.json").read_text())
        for c in R["cells"]:
            for p, s in c["policies"].items():
                st = d[f"steps/{c['regime']}/{c['load']}/{c['seed']}/{p}"]
                dt = np.diff(st[:, f["t"]])
                rows.append({"seed": c["seed"], "policy": p, "mean_latency_s": s["mean_latency_s"],
                             "ratio": s["latency_ratio_to_fcfs"], "mean_ttft_s": s["mean_ttft_s"],
                             "preemptions": s["preemptions"], "steps": len(st),
                             "median_step_ms": 1e3 * float(np.median(dt)),
                             "stalls_10ms": int((dt > 0.01).sum()), "stall_s": float(dt[dt > 0.01].sum()),
                             "max_step_ms": 1e3 * float(dt.max()),
                             "full_batch_share": float((st[:, f["rows"]] >= R["max_batch"]).mean())})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench/results/h100_2026-11-27/serve_ample_1.1x"))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--counts", default="500,2000")
    ap.add_argument("--loads", default="1.0,1.1,1.2", help="x the run's saturation rate (82.8 req/s)")
    ap.add_argument("--period-only", action="store_true", help="only the period-fit model")
    ap.add_argument("--runs", default=",".join(map(str, RUNS)), help="run folders (serve.json + serve_steps.npz)")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs.split(",")]
    missing = [str(r / f) for r in runs for f in ("serve.json", "serve_steps.npz") if not (r / f).is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: restore them from git (bench/results/MANIFEST.md)")
    run = json.loads((runs[0] / "serve.json").read_text())
    pool = held_out_pool()
    spec = svr.smollm2_kv_spec()
    cells = all_steps(runs)
    models = {"host+gap fit (sim_vs_real)": svr.fit_step_model(np.concatenate(cells), source="runs 3-4 host+gap fit"),
              "period fit": period_fit(cells)}
    if args.period_only:
        models.pop("host+gap fit (sim_vs_real)")
    sat_real = float(run["saturation_req_s_ample"])
    res = {"real_saturation_req_s": sat_real, "stalls": stall_table(runs), "models": {}, "grid": []}
    for label, model in models.items():
        sus = sd.sustained_saturation(pool, run, "ample", model, spec, seeds=(2000, 2001, 2002))
        res["models"][label] = {"model": model.__dict__, "sim_sustained_req_s": sus}
        print(label, model.__dict__, "sim sustained", round(sus, 2), flush=True)
        for n in map(int, args.counts.split(",")):
            for load in map(float, args.loads.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    cell = {"regime": "ample", "seed": seed, "rate_req_s": load * sat_real}
                    out = svr.simulate_cell(run, cell, pool, model, spec, n_override=n,
                                            policies=("fcfs", "sjf_prompt", "trail", "trail_c0", "oracle"))
                    res["grid"].append({"model": label, "n": n, "load": load, "seed": seed,
                                        **{p: {k: float(m[k]) for k in ("mean_latency", "mean_ttft", "ratio_to_fcfs", "preemptions_total")}
                                           for p, m in out.items()}})
                g = [x for x in res["grid"] if x["model"] == label and x["n"] == n and x["load"] == load]
                print(label, n, load, {p: f"{np.mean([x[p]['ratio_to_fcfs'] for x in g]):.3f}±{np.std([x[p]['ratio_to_fcfs'] for x in g]):.3f}"
                                       for p in ("sjf_prompt", "trail", "trail_c0", "oracle")},
                      "fcfs TTFT %.3f s" % np.mean([x["fcfs"]["mean_ttft"] for x in g]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "knee.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
