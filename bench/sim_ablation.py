"""Leave-one-out ablation of trail's memory-aware defaults in the kv regime (memory binds), on
the recorded trace with recorded predictions: each option set back to TRAIL's published value
(or to another value) with the others at their defaults. Writes bench/results/sim/ablation.json
and ablation.md.

    python bench/sim_ablation.py [--n 2000] [--seeds 0,1,2] [--jobs 2]
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

if not __package__:      # run as `python bench/sim_ablation.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import sim_sweeps as S  # noqa: E402
from bench.common import sim_policies  # noqa: E402
from trail import sim  # noqa: E402

VARIANTS = {
    **sim_policies(["fcfs", "oracle"]),
    "trail (defaults)": {"policy": "trail"},
    **sim_policies(["trail_paper"]),
    "admit_reserve=0": {"policy": "trail", "admit_reserve": 0.0},
    "admit_reserve=0.5": {"policy": "trail", "admit_reserve": 0.5},
    "admit_reserve=1": {"policy": "trail", "admit_reserve": 1.0},
    "max_forced_evictions=0": {"policy": "trail", "max_forced_evictions": 0},
    "evict_kv_weight=0": {"policy": "trail", "evict_kv_weight": 0.0},
    "resume_forced_first=false": {"policy": "trail", "resume_forced_first": False},
    "memory_preemption=true": {"policy": "trail", "memory_preemption": True},
    "margin=0": {"policy": "trail", "margin": 0.0},
    "aging=0": {"policy": "trail", "aging_rate": 0.0, "aging_per_step": 0.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    seeds = [int(s) for s in args.seeds.split(",")]
    S._init()
    sat = sim.saturation_rate(S._POOL, sim.regime_engine("kv", S._POOL), S._SPEC, S._SM, n=args.n)
    tasks = [(("kv", load), ("kv", load * sat, "poisson", name, opts, seed, args.n))
             for load, (name, opts), seed in itertools.product([1.0, 1.1], VARIANTS.items(), seeds)]
    raw = S.run_grid(tasks, args.jobs)
    out = {f"kv|{load}": {"compare": sim.compare(res), "raw": res} for (_, load), res in raw.items()}
    Path(S.OUT / "ablation.json").write_text(json.dumps({"saturation_rps": sat, "groups": out}, indent=1, default=float))
    lines = [f"# Ablation, kv regime ({args.n} requests x seeds {seeds}, recorded predictions)", "",
             "| load | variant | mean/fcfs | p99/fcfs | TTFT/fcfs | oracle frac | rec tokens | preempt | max of one |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, g in out.items():
        for name, d in g["compare"].items():
            lines.append(f"| {key.split('|')[1]} | {name} | {d['mean_latency_vs_fcfs']:.3f} ± {d['mean_latency_vs_fcfs_sd']:.3f} | "
                         f"{d['p99_latency_vs_fcfs']:.2f} | {d['mean_ttft_vs_fcfs']:.2f} | {S.fmt(d.get('oracle_fraction'))} | "
                         f"{d['recomputed_tokens']:.0f} | {d['preemptions_total']:.0f} | {d['max_preemptions_of_one']:.0f} |")
    (S.OUT / "ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
