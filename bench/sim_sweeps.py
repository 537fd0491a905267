"""Simulator sweeps (issue 12): latency / TTFT vs load per policy, c, aging (p99 / mean trade-off)
and a burst, in two memory regimes, on the recorded length distribution with per-step
predictions recorded from the previous probe (trail/data/sim/recorded_predictions.npz: the 377
requests the probe never trained on, resampled with replacement). Writes sweep.json (raw, not
committed), tables.md and PNG plots to bench/results/sim/.

    python bench/sim_sweeps.py [--n 2000] [--seeds 0,1,2] [--jobs 2] [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

if not __package__:      # run as `python bench/sim_sweeps.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, sim_policies  # noqa: E402
from trail import sim  # noqa: E402
from trail.scheduler_types import POLICIES as SCHEDULER_POLICIES  # noqa: E402

OUT = ROOT / "bench" / "results" / "sim"
LOADS = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2]
POLICIES = sim_policies([*SCHEDULER_POLICIES, "trail_paper"])     # name -> {"policy": ..., options}
C_VALUES = [0.0, 0.5, 0.8, 1.0]
AGING = [0.0, 2.5, 5.0, 10.0, 20.0, 40.0]

_POOL = _SM = _SPEC = None


def _init():
    global _POOL, _SM, _SPEC
    _POOL, _SM, _SPEC = sim.load_recorded(), sim.default_step_model(), sim.llama3_8b_kv_spec()


def _job(args):
    regime, rate, arrivals, name, opts, seed, n = args
    eng = sim.regime_engine(regime, _POOL)
    opts = dict(opts)
    pol = opts.pop("policy")
    arr = sim.poisson_arrivals(n, rate, seed) if arrivals == "poisson" else sim.burst_arrivals(n, rate, seed)
    tr = sim.make_trace(_POOL, arr, "recorded", seed=seed)
    return sim.simulate(tr, eng.with_policy(pol, **opts), _SPEC, _SM, seed=seed).metrics()


def run_grid(tasks, jobs):
    """tasks: list of (group key, job args). Returns {group key: {name: [metrics per seed]}}."""
    with Pool(jobs, initializer=_init) as p:
        res = list(tqdm(p.imap(_job, [t[1] for t in tasks]), total=len(tasks), desc="sim", unit="run"))
    out: dict = {}
    for (key, args), m in zip(tasks, res):
        out.setdefault(key, {}).setdefault(args[3], []).append(m)
    return out


def fmt(x, spec=".2f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="loads 0.8-1.2 only, no c / aging sweeps")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    seeds = [int(s) for s in args.seeds.split(",")]
    n = args.n
    _init()
    t0 = time.time()
    sat = {r: sim.saturation_rate(_POOL, sim.regime_engine(r, _POOL), _SPEC, _SM, n=n) for r in ("ample", "kv")}
    loads = [x for x in LOADS if x >= 0.8] if args.quick else LOADS
    engines = {r: sim.regime_engine(r, _POOL) for r in sat}

    tasks = []
    for r, load, (name, opts), seed in itertools.product(sat, loads, POLICIES.items(), seeds):
        tasks.append((("load", r, load), (r, load * sat[r], "poisson", name, opts, seed, n)))
    for r, (name, opts), seed in itertools.product(sat, POLICIES.items(), seeds):
        tasks.append((("burst", r, 0.9), (r, 0.9 * sat[r], "burst", name, opts, seed, n)))
    if not args.quick:
        for r, load, c, seed in itertools.product(sat, [0.8, 1.0, 1.1, 1.2], C_VALUES, seeds):
            tasks.append((("c", r, load), (r, load * sat[r], "poisson", f"c={c:g}", {"policy": "trail", "c": c}, seed, n)))
        for r, load, seed in itertools.product(sat, [0.8, 1.0, 1.1, 1.2], seeds):
            tasks.append((("c", r, load), (r, load * sat[r], "poisson", "fcfs", {"policy": "fcfs"}, seed, n)))
        for r, load, a, seed in itertools.product(sat, [0.9, 1.0, 1.1], AGING, seeds):
            tasks.append((("aging", r, load), (r, load * sat[r], "poisson", f"aging={a:g}",
                                                 {"policy": "trail", "aging_rate": a, "aging_per_step": 0.0}, seed, n)))
            tasks.append((("aging", r, load), (r, load * sat[r], "poisson", f"oracle aging={a:g}",
                                                 {"policy": "oracle", "aging_rate": a, "aging_per_step": 0.0}, seed, n)))
        for r, load, seed in itertools.product(sat, [0.9, 1.0, 1.1], seeds):
            tasks.append((("aging", r, load), (r, load * sat[r], "poisson", "fcfs", {"policy": "fcfs"}, seed, n)))
    raw = run_grid(tasks, args.jobs)

    # 10,000 requests: wall time of one run per policy (kv regime, 1.0x saturation)
    big = {}
    tr = sim.make_trace(_POOL, sim.poisson_arrivals(10000, sat["kv"], 0), "recorded", seed=0)
    for name in ("fcfs", "trail"):
        t = time.time()
        res = sim.simulate(tr, engines["kv"].with_policy(name), _SPEC, _SM)
        big[name] = {"seconds": time.time() - t, "steps": res.steps}

    summary = {"n": n, "seeds": seeds, "saturation_rps": sat, "step_model": sim.default_step_model().__dict__,
               "engines": {r: {"max_batch": e.max_batch, "num_gpu_blocks": e.num_gpu_blocks,
                               "num_host_blocks": e.num_host_blocks, "block_size": e.block_size,
                               "max_tokens_per_step": e.max_tokens_per_step} for r, e in engines.items()},
               "pool": _POOL.source, "pool_requests": len(_POOL), "ten_thousand_requests": big,
               "groups": {}}
    for key, res in raw.items():
        summary["groups"]["|".join(map(str, key))] = {"compare": sim.compare(res), "raw": res}
    summary["wall_s"] = time.time() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sweep.json").write_text(json.dumps(summary, indent=1, default=float))
    write_tables(summary, loads)
    plot(summary, loads)
    logging.info("done in %.0f s", time.time() - t0)


def _g(summary, kind, regime, load):
    return summary["groups"].get(f"{kind}|{regime}|{load}", {}).get("compare", {})


def write_tables(summary, loads) -> None:
    lines = [f"# Simulator sweeps ({summary['n']} requests per run, seeds {summary['seeds']}, "
             f"recorded predictions; {summary['pool_requests']} held-out requests resampled)", "",
             f"Saturation (fcfs, infinite backlog): ample {summary['saturation_rps']['ample']:.2f} req/s, "
             f"kv {summary['saturation_rps']['kv']:.2f} req/s. Engines: {json.dumps(summary['engines'])}", "",
             "Ratios are per-seed ratios averaged over seeds (± std). oracle frac = trail's share of the "
             "oracle's mean-latency gain over fcfs (n/a where the oracle gains < 10%). rec = recomputed tokens "
             "(mean per run). trail_paper = TRAIL's published rules (margin 0, no aging, no memory options).", ""]
    for regime in ("ample", "kv"):
        lines += [f"## {regime}: latency vs load", "",
                  "| load | policy | mean lat (s) | mean/fcfs | p99/fcfs | TTFT/fcfs | oracle frac | /sjf_prompt | rec tokens | preempt | max of one |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for load in loads:
            c = _g(summary, "load", regime, load)
            for pol in POLICIES:
                d = c.get(pol)
                if not d:
                    continue
                lines.append(
                    f"| {load:.1f} | {pol} | {d['mean_latency']:.2f} ± {d['mean_latency_sd']:.2f} | "
                    f"{d['mean_latency_vs_fcfs']:.3f} ± {d['mean_latency_vs_fcfs_sd']:.3f} | {d['p99_latency_vs_fcfs']:.2f} | "
                    f"{d['mean_ttft_vs_fcfs']:.2f} | {fmt(d.get('oracle_fraction'))} | "
                    f"{d['mean_latency_vs_sjf_prompt']:.3f} | {d['recomputed_tokens']:.0f} | "
                    f"{d['preemptions_total']:.0f} | {d['max_preemptions_of_one']:.0f} |")
        lines.append("")
        c = _g(summary, "burst", regime, 0.9)
        if c:
            lines += [f"### {regime}: burst (half the requests in bursts of 200, 0.9x saturation on average)", "",
                      "| policy | mean/fcfs | p99/fcfs | TTFT/fcfs | oracle frac | rec tokens |", "|---|---|---|---|---|---|"]
            for pol, d in c.items():
                lines.append(f"| {pol} | {d['mean_latency_vs_fcfs']:.3f} | {d['p99_latency_vs_fcfs']:.2f} | "
                             f"{d['mean_ttft_vs_fcfs']:.2f} | {fmt(d.get('oracle_fraction'))} | {d['recomputed_tokens']:.0f} |")
            lines.append("")
        for kind, title in (("c", "c sweep (trail, other options at defaults)"),
                            ("aging", "aging sweep (tokens of key per second waited)")):
            rows = [(load, _g(summary, kind, regime, load)) for load in (0.8, 0.9, 1.0, 1.1, 1.2)]
            rows = [(l, c) for l, c in rows if c]
            if not rows:
                continue
            lines += [f"### {regime}: {title}", "", "| load | variant | mean/fcfs | p99/fcfs | TTFT/fcfs | rec tokens |",
                      "|---|---|---|---|---|---|"]
            for load, c in rows:
                for name, d in c.items():
                    if "mean_latency_vs_fcfs" in d:
                        lines.append(f"| {load:.1f} | {name} | {d['mean_latency_vs_fcfs']:.3f} | "
                                     f"{d['p99_latency_vs_fcfs']:.2f} | {d['mean_ttft_vs_fcfs']:.2f} | "
                                     f"{d['recomputed_tokens']:.0f} |")
            lines.append("")
    big = summary["ten_thousand_requests"]
    lines.append("10,000 requests (kv regime, 1.0x): " + ", ".join(
        f"{k} {v['seconds']:.1f} s ({v['steps']} steps)" for k, v in big.items()))
    (OUT / "tables.md").write_text("\n".join(lines) + "\n")


def plot(summary, loads) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for regime in ("ample", "kv"):
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
        for pol in POLICIES:
            xs, ys = [], {k: [] for k in ("mean_latency", "p99_latency", "mean_ttft", "recomputed_tokens")}
            for load in loads:
                d = _g(summary, "load", regime, load).get(pol)
                if d:
                    xs.append(load)
                    for k in ys:
                        ys[k].append(d[k])
            for ax, (k, v) in zip(axes, ys.items()):
                ax.plot(xs, v, marker="o", label=pol)
                ax.set_xlabel("load (x saturation)")
                ax.set_title(k.replace("_", " ") + (" (s)" if "token" not in k else ""))
        axes[0].legend()
        axes[1].set_yscale("log")
        fig.suptitle(f"{regime} regime: recorded predictions, {summary['n']} requests x {len(summary['seeds'])} seeds")
        fig.tight_layout()
        fig.savefig(OUT / f"latency_vs_load_{regime}.png", dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, regime in zip(axes, ("ample", "kv")):
        for c in C_VALUES:
            xs, ys = [], []
            for load in (0.8, 1.0, 1.1, 1.2):
                d = _g(summary, "c", regime, load).get(f"c={c:g}")
                if d and "mean_latency_vs_fcfs" in d:
                    xs.append(load)
                    ys.append(d["mean_latency_vs_fcfs"])
            ax.plot(xs, ys, marker="o", label=f"c={c:g}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(f"{regime}: trail mean latency / fcfs vs c")
        ax.set_xlabel("load (x saturation)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "c_sweep.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, regime in zip(axes, ("ample", "kv")):
        for load in (0.9, 1.0, 1.1):
            c = _g(summary, "aging", regime, load)
            for prefix, ls in (("", "-"), ("oracle ", "--")):
                pts = [(c[f"{prefix}aging={a:g}"]["mean_latency_vs_fcfs"], c[f"{prefix}aging={a:g}"]["p99_latency_vs_fcfs"], a)
                       for a in AGING if f"{prefix}aging={a:g}" in c]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o",
                        label=f"{'oracle' if prefix else 'trail'} {load:.1f}x")
                for x, y, a in pts:
                    ax.annotate(f"{a:g}", (x, y), fontsize=7)
        ax.axhline(1.5, color="r", lw=0.5)
        ax.set_xlabel("mean latency / fcfs")
        ax.set_ylabel("p99 latency / fcfs")
        ax.set_title(f"{regime}: p99 / mean trade-off over aging rate (labels)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "aging_tradeoff.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
