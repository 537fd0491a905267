"""Per-seed paired comparison of the new and shipped probes' recorded predictions in the simulator
(trail.sim, as `trail judge` runs it): same requests and arrivals per seed for both; fcfs and oracle
do not read the recorded predictions (checked: same pool lengths), so they run once. Reports the
fraction of the oracle's mean-latency gain per seed without the 10% gate, and the paired difference.

    python paired_judge.py /tmp/gr ample 1.0,1.1 0-9   -> paired_judge_<regime>.json next to this file
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from trail import sim


def main(root, regime="ample", loads="1.0,1.1", seeds="0-9"):
    root = Path(root)
    a, b = (int(x) for x in seeds.split("-"))
    seeds = list(range(a, b + 1))
    pools = {p: sim.load_recorded(root / f"recorded_test_{p}.npz") for p in ("new", "shipped")}
    pn, ps = pools["new"], pools["shipped"]
    assert (pn.output_len == ps.output_len).all() and (pn.prompt_len == ps.prompt_len).all()
    sm, spec = sim.default_step_model(), sim.llama3_8b_kv_spec()
    eng = sim.regime_engine(regime, pn)
    sat = sim.saturation_rate(pn, eng, spec, sm, n=2000)
    out = {"regime": regime, "saturation_rps": sat, "seeds": seeds, "loads": {}}
    for load in (float(x) for x in loads.split(",")):
        arr = lambda k, s, r=load * sat: sim.poisson_arrivals(k, r, s)  # noqa: E731
        base = sim.run_policies(pn, eng, spec, sm, arr, seeds, {"fcfs": {"policy": "fcfs"},
                                                                  "oracle": {"policy": "oracle"}}, "recorded")
        f = np.array([r["mean_latency"] for r in base["fcfs"]])
        o = np.array([r["mean_latency"] for r in base["oracle"]])
        row = {"fcfs_mean": f.tolist(), "oracle_gain": ((f - o) / f).tolist()}
        fr = {}
        for p, pool in pools.items():
            res = sim.run_policies(pool, eng, spec, sm, arr, seeds, {"trail": {"policy": "trail"},
                                                                       "sjf_prompt": {"policy": "sjf_prompt"}},
                                   "recorded")
            for pol, runs in res.items():
                m = np.array([r["mean_latency"] for r in runs])
                p99 = np.array([r["p99_latency"] for r in runs])
                fr[(p, pol)] = (f - m) / (f - o)
                row[f"{p}/{pol}"] = {"mean_vs_fcfs": (m / f).tolist(), "oracle_fraction": fr[(p, pol)].tolist(),
                                     "p99": p99.tolist()}
        for pol in ("trail", "sjf_prompt"):
            d = fr[("new", pol)] - fr[("shipped", pol)]
            row[f"diff/{pol}"] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
        out["loads"][f"{load:g}"] = row
        g = np.array(row["oracle_gain"])
        print(f"{regime} load {load:g}: oracle gain {g.mean():.3f} (min {g.min():.3f})")
        for p in ("new", "shipped"):
            for pol in ("trail", "sjf_prompt"):
                x = fr[(p, pol)]
                print(f"  {p:8s} {pol:10s} oracle fraction {x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(len(x)):.3f} (se)")
        for pol in ("trail", "sjf_prompt"):
            print(f"  new - shipped {pol}: {row[f'diff/{pol}']['mean']:+.3f} ± {row[f'diff/{pol}']['se']:.3f} (se)")
    (Path(__file__).parent / f"paired_judge_{regime}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
