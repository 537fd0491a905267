"""Pooled (over seeds) simulated vs real mean-latency ratios to fcfs from sim_vs_real_*/sim_vs_real.json.
    python bench/results/h200_2026-11-27/sim_pooled.py  -> sim_pooled.md"""
import collections, json
from pathlib import Path
HERE = Path(__file__).resolve().parent
pols = ("sjf_prompt", "trail", "trail_c0", "oracle")
lines = ["| regime | load | " + " | ".join(f"{p} sim / real" for p in pols) + " |", "|---|---|" + "---|" * len(pols)]
for f in ("sim_vs_real_ample", "sim_vs_real_kv"):
    acc = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for run in json.loads((HERE / f / "sim_vs_real.json").read_text()):
        base = {(r["load"], r["seed"]): r for r in run["rows"] if r["policy"] == "fcfs"}
        for r in run["rows"]:
            b, a = base[(r["load"], r["seed"])], acc[(r["regime"], r["load"], r["policy"])]
            a[0] += r["sim_mean_s"]; a[1] += b["sim_mean_s"]; a[2] += r["real_mean_s"]; a[3] += b["real_mean_s"]
    for reg, load in sorted({k[:2] for k in acc}, key=lambda k: (k[0], 9 if k[1] == "burst" else float(k[1]))):
        lines.append(f"| {reg} | {load} | " + " | ".join(
            f"{acc[(reg, load, p)][0] / acc[(reg, load, p)][1]:.3f} / {acc[(reg, load, p)][2] / acc[(reg, load, p)][3]:.3f}" for p in pols) + " |")
(HERE / "sim_pooled.md").write_text("Pooled mean latency / fcfs: simulator (step model fitted per run to its telemetry) / real run\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
