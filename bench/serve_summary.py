"""The serving verdict's summary (issue 25 item 6): serving runs of bench/serve.py (any number of
sections, each its own folder with serve.json [+ serve_steps.npz]) and the calibrated simulator's
prediction of the same cells -> summary.json, summary.md and plots, and the README's serving
headline, generated from them.

Per (model, regime, load) cell and policy: mean / p50 / p90 / p99 latency, TTFT mean and p99, time
between tokens p50 / p99 and the p99 of each request's longest stall, throughput, preemptions by
mode, recomputed tokens, the share of requests within the SLO (latency <= 2x served alone, from
the run's --solo fit), ratios to fcfs with a 95% interval, the noise floor (|log| of fcfs_repeat /
fcfs per seed), the fraction of the oracle's gain, and the simulator's mean latency and ratio for
the same requests (step model: the package's step_fit_serve_<model>.json unless --step-fit).

Interval: a two-stage bootstrap, seeds resampled and then requests within each drawn seed (pairs:
the same request under both policies), so it covers request sampling and, with >= 2 seeds, the
between-seed spread; with one seed it covers request sampling only, and says so.

    python bench/serve_summary.py RUN_DIR [RUN_DIR ...] [--out bench/results/serve] [--readme README.md]
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

if not __package__:      # run as `python bench/serve_summary.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity import engine_solo_model, slo_attainment, solo_latency_from_fit  # noqa: E402
from bench.common import ROOT, held_out_pool  # noqa: E402
from bench.serve import load_order  # noqa: E402

logger = logging.getLogger("serve_summary")
HEADLINE_START, HEADLINE_END = "<!-- serve-headline:start -->", "<!-- serve-headline:end -->"
METRICS = ("mean_latency_s", "p50_latency_s", "p90_latency_s", "p99_latency_s", "mean_ttft_s", "p99_ttft_s",
           "tbt_p50_s", "tbt_p99_s", "stall_p99_s", "throughput_tok_s", "preemptions", "swaps", "recomputed_tokens")


def two_stage_interval(a: Sequence[np.ndarray], b: Sequence[np.ndarray], resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """95% interval of sum(a) / sum(b) (pooled mean latency ratio) over seeds x paired requests:
    draw seeds with replacement, then requests within each drawn seed."""
    rng = np.random.default_rng(seed)
    k = len(a)
    out = np.empty(resamples)
    for i in range(resamples):
        num = den = 0.0
        for s in (rng.integers(0, k, k) if k > 1 else [0]):
            idx = rng.integers(0, len(a[s]), len(a[s]))
            num += a[s][idx].sum()
            den += b[s][idx].sum()
        out[i] = num / den
    return float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))


def load_runs(dirs: Sequence[Path]) -> list[dict]:
    runs = []
    for d in dirs:
        run = json.loads((Path(d) / "serve.json").read_text())
        run["_dir"] = str(d)
        runs.append(run)
    return runs


def solo_fit(runs: Sequence[Mapping], model: str) -> dict | None:
    """The SLO's solo-latency fit from every --solo measurement of this model's runs."""
    rows = [r["solo"] for r in runs if r.get("solo") and r["model"] == model]
    if not rows:
        return None
    cat = {k: sum((list(r[k]) for r in rows), []) for k in ("prompt_len", "output_len", "latency_s")}
    return engine_solo_model(cat["prompt_len"], cat["output_len"], cat["latency_s"])


def cell_rows(runs: Sequence[Mapping], step_fit: Path | None) -> list[dict]:
    """One row per (model, regime, load, policy), pooled over the seeds found."""
    groups: dict = {}
    for run in runs:
        for c in run["cells"]:
            groups.setdefault((run["model"], c["regime"], c["load"]), []).append((run, c))
    sims = simulate_cells(runs, step_fit)
    rows = []
    for (model, regime, load), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], load_order(kv[0][2]))):
        fit = solo_fit(runs, model)
        names = [n for n in items[0][1]["policies"] if all(n in c["policies"] for _, c in items)]
        base = [np.asarray(c["policies"]["fcfs"]["latency_s"], float) for _, c in items]
        noise = [c.get("noise_floor_log_ratio") for _, c in items]
        for name in names:
            per = [c["policies"][name] for _, c in items]
            lat = [np.asarray(p["latency_s"], float) for p in per]
            row = {"model": model, "regime": regime, "load": load, "policy": name,
                   "device": sorted({r["device"] for r, _ in items}), "seeds": [c["seed"] for _, c in items],
                   "requests_per_seed": int(len(base[0])),
                   "noise_floor_log_ratio": [None if x is None else float(x) for x in noise]}
            for m in METRICS:
                vals = [p.get(m) for p in per if p.get(m) is not None]
                row[m] = float(np.mean(vals)) if vals else None
            row["latency_ratio_to_fcfs"] = float(sum(x.sum() for x in lat) / sum(x.sum() for x in base))
            if name != "fcfs":
                lo, hi = two_stage_interval(lat, base)
                row["latency_ratio_ci95"] = [lo, hi]
            for m in ("p99_latency_s", "mean_ttft_s", "p99_ttft_s", "tbt_p99_s", "throughput_tok_s"):
                f = [p.get(m) for p in (c["policies"]["fcfs"] for _, c in items)]
                mine = [p.get(m) for p in per]
                if all(x is not None for x in f + mine) and min(f) > 0:
                    row[m.removesuffix("_s") + "_ratio_to_fcfs"] = float(np.mean([x / y for x, y in zip(mine, f)]))
            fr = [p.get("oracle_gain_fraction") for p in per]
            row["oracle_gain_fraction"] = float(np.mean(fr)) if all(x is not None for x in fr) else None
            row["preemptions_by_mode"] = {k: float(np.mean([p["telemetry"].get(k, 0.0) for p in per if "telemetry" in p] or [0]))
                                          for k in ("keep", "swap", "recompute")}
            if fit is not None:
                att = []
                for (run, c), p in zip(items, per):
                    pl, ol = cell_lengths(run, c)
                    att.append(slo_attainment(p["latency_s"], solo_latency_from_fit(fit, pl, ol)))
                row["slo_attainment"] = float(np.mean(att))
            sim = [sims.get((run["_dir"], c["regime"], c["load"], c["seed"], name)) for run, c in items]
            if all(s is not None for s in sim):
                row["sim_mean_latency_s"] = float(np.mean([s["sim_mean_s"] for s in sim]))
                row["sim_latency_ratio_to_fcfs"] = float(np.mean([s["sim_ratio"] for s in sim]))
                row["sim_mean_error"] = row["sim_mean_latency_s"] / row["mean_latency_s"] - 1.0
                row["sim_ratio_error"] = row["sim_latency_ratio_to_fcfs"] - float(np.mean(
                    [c["policies"][name]["latency_ratio_to_fcfs"] for _, c in items]))
            rows.append(row)
    return rows


_POOLS: dict = {}


def cell_lengths(run: Mapping, cell: Mapping) -> tuple[list[int], list[int]]:
    """(prompt lengths, output lengths) of a cell's requests, from the pool the run drew."""
    from bench.sim_vs_real import run_recorded

    key = str(run_recorded(run))
    if key not in _POOLS:
        _POOLS[key] = held_out_pool(max_prompt=int(run.get("max_prompt", 512)), max_output=int(run.get("max_output", 512)),
                                    recorded=run_recorded(run))
    pool = _POOLS[key]
    where = {k: i for i, k in enumerate(pool["ids"])}
    idx = [where[k] for k in cell["request_ids"]]
    return pool["prompt_len"][idx].tolist(), pool["output_len"][idx].tolist()


def simulate_cells(runs: Sequence[Mapping], step_fit: Path | None) -> dict:
    """(run dir, regime, load, seed, policy) -> the simulator's row for the same requests."""
    from bench import sim_vs_real as svr
    from trail import sim

    out = {}
    for run in runs:
        if not run["cells"]:
            continue
        path = step_fit or sim.DATA_DIR / f"step_fit_serve_{str(run['model']).removeprefix('random:')}.json"
        if not Path(path).is_file():
            logger.warning("no step fit %s: no simulator column for %s", path, run["_dir"])
            continue
        res = svr.compare_run(Path(run["_dir"]), sim.StepTimeModel.from_json(path))
        for r in res["rows"]:
            out[(run["_dir"], r["regime"], r["load"], r["seed"], r["policy"])] = dict(r, step_model=res["step_model"]["source"])
    return out


def capacity_rows(runs: Sequence[Mapping]) -> list[dict]:
    """Capacity at the SLO per (model, regime, policy) from every run that searched it; x_fcfs
    against fcfs's capacity of the same model and regime, whichever run (section) found it."""
    rows = []
    for run in runs:
        cap = run.get("capacity") or {}
        for name, found in cap.get("policies", {}).items():
            rows.append({"model": run["model"], "regime": cap["regime"], "policy": name, "device": run["device"],
                         "capacity_req_s": found["capacity"], "x_saturation": found.get("capacity_x_saturation"),
                         "converged": found["converged"], "monotone": found["monotone"],
                         "evaluations": len(found["evaluations"]), "solo_fit": cap.get("solo_fit")})
    fcfs = {(r["model"], r["regime"]): r["capacity_req_s"] for r in rows if r["policy"] == "fcfs"}
    for r in rows:
        base = fcfs.get((r["model"], r["regime"]))
        r["x_fcfs"] = None if not base or r["capacity_req_s"] is None else r["capacity_req_s"] / base
    return rows


def headline(rows: Sequence[Mapping], caps: Sequence[Mapping]) -> str:
    """The README's serving paragraph, from the rows (nothing typed by hand)."""
    trail = [r for r in rows if r["policy"] == "trail"]
    if not trail:
        return "Serving: no GPU-bound serving run summarized yet."
    lines = []
    for r in trail:
        sj = next((x for x in rows if x["policy"] == "sjf_prompt" and all(x[k] == r[k] for k in ("model", "regime", "load"))), None)
        orc = next((x for x in rows if x["policy"] == "oracle" and all(x[k] == r[k] for k in ("model", "regime", "load"))), None)
        noise = max((x for x in r["noise_floor_log_ratio"] if x is not None), default=None)
        ci = r.get("latency_ratio_ci95", [math.nan, math.nan])
        lines.append(f"| {Path(str(r['model'])).name} | {r['regime']} | {r['load']} | {len(r['seeds'])} x {r['requests_per_seed']} | "
                     f"{r['latency_ratio_to_fcfs']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                     f"{'' if sj is None else format(sj['latency_ratio_to_fcfs'], '.3f')} | "
                     f"{'' if orc is None else format(orc['latency_ratio_to_fcfs'], '.3f')} | "
                     f"{'' if r.get('p99_latency_ratio_to_fcfs') is None else format(r['p99_latency_ratio_to_fcfs'], '.2f')} | "
                     f"{'' if r.get('mean_ttft_ratio_to_fcfs') is None else format(r['mean_ttft_ratio_to_fcfs'], '.2f')} | "
                     f"{'' if noise is None else format(100 * noise, '.2f') + '%'} |")
    devices = sorted({d for r in trail for d in r["device"]})
    text = [f"Serving (GPU-bound runs on {', '.join(devices)}; Llama-3-8B shape with random weights fed the shipped "
            "SmolLM2 probe's recorded per-step predictions; ratios are mean latency over fcfs's on the same requests; "
            "the interval is a 95% two-stage bootstrap over seeds and paired requests (request sampling only where "
            "one seed ran); noise = |log(fcfs_repeat / fcfs)|, the largest over seeds):", "",
            "| model | regime | load | seeds x requests | trail / fcfs [95%] | sjf_prompt / fcfs | oracle / fcfs | "
            "trail p99 / fcfs | trail TTFT / fcfs | noise |", "|" + "---|" * 10] + lines
    byp = {(c["model"], c["policy"]): c for c in caps}
    for model in sorted({c["model"] for c in caps}):
        t, f = byp.get((model, "trail")), byp.get((model, "fcfs"))
        if t and f and t.get("x_fcfs") is not None:
            text += ["", f"Capacity at the SLO ({Path(str(model)).name}, {t['regime']}; latency <= 2x served alone for "
                     f"90% of requests): trail serves {t['x_fcfs']:.2f}x fcfs's load ({t['capacity_req_s']:.1f} vs "
                     f"{f['capacity_req_s']:.1f} req/s)."]
    return "\n".join(text)


def markdown(summary: Mapping) -> str:
    f = lambda v, s=".3f": "" if v is None else format(v, s)  # noqa: E731
    lines = ["# Serving verdict: summary", "", f"Generated by `{summary['command']}` from {len(summary['runs'])} run "
             f"folder(s) on {', '.join(summary['devices'])}. Interval: {summary['interval_covers']}", "",
             "## Headline", "", summary["headline"], "", "## Every cell", "",
             "| model | regime | load | policy | seeds | mean s | / fcfs [95%] | p99 / fcfs | TTFT / fcfs | TBT p99 ms | "
             "stall p99 s | thr / fcfs | preempt (keep/swap/recomp) | oracle frac | SLO met | sim mean s (err) | sim / fcfs (err) |",
             "|" + "---|" * 17]
    for r in summary["cells"]:
        ci = r.get("latency_ratio_ci95")
        pm = r["preemptions_by_mode"]
        lines.append(
            f"| {Path(str(r['model'])).name} | {r['regime']} | {r['load']} | {r['policy']} | {len(r['seeds'])} | {f(r['mean_latency_s'])} | "
            f"{f(r['latency_ratio_to_fcfs'])}{'' if ci is None else f' [{ci[0]:.3f}, {ci[1]:.3f}]'} | "
            f"{f(r.get('p99_latency_ratio_to_fcfs'), '.2f')} | {f(r.get('mean_ttft_ratio_to_fcfs'), '.2f')} | "
            f"{f(None if r['tbt_p99_s'] is None else 1e3 * r['tbt_p99_s'], '.1f')} | {f(r['stall_p99_s'], '.2f')} | "
            f"{f(r.get('throughput_tok_ratio_to_fcfs'))} | {pm['keep']:.0f}/{pm['swap']:.0f}/{pm['recompute']:.0f} | "
            f"{f(r['oracle_gain_fraction'], '.2f')} | {f(r.get('slo_attainment'), '.1%')} | "
            f"{f(r.get('sim_mean_latency_s'))} ({f(r.get('sim_mean_error'), '+.1%')}) | "
            f"{f(r.get('sim_latency_ratio_to_fcfs'))} ({f(r.get('sim_ratio_error'), '+.3f')}) |")
    if summary["capacity"]:
        lines += ["", "## Capacity at the SLO", "", "| model | regime | policy | capacity req/s | x fcfs | x saturation | "
                  "converged | monotone | evaluations |", "|" + "---|" * 9]
        for c in summary["capacity"]:
            lines.append(f"| {Path(str(c['model'])).name} | {c['regime']} | {c['policy']} | {f(c['capacity_req_s'], '.2f')} | "
                         f"{f(c['x_fcfs'])} | {f(c['x_saturation'])} | {c['converged']} | {c['monotone']} | {c['evaluations']} |")
    lines += ["", "## Acceptance checks (issue 25)", ""] + [f"- {k}: {v}" for k, v in summary["checks"].items()]
    return "\n".join(lines) + "\n"


def checks(rows: Sequence[Mapping]) -> dict:
    """Issue 25's acceptance lines, computed: noise floor <= 1%, headline half-width <= 3%,
    simulator mean within 5% and ratio within +-0.02, per cell."""
    noise = [x for r in rows if r["policy"] == "fcfs" for x in r["noise_floor_log_ratio"] if x is not None]
    half = [(r["latency_ratio_ci95"][1] - r["latency_ratio_ci95"][0]) / 2 for r in rows
            if r["policy"] == "trail" and "latency_ratio_ci95" in r]
    sim_rows = [r for r in rows if "sim_mean_error" in r]
    return {"noise floor max |log(fcfs_repeat/fcfs)| (<= 1%)": f"{100 * max(noise):.2f}%" if noise else "n/a",
            "trail interval half-width, worst cell (<= 3%)": f"{100 * max(half):.1f}%" if half else "n/a",
            "simulator mean latency within 5%": f"{sum(abs(r['sim_mean_error']) <= 0.05 for r in sim_rows)} of {len(sim_rows)} rows",
            "simulator ratio within +-0.02": f"{sum(abs(r['sim_ratio_error']) <= 0.02 for r in sim_rows)} of {len(sim_rows)} rows"}


def update_readme(path: Path, text: str) -> None:
    body = path.read_text()
    if HEADLINE_START not in body:
        raise SystemExit(f"{path}: no {HEADLINE_START} ... {HEADLINE_END} block to fill")
    head, rest = body.split(HEADLINE_START, 1)
    _, tail = rest.split(HEADLINE_END, 1)
    path.write_text(f"{head}{HEADLINE_START}\n{text}\n{HEADLINE_END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve")
    ap.add_argument("--step-fit", type=Path, default=None, help="the simulator's step model (default: package fit)")
    ap.add_argument("--readme", type=Path, default=None, help="fill this README's serve-headline block")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = load_runs(args.runs)
    rows = cell_rows(runs, args.step_fit)
    caps = capacity_rows(runs)
    summary = {"command": "python bench/serve_summary.py " + " ".join(str(r) for r in args.runs),
               "runs": [r["_dir"] for r in runs], "devices": sorted({r["device"] for r in runs}),
               "interval_covers": ("95% two-stage bootstrap: seeds, then paired requests within each seed (with one "
                                   "seed: request sampling only)"),
               "saturation": {r["_dir"]: {k: v for k, v in r.items() if k.startswith("saturation_req_s_")} for r in runs},
               "solo_fit": {m: solo_fit(runs, m) for m in sorted({r["model"] for r in runs})},
               "cells": rows, "capacity": caps, "headline": headline(rows, caps), "checks": checks(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))
    from bench.serve_plots import plot_all

    plot_all(runs, rows, args.out)
    if args.readme:
        update_readme(args.readme, summary["headline"])
    logger.info("wrote %s", args.out / "summary.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
