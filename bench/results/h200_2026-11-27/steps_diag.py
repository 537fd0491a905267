"""Per-run step telemetry diagnostics of the H200 serving runs (serve_steps.npz): step period
(start to start), stalls, how full the batch was, host time per step; and whether the runs that
were slow against the simulator (sim_vs_real_*/sim_vs_real.json) were slow per step.

    python bench/results/h200_2026-11-27/steps_diag.py NPZ [NPZ ...]

(the three serve_steps.npz over 3 MB are not kept in this folder; they were read from the
extracted round folders /tmp/r1/serve_{ample,kv}, /tmp/r2/serve_kv2/loads.) Writes steps_diag.md
and steps_diag.json next to this file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def diag(st: np.ndarray, fields: list[str]) -> dict:
    f = {n: i for i, n in enumerate(fields)}
    t = st[:, f["t"]]
    dt = np.diff(t)
    rows = st[:, f["rows"]]
    host = st[:, f["host_s"]]
    sync = st[:, f["sync_wait_s"]]
    dec = dt[(st[:-1, f["prefill_tokens"]] == 0)]
    return {"steps": int(len(st)), "span_s": float(t[-1] - t[0]) if len(t) else 0.0,
            "period_med_ms": float(np.median(dt) * 1e3) if len(dt) else np.nan,
            "period_mean_ms": float(dt.mean() * 1e3) if len(dt) else np.nan,
            "decode_period_med_ms": float(np.median(dec) * 1e3) if len(dec) else np.nan,
            "stalls_10ms": int((dt > 0.010).sum()), "stall_s": float(dt[dt > 0.010].sum()),
            "max_gap_ms": float(dt.max() * 1e3) if len(dt) else np.nan,
            "rows_mean": float(rows.mean()), "cap_share": float((rows >= 48).mean()),
            "host_ms_mean": float(host.mean() * 1e3), "sync_ms_mean": float(sync.mean() * 1e3)}


def main(paths):
    out = {}
    for p in paths:
        d = np.load(p)
        fields = [str(x) for x in d["fields"]]
        for k in d.files:
            if k.startswith("steps/") and not k.startswith("steps/sat/"):
                _, regime, load, seed, name = k.split("/")
                out[f"{regime}|{load}|{seed}|{name}|{Path(p).parent.name}"] = dict(diag(d[k], fields), src=str(p))
    # join with sim_vs_real (real / sim mean latency per run)
    svr = {}
    for f in HERE.glob("sim_vs_real_*/sim_vs_real.json"):
        for run in json.loads(f.read_text()):
            for r in run["rows"]:
                svr[(r["regime"], str(r["load"]), int(r["seed"]), r["policy"])] = r
    lines = ["| regime | load | seed | policy | steps | span s | period median ms | period mean ms | stalls > 10 ms (s) | max gap ms | "
             "rows mean | batch-cap share | host ms/step | real / sim mean latency | real / sim preemptions |", "|" + "---|" * 15]
    rs = []
    for key, v in sorted(out.items(), key=lambda kv: (kv[0].split("|")[0], kv[0].split("|")[1], kv[0].split("|")[2])):
        regime, load, seed, name, _ = key.split("|")
        s = svr.get((regime, load, int(seed), name))
        rr = s["real_mean_s"] / s["sim_mean_s"] if s else np.nan
        v["real_over_sim"] = rr
        rs.append((v["period_mean_ms"], v["stall_s"], v["cap_share"], rr, regime))
        lines.append(f"| {regime} | {load} | {seed} | {name} | {v['steps']} | {v['span_s']:.2f} | {v['period_med_ms']:.3f} | "
                     f"{v['period_mean_ms']:.3f} | {v['stalls_10ms']} ({v['stall_s']:.2f}) | {v['max_gap_ms']:.0f} | {v['rows_mean']:.1f} | "
                     f"{v['cap_share']:.0%} | {v['host_ms_mean']:.3f} | {rr:.2f} | "
                     f"{(str(s['real_preemptions']) + ' / ' + str(s['sim_preemptions'])) if s else ''} |")
    a = np.array([r[:4] for r in rs if not np.isnan(r[3])], float)
    summ = []
    if len(a) > 2:
        summ.append(f"over {len(a)} runs with a sim counterpart: corr(real/sim latency, mean step period) = "
                    f"{np.corrcoef(a[:, 3], a[:, 0])[0, 1]:.2f}, corr(real/sim, stall seconds) = {np.corrcoef(a[:, 3], a[:, 1])[0, 1]:.2f}, "
                    f"corr(real/sim, batch-cap share) = {np.corrcoef(a[:, 3], a[:, 2])[0, 1]:.2f}")
    (HERE / "steps_diag.json").write_text(json.dumps(out, indent=1))
    (HERE / "steps_diag.md").write_text("# Per-run step telemetry (measured cells, saturation probes excluded)\n\n" +
                                        "\n".join(summ) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(summ))


if __name__ == "__main__":
    main(sys.argv[1:])
