"""Markdown tables from judge/{new,shipped}_<regime>.json and judge/paired_<regime>.json (written by
paired_judge.py). Run from the repo root:

    python bench/results/predictor/gpu_run_2026-11-27b/judge_tables.py > bench/results/predictor/gpu_run_2026-11-27b/judge/tables.md
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

J = Path(__file__).parent / "judge"


def f(x, s=".3f"):
    return "n/a" if x is None else format(x, s)


def ms(x):
    x = np.asarray(x, float)
    return f"{x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(len(x)):.3f}"


for regime in ("ample", "kv"):
    P = json.loads((J / f"paired_{regime}.json").read_text())
    jd = {p: json.loads((J / f"{p}_{regime}.json").read_text()) for p in ("new", "shipped")}
    k = len(P["seeds"])
    print(f"\n### {regime} regime: fcfs saturation {P['saturation_rps']:.2f} req/s, {P['n']} requests per run, "
          f"seeds {P['seeds'][0]}-{P['seeds'][-1]}\n")
    print("Judge view (`sim.compare`: oracle fraction averaged over seeds where the oracle gains >= 10%):\n")
    print("| load | oracle mean/fcfs (seeds gated in) | policy | new: mean/fcfs, frac ± sd over gated seeds, p99/fcfs | shipped: same |")
    print("|---|---|---|---|---|")
    for load in P["loads"]:
        o = jd["new"]["loads"][load]["oracle"]
        for i, pol in enumerate(("trail", "sjf_prompt")):
            cells = []
            for p in ("new", "shipped"):
                d = jd[p]["loads"][load][pol]
                cells.append(f"{f(d['mean_latency_vs_fcfs'])}, {f(d['oracle_fraction'], '.2f')}"
                             f"{'' if d['oracle_fraction'] is None else ' ± ' + f(d['oracle_fraction_sd'], '.2f')}, "
                             f"{f(d['p99_latency_vs_fcfs'], '.2f')}")
            lead = f"| {load} | {f(o['mean_latency_vs_fcfs'])} ({o['oracle_fraction_seeds']}/{k}) |" if i == 0 else "| | |"
            print(f"{lead} {pol} | {cells[0]} | {cells[1]} |")
    print("\nPaired per seed, no gate (fraction = (fcfs - policy) / (fcfs - oracle) of mean latency; mean ± se over seeds):\n")
    print("| load | oracle gain (min) | trail new | trail shipped | trail new - shipped (new better) | "
          "sjf_prompt new | sjf_prompt shipped | sjf_prompt new - shipped (new better) |")
    print("|---|---|---|---|---|---|---|---|")
    for load, r in P["loads"].items():
        g = np.array(r["oracle_gain"])
        dt, ds = r["diff/trail"], r["diff/sjf_prompt"]
        print(f"| {load} | {100 * g.mean():.1f}% ({100 * g.min():.1f}%) | {ms(r['new/trail']['oracle_fraction'])} | "
              f"{ms(r['shipped/trail']['oracle_fraction'])} | {dt['mean']:+.3f} ± {dt['se']:.3f} ({dt['new_better_seeds']}/{k}) | "
              f"{ms(r['new/sjf_prompt']['oracle_fraction'])} | {ms(r['shipped/sjf_prompt']['oracle_fraction'])} | "
              f"{ds['mean']:+.3f} ± {ds['se']:.3f} ({ds['new_better_seeds']}/{k}) |")
    print("\nMean latency / fcfs, paired per seed (mean over seeds):\n")
    print("| load | oracle | trail new | trail shipped | sjf_prompt new | sjf_prompt shipped | p99/fcfs trail new / shipped | p99/fcfs sjf_prompt new / shipped |")
    print("|---|---|---|---|---|---|---|---|")
    for load, r in P["loads"].items():
        m = lambda key, sub="mean_vs_fcfs": np.mean(r[key][sub])  # noqa: E731
        print(f"| {load} | {np.mean(r['oracle_mean_vs_fcfs']):.3f} | {m('new/trail'):.3f} | {m('shipped/trail'):.3f} | "
              f"{m('new/sjf_prompt'):.3f} | {m('shipped/sjf_prompt'):.3f} | {m('new/trail', 'p99_vs_fcfs'):.2f} / "
              f"{m('shipped/trail', 'p99_vs_fcfs'):.2f} | {m('new/sjf_prompt', 'p99_vs_fcfs'):.2f} / "
              f"{m('shipped/sjf_prompt', 'p99_vs_fcfs'):.2f} |")
    print(f"\n(CPU time of this regime's judge: {P.get('cpu_seconds', float('nan')):.0f} s)")
