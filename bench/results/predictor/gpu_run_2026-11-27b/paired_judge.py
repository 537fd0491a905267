"""Simulator judge of the new and shipped probes' recorded predictions (trail.sim, the way
`trail judge` / trail.predictor.sim_judge.judge runs it), paired per seed: the same requests and
arrivals per seed for both. fcfs and oracle do not read the recorded predictions (checked: same
pool lengths, and identical fcfs/oracle latencies on both pools), so they run once per seed and
load. Writes, per regime:
  judge/{new,shipped}_<regime>.json / .md  same content and format as sim_judge.judge / format_judge
                                           (oracle fraction gated at >= 10% oracle gain, per sim.compare)
  judge/paired_<regime>.json               per-seed fractions of the oracle's gain without the gate,
                                           mean/fcfs, p99, and the paired new - shipped difference

Run from the repo root (extract predictor_results.tar.gz first; the npz files are at
<dir>/recorded_test_new.npz and <dir>/cross/recorded_test_shipped.npz):

    python bench/results/predictor/gpu_run_2026-11-27b/paired_judge.py /tmp/gr ample 0.9,1.0,1.1 0-11
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from trail import sim
from trail.predictor.recorded import check_recorded
from trail.predictor.sim_judge import format_judge

HERE = Path(__file__).parent
N = 2000


def main(root, regime="ample", loads="0.9,1.0,1.1", seeds="0-11"):
    root = Path(root)
    a, b = (int(x) for x in seeds.split("-"))
    seeds = list(range(a, b + 1))
    loads = [float(x) for x in loads.split(",")]
    files = {"new": root / "recorded_test_new.npz", "shipped": root / "cross" / "recorded_test_shipped.npz"}
    pools = {p: sim.load_recorded(f) for p, f in files.items()}
    pn, ps = pools["new"], pools["shipped"]
    assert (pn.output_len == ps.output_len).all() and (pn.prompt_len == ps.prompt_len).all()
    sm, spec = sim.default_step_model(), sim.llama3_8b_kv_spec()
    eng = sim.regime_engine(regime, pn)
    sat = sim.saturation_rate(pn, eng, spec, sm, n=N)
    judged = {p: {"npz": str(files[p]), "meta": check_recorded(files[p]), "regime": regime, "n": N, "seeds": seeds,
                  "saturation_rps": sat, "pool_requests": len(pools[p]), "loads": {}} for p in pools}
    paired = {"regime": regime, "saturation_rps": sat, "n": N, "seeds": seeds, "loads": {}}
    t0 = time.time()
    for load in loads:
        arr = lambda k, s, r=load * sat: sim.poisson_arrivals(k, r, s)  # noqa: E731
        base = sim.run_policies(pn, eng, spec, sm, arr, seeds, {"fcfs": {"policy": "fcfs"},
                                                                  "oracle": {"policy": "oracle"}}, "recorded", n=N)
        f = np.array([r["mean_latency"] for r in base["fcfs"]])
        o = np.array([r["mean_latency"] for r in base["oracle"]])
        gains = (1.0 - o / f).tolist()
        row = {"fcfs_mean": f.tolist(), "oracle_mean_vs_fcfs": (o / f).tolist(), "oracle_gain": gains,
               "oracle_p99_vs_fcfs": [r["p99_latency"] / x["p99_latency"] for r, x in zip(base["oracle"], base["fcfs"])]}
        fr = {}
        for p, pool in pools.items():
            res = sim.run_policies(pool, eng, spec, sm, arr, seeds, {"trail": {"policy": "trail"},
                                                                       "sjf_prompt": {"policy": "sjf_prompt"}},
                                   "recorded", n=N)
            # the judge's view (sim.compare over all four policies, same as sim_judge.judge)
            raw = {"fcfs": base["fcfs"], "sjf_prompt": res["sjf_prompt"], "trail": res["trail"], "oracle": base["oracle"]}
            cmp = sim.compare(raw)
            rows = {q: {k: cmp[q].get(k) for k in (
                "mean_latency", "mean_latency_vs_fcfs", "p99_latency_vs_fcfs", "mean_ttft_vs_fcfs", "oracle_fraction",
                "oracle_fraction_sd", "mean_latency_vs_sjf_prompt")} for q in cmp}
            for d in rows.values():
                d["oracle_fraction_seeds"] = sum(g >= 0.1 for g in gains)
                d["oracle_gain_per_seed"] = gains
            judged[p]["loads"][f"{load:g}"] = rows
            for pol, runs in res.items():
                m = np.array([r["mean_latency"] for r in runs])
                p99 = np.array([r["p99_latency"] for r in runs])
                fp99 = np.array([r["p99_latency"] for r in base["fcfs"]])
                fr[(p, pol)] = (f - m) / (f - o)
                row[f"{p}/{pol}"] = {"mean_vs_fcfs": (m / f).tolist(), "oracle_fraction": fr[(p, pol)].tolist(),
                                     "p99_vs_fcfs": (p99 / fp99).tolist()}
        for pol in ("trail", "sjf_prompt"):
            d = fr[("new", pol)] - fr[("shipped", pol)]
            row[f"diff/{pol}"] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
                                  "new_better_seeds": int((d > 0).sum())}
        paired["loads"][f"{load:g}"] = row
        g = np.array(gains)
        print(f"{regime} load {load:g}: oracle gain {g.mean():.3f} (min {g.min():.3f}) [{time.time() - t0:.0f} s]",
              flush=True)
        for p in pools:
            for pol in ("trail", "sjf_prompt"):
                x = fr[(p, pol)]
                print(f"  {p:8s} {pol:10s} oracle fraction {x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(len(x)):.3f} (se)")
        for pol in ("trail", "sjf_prompt"):
            dd = row[f"diff/{pol}"]
            print(f"  new - shipped {pol}: {dd['mean']:+.3f} ± {dd['se']:.3f} (se), new better in "
                  f"{dd['new_better_seeds']}/{len(seeds)} seeds")
    paired["cpu_seconds"] = time.process_time()
    out = HERE / "judge"
    out.mkdir(exist_ok=True)

    def clean(x):  # NaN -> null in the JSON
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    for p, res in judged.items():
        (out / f"{p}_{regime}.json").write_text(json.dumps(clean(res), indent=1))
        (out / f"{p}_{regime}.md").write_text(format_judge(res) + "\n")
    (out / f"paired_{regime}.json").write_text(json.dumps(clean(paired), indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
