"""Issue 15 item 3 in the simulator: what would ordering the *waiting* queue by the prefill probe
buy, against the bag-of-embeddings prompt predictor the engine uses today? Same recorded per-step
predictions of the new probe (recorded_test_new.npz) in both arms; only the prompt-time total that
orders admission differs: `boe` (as recorded) or `prefill` (the filter's estimate at g = 0, i.e.
the prefill probe's readout). The prefill's own cost (a prefill before admission, holding or
discarding its KV) is NOT charged, so `prefill` is an upper bound on that design. fcfs and the
oracle do not read predictions and run once per seed. Paired per seed; no 10% gate.

    mkdir -p /tmp/gr && tar -C /tmp/gr -xzf bench/results/predictor/gpu_run_2026-11-27b/predictor_results.tar.gz
    python bench/results/predictor/gpu_run_2026-11-27b/admission_ablation.py /tmp/gr 0-5
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from trail import sim

HERE = Path(__file__).parent
N = 2000


def main(root: str, seeds: str = "0-5") -> None:
    a, b = (int(x) for x in seeds.split("-"))
    seeds = list(range(a, b + 1))
    boe = sim.load_recorded(Path(root) / "recorded_test_new.npz")
    assert (boe.output_len > 0).all()
    prefill = dataclasses.replace(boe, prompt_pred=boe.pred[boe.cu[:-1]].astype(np.float64),
                                  source=boe.source + " (prompt_pred = prefill probe)")
    sm, spec = sim.default_step_model(), sim.llama3_8b_kv_spec()
    out = {"n": N, "seeds": seeds, "regimes": {}}
    lines = ["| regime | load | oracle gain | policy | boe: frac of oracle gain | prefill: frac | prefill - boe (seeds better) | mean/fcfs boe -> prefill |",
             "|---|---|---|---|---|---|---|---|"]
    for regime in ("ample", "kv"):
        eng = sim.regime_engine(regime, boe)
        sat = sim.saturation_rate(boe, eng, spec, sm, n=N)
        out["regimes"][regime] = {"saturation_rps": sat, "loads": {}}
        for load in (1.0, 1.1):
            arr = lambda k, s, r=load * sat: sim.poisson_arrivals(k, r, s)  # noqa: E731
            base = sim.run_policies(boe, eng, spec, sm, arr, seeds, {"fcfs": {"policy": "fcfs"},
                                                                    "oracle": {"policy": "oracle"}}, "recorded", n=N)
            f = np.array([r["mean_latency"] for r in base["fcfs"]])
            o = np.array([r["mean_latency"] for r in base["oracle"]])
            cell = {"oracle_gain": (1 - o / f).tolist()}
            res = {name: sim.run_policies(pool, eng, spec, sm, arr, seeds, {"trail": {"policy": "trail"},
                                                                            "sjf_prompt": {"policy": "sjf_prompt"}},
                                          "recorded", n=N) for name, pool in (("boe", boe), ("prefill", prefill))}
            for pol in ("trail", "sjf_prompt"):
                m = {k: np.array([r["mean_latency"] for r in res[k][pol]]) for k in res}
                fr = {k: (f - m[k]) / (f - o) for k in m}
                d = fr["prefill"] - fr["boe"]
                cell[pol] = {k: {"oracle_fraction": fr[k].tolist(), "mean_vs_fcfs": (m[k] / f).tolist()} for k in m}
                lines.append(f"| {regime} | {load:g} | {np.mean(1 - o / f):.1%} | {pol} | {fr['boe'].mean():.2f} "
                             f"| {fr['prefill'].mean():.2f} | {d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f} "
                             f"({int((d > 0).sum())}/{len(d)}) | {np.mean(m['boe'] / f):.3f} -> {np.mean(m['prefill'] / f):.3f} |")
            out["regimes"][regime]["loads"][f"{load:g}"] = cell
            print(lines[-2], lines[-1], sep="\n", flush=True)
    (HERE / "judge" / "admission_ablation.json").write_text(json.dumps(out, indent=1))
    (HERE / "judge" / "admission_ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
