"""Headline tables, goal checks and diagnostics for the H200 serving runs of 2026-11-27.

Reads the merged folders (smollm2_ample, smollm2_kv, llama8b_ample, llama8b_kv: `bench/serve.py
merge` outputs) and the variant runs, writes analysis.json and analysis.md next to this file.

    python bench/results/h200_2026-11-27/analyze.py

Pooled figures = ratio of pooled means over all seeds' requests (as serve.py merge's pooled table).
CIs: 'paired' resamples requests within each seed (the same indices for every policy of a cell, so
ratios between policies are paired); 'seeds' resamples whole seeds (crude with 2-3 seeds).
Oracle fraction = (1 - trail/fcfs) / (1 - oracle/fcfs) of the pooled means, reported where the
oracle's pooled gain is >= 10%.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SETS = {"SmolLM2-135M (probe)": ["smollm2_ample", "smollm2_kv"],
        "Llama-3-8B shape, random weights, recorded SmolLM2 predictions": ["llama8b_ample", "llama8b_kv"]}
B = 2000
LOAD_ORDER = lambda l: 1e9 if l == "burst" else float(l)  # noqa: E731


def cells_of(folder: str) -> list[dict]:
    return json.loads((HERE / folder / "serve.json").read_text())["cells"]


def boot_ratios(cells, num, den, key, rng):
    """pooled sum(num)/sum(den) over cells, with paired (requests within seeds) and seed CIs."""
    a = [np.asarray(c["policies"][num][key], float) for c in cells]
    b = [np.asarray(c["policies"][den][key], float) for c in cells]
    sa, sb = np.array([x.sum() for x in a]), np.array([x.sum() for x in b])
    point = sa.sum() / sb.sum()
    return point, sa, sb, a, b


def analyse_group(cells, rng):
    """Per (regime, load) group: the headline figures for trail (+ oracle, sjf_prompt, trail_c0)."""
    names = [n for n in ("fcfs", "sjf_prompt", "trail", "trail_c0", "oracle") if all(n in c["policies"] for c in cells)]
    n_seeds = len(cells)
    idx = [[rng.integers(0, len(c["policies"]["fcfs"]["latency_s"]), len(c["policies"]["fcfs"]["latency_s"]))
            for c in cells] for _ in range(B)]
    sidx = rng.integers(0, n_seeds, (B, n_seeds))
    arr = {(n, k): [np.asarray(c["policies"][n][k], float) for c in cells] for n in names for k in ("latency_s", "ttft_s")}

    def pooled(n, k):
        return sum(x.sum() for x in arr[(n, k)])

    def ratio_ci(num, den, k):
        pt = pooled(num, k) / pooled(den, k)
        bp = np.array([sum(x[i].sum() for x, i in zip(arr[(num, k)], ii)) /
                       sum(x[i].sum() for x, i in zip(arr[(den, k)], ii)) for ii in idx])
        sa = np.array([x.sum() for x in arr[(num, k)]])
        sb = np.array([x.sum() for x in arr[(den, k)]])
        bs = sa[sidx].sum(1) / sb[sidx].sum(1)
        per_seed = (sa / sb).tolist()
        return pt, [float(np.percentile(bp, 2.5)), float(np.percentile(bp, 97.5))], \
            [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))], per_seed, bp, bs

    out = {"seeds": [c["seed"] for c in cells], "policies": {}}
    boots = {}
    for n in names:
        row = {}
        for k, lab in (("latency_s", "latency"), ("ttft_s", "ttft")):
            pt, cp, cs, ps, bp, bs = ratio_ci(n, "fcfs", k)
            row[f"{lab}_ratio"], row[f"{lab}_ci_paired"], row[f"{lab}_ci_seeds"], row[f"{lab}_per_seed"] = pt, cp, cs, ps
            boots[(n, lab)] = (bp, bs)
        if "sjf_prompt" in names and n != "sjf_prompt":
            pt, cp, cs, ps, _, _ = ratio_ci(n, "sjf_prompt", "latency_s")
            row["vs_sjf"], row["vs_sjf_ci_paired"], row["vs_sjf_ci_seeds"], row["vs_sjf_per_seed"] = pt, cp, cs, ps
            pt, cp, cs, ps, _, _ = ratio_ci(n, "sjf_prompt", "ttft_s")
            row["ttft_vs_sjf"], row["ttft_vs_sjf_ci_paired"] = pt, cp
        la = np.concatenate(arr[(n, "latency_s")])
        lf = np.concatenate(arr[("fcfs", "latency_s")])
        row["p99_ratio"] = float(np.percentile(la, 99) / np.percentile(lf, 99))
        row["p99_ratio_per_seed"] = [float(np.percentile(x, 99) / np.percentile(y, 99))
                                     for x, y in zip(arr[(n, "latency_s")], arr[("fcfs", "latency_s")])]
        tok = lambda m: sum(c["policies"][m]["throughput_tok_s"] * c["policies"][m]["makespan_s"] for c in cells)  # noqa: E731
        span = lambda m: sum(c["policies"][m]["makespan_s"] for c in cells)  # noqa: E731
        row["throughput_ratio"] = float((tok(n) / span(n)) / (tok("fcfs") / span("fcfs")))
        row["throughput_ratio_per_seed"] = [c["policies"][n]["throughput_tok_s"] / c["policies"]["fcfs"]["throughput_tok_s"] for c in cells]
        row["mean_latency_s"] = float(la.mean())
        row["mean_ttft_s"] = float(np.concatenate(arr[(n, "ttft_s")]).mean())
        tel = [c["policies"][n].get("telemetry", {}) for c in cells]
        for kind in ("keep", "swap", "recompute", "forced"):
            row[f"pre_{kind}"] = float(np.mean([t.get(kind, 0.0) for t in tel]))
        row["preemptions"] = float(np.mean([c["policies"][n]["preemptions"] for c in cells]))
        row["recomputed_tokens"] = float(np.mean([c["policies"][n]["recomputed_tokens"] for c in cells]))
        row["makespan_s"] = float(np.mean([c["policies"][n]["makespan_s"] for c in cells]))
        out["policies"][n] = row
    # oracle fraction with CIs (same resamples for trail and oracle)
    for lab in ("latency", "ttft"):
        if "oracle" not in names:
            continue
        og = 1 - out["policies"]["oracle"][f"{lab}_ratio"]
        for n in ("trail", "trail_c0", "sjf_prompt"):
            if n not in names:
                continue
            tg = 1 - out["policies"][n][f"{lab}_ratio"]
            frac = tg / og if og > 0 else math.nan
            tp, op = boots[(n, lab)][0], boots[("oracle", lab)][0]      # the paired resamples
            with np.errstate(divide="ignore", invalid="ignore"):
                fp = (1 - tp) / (1 - op)
            out["policies"][n][f"oracle_frac_{lab}"] = frac
            out["policies"][n][f"oracle_frac_{lab}_ci_paired"] = [float(np.nanpercentile(fp, 2.5)), float(np.nanpercentile(fp, 97.5))]
            out["policies"][n][f"oracle_gain_{lab}"] = og
    # run-order: each run's mean latency / the cell's median, by position in the rotated order
    pos = []
    for c in cells:
        med = np.median([c["policies"][n]["mean_latency_s"] for n in c["policies"]])
        for k, n in enumerate(c.get("policy_order", [])):
            pos.append((k, n, c["policies"][n]["mean_latency_s"] / med))
    out["position"] = pos
    return out


def fmt_ci(ci):
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def sig(ci, mark="*"):
    return mark if ci[1] < 1 or ci[0] > 1 else ""


def main():
    rng = np.random.default_rng(0)
    result = {}
    md = []
    for label, folders in SETS.items():
        for folder in folders:
            cells = cells_of(folder)
            groups = {}
            for c in cells:
                groups.setdefault((c["regime"], c["load"]), []).append(c)
            for (regime, load), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], LOAD_ORDER(kv[0][1]))):
                result[f"{folder}|{load}"] = dict(analyse_group(cs, rng), model=label, regime=regime, load=load, folder=folder)
    (HERE / "analysis.json").write_text(json.dumps(result, indent=1, default=float))

    # ---- headline table (trail) ----
    md.append("## Headline: trail (c 0.8, aging, memory-aware admission) vs fcfs, pooled over seeds\n")
    md.append("† = paired 95% CI (requests within seeds) excludes 1; ‡ = seed-level 95% CI (whole seeds) excludes 1. Oracle fraction = "
              "trail's share of the oracle's gain over fcfs (pooled means), shown where the oracle gains >= 10%.\n")
    md.append("| model | regime | load | seeds | mean lat / fcfs [paired] [seeds] | per seed | TTFT / fcfs [paired] [seeds] | p99 / fcfs | thr / fcfs | "
              "oracle lat / fcfs | oracle frac lat | oracle TTFT / fcfs | oracle frac TTFT | trail / sjf_prompt [paired] [seeds] | sjf_prompt / fcfs |")
    md.append("|" + "---|" * 15)
    def lead(g):
        """A table row's first cells: model, regime, load."""
        return f"| {'SmolLM2' if g['model'].startswith('SmolLM2') else '8B-rec'} | {g['regime']} | {g['load']} | "

    for key, g in result.items():
        p = g["policies"]
        t, o, s = p["trail"], p["oracle"], p["sjf_prompt"]
        ofl = f"{t['oracle_frac_latency']:.2f}" if o["latency_ratio"] <= 0.9 else f"({t['oracle_frac_latency']:.2f})"
        oft = f"{t['oracle_frac_ttft']:.2f}" if o["ttft_ratio"] <= 0.9 else f"({t['oracle_frac_ttft']:.2f})"
        md.append(lead(g) + f"{','.join(map(str, g['seeds']))} | "
                  f"**{t['latency_ratio']:.3f}**{sig(t['latency_ci_paired'], '†')}{sig(t['latency_ci_seeds'], '‡')} {fmt_ci(t['latency_ci_paired'])} {fmt_ci(t['latency_ci_seeds'])} | "
                  f"{' '.join(f'{x:.2f}' for x in t['latency_per_seed'])} | "
                  f"**{t['ttft_ratio']:.3f}**{sig(t['ttft_ci_paired'], '†')}{sig(t['ttft_ci_seeds'], '‡')} {fmt_ci(t['ttft_ci_paired'])} {fmt_ci(t['ttft_ci_seeds'])} | "
                  f"{t['p99_ratio']:.2f} | {t['throughput_ratio']:.3f} | {o['latency_ratio']:.3f} | {ofl} | {o['ttft_ratio']:.3f} | {oft} | "
                  f"{t['vs_sjf']:.3f}{sig(t['vs_sjf_ci_paired'], '†')}{sig(t['vs_sjf_ci_seeds'], '‡')} {fmt_ci(t['vs_sjf_ci_paired'])} {fmt_ci(t['vs_sjf_ci_seeds'])} | "
                  f"{s['latency_ratio']:.3f} |")
    md.append("\nOracle fraction in parentheses: the oracle's pooled gain is < 10% there, so the goal does not apply.\n")

    # ---- all policies compact ----
    md.append("## All policies: pooled mean latency / fcfs (TTFT / fcfs; p99 / fcfs; throughput / fcfs); † ‡ as above\n")
    md.append("| model | regime | load | fcfs mean s | sjf_prompt | trail | trail_c0 | oracle |")
    md.append("|---|---|---|---|---|---|---|---|")
    for key, g in result.items():
        p = g["policies"]
        cell = lambda r: (f"{r['latency_ratio']:.3f}{sig(r['latency_ci_paired'], '†')}{sig(r['latency_ci_seeds'], '‡')} "  # noqa: E731
                          f"({r['ttft_ratio']:.2f}; {r['p99_ratio']:.2f}; {r['throughput_ratio']:.3f})")
        md.append(lead(g) + f"{p['fcfs']['mean_latency_s']:.3f} | " +
                  " | ".join(cell(p[n]) if n in p else "" for n in ("sjf_prompt", "trail", "trail_c0", "oracle")) + " |")

    # ---- preemptions by kind ----
    md.append("\n## Preemptions by kind (mean per run: keep / swap / recompute; forced = memory-forced; recomputed tokens)\n")
    md.append("| model | regime | load | " + " | ".join(("fcfs", "sjf_prompt", "trail", "trail_c0", "oracle")) + " |")
    md.append("|---|---|---|---|---|---|---|---|")
    for key, g in result.items():
        p = g["policies"]
        cell = lambda r: (f"{r['preemptions']:.0f} = {r['pre_keep']:.0f}/{r['pre_swap']:.0f}/{r['pre_recompute']:.0f} "  # noqa: E731
                          f"(forced {r['pre_forced']:.0f}; {r['recomputed_tokens']:.0f} tok)")
        md.append(lead(g) + " | ".join(cell(p[n]) for n in ("fcfs", "sjf_prompt", "trail", "trail_c0", "oracle")) + " |")

    # ---- run order ----
    md.append("\n## Run order: each run's mean latency / its cell's median, by position in the rotated policy order\n")
    md.append("| model | regime | pos 1 | pos 2 | pos 3 | pos 4 | pos 5 | first-position policy per seed |")
    md.append("|---|---|---|---|---|---|---|---|")
    for folder in [f for fs in SETS.values() for f in fs]:
        pos = [x for key, g in result.items() if g["folder"] == folder and g["load"] != "burst" for x in g["position"]]
        by = [np.mean([r for k, n, r in pos if k == i]) if any(k == i for k, _, _ in pos) else math.nan for i in range(5)]
        firsts = sorted({(c["seed"], c["policy_order"][0]) for c in cells_of(folder)})
        md.append(f"| {folder} | | " + " | ".join(f"{x:.2f}" for x in by) + f" | {firsts} |")
    md.append("\n(Poisson loads only; the burst runs excluded.)\n")

    # ---- goals ----
    md.append(goals(result))
    (HERE / "analysis.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def goals(result) -> str:
    L = ["## Goals (issue 16)\n"]
    # 1. oracle fraction >= 0.9 where oracle gains >= 10%
    rows = []
    for key, g in result.items():
        t, o = g["policies"]["trail"], g["policies"]["oracle"]
        for lab in ("latency", "ttft"):
            if 1 - o[f"{lab}_ratio"] >= 0.10:
                rows.append((g["model"][:7], g["regime"], g["load"], lab, t[f"oracle_frac_{lab}"], t[f"oracle_frac_{lab}_ci_paired"]))
    ok = [r for r in rows if r[4] >= 0.9]
    L.append(f"1. **trail >= 90% of the oracle's gain** (cells where the oracle gains >= 10%): met in {len(ok)} of {len(rows)} "
             "(model, regime, load, metric) cells: " + "; ".join(f"{m} {rg} {ld} {lab} {f:.2f}{'✓' if f >= 0.9 else '✗'}" for m, rg, ld, lab, f, _ in rows))
    # 2. 1.6x at 1.1x ample
    for key, g in result.items():
        if g["regime"] == "ample" and g["load"] == "1.1":
            t = g["policies"]["trail"]
            L.append(f"2. **>= 1.6x lower mean latency than fcfs at 1.1x, ample** ({g['model'][:7]}): trail {1 / t['latency_ratio']:.2f}x "
                     f"(ratio {t['latency_ratio']:.3f}, paired CI {fmt_ci(t['latency_ci_paired'])}, seeds CI {fmt_ci(t['latency_ci_seeds'])}); "
                     f"oracle {1 / g['policies']['oracle']['latency_ratio']:.2f}x -> {'met' if 1 / t['latency_ratio'] >= 1.6 else 'NOT met'}")
    # 3. beats sjf_prompt at load >= 0.9
    rows = [(g["model"][:7], g["regime"], g["load"], g["policies"]["trail"]["vs_sjf"], g["policies"]["trail"]["vs_sjf_ci_paired"],
             g["policies"]["trail"]["vs_sjf_ci_seeds"]) for g in result.values() if LOAD_ORDER(g["load"]) >= 0.9]
    L.append(f"3. **trail beats sjf_prompt at every load >= 0.9x** (burst included): pooled < 1 in {sum(r[3] < 1 for r in rows)} of {len(rows)}, "
             f"significantly (paired CI < 1) in {sum(r[4][1] < 1 for r in rows)}, seed-CI < 1 in {sum(r[5][1] < 1 for r in rows)}: " +
             "; ".join(f"{m} {rg} {ld} {v:.3f}{sig(cp, '†')}{sig(cs, '‡')}" for m, rg, ld, v, cp, cs in rows))
    # 4. never worse than fcfs in kv
    rows = [(g["model"][:7], g["load"], g["policies"]["trail"]) for g in result.values() if g["regime"] == "kv"]
    worse = [r for r in rows if r[2]["latency_ratio"] > 1]
    L.append(f"4. **never worse than fcfs in kv**: pooled mean latency > fcfs in {len(worse)} of {len(rows)} kv cells: " +
             "; ".join(f"{m} {ld} {r['latency_ratio']:.3f} {fmt_ci(r['latency_ci_paired'])}{sig(r['latency_ci_paired'])} per seed "
                       f"{' '.join(f'{x:.2f}' for x in r['latency_per_seed'])}" for m, ld, r in rows))
    # 5. throughput
    rows = [(g["model"][:7], g["regime"], g["load"], g["policies"]["trail"]["throughput_ratio"],
             min(g["policies"]["trail"]["throughput_ratio_per_seed"])) for g in result.values()]
    L.append(f"5. **throughput >= 0.97x fcfs**: pooled min {min(r[3] for r in rows):.3f} "
             f"({[r[:3] for r in rows if r[3] == min(x[3] for x in rows)][0]}); pooled < 0.97 in {sum(r[3] < 0.97 for r in rows)} of {len(rows)}; "
             f"per run min {min(r[4] for r in rows):.3f}, runs < 0.97 in cells: {[r[:3] for r in rows if r[4] < 0.97]}")
    # 6. p99 <= 1.5x up to saturation
    rows = [(g["model"][:7], g["regime"], g["load"], g["policies"]["trail"]["p99_ratio"], max(g["policies"]["trail"]["p99_ratio_per_seed"]))
            for g in result.values() if g["load"] != "burst" and float(g["load"]) <= 1.0]
    L.append("6. **p99 <= 1.5x fcfs up to saturation (loads <= 1.0)**: pooled p99 ratio " +
             "; ".join(f"{m} {rg} {ld} {v:.2f} (max seed {mx:.2f})" for m, rg, ld, v, mx in rows) +
             f" -> pooled {'met' if all(r[3] <= 1.5 for r in rows) else 'NOT met'}; per seed {'met' if all(r[4] <= 1.5 for r in rows) else 'NOT met'}. "
             "Above saturation (not part of the goal): " +
             "; ".join(f"{g['model'][:7]} {g['regime']} {g['load']} {g['policies']['trail']['p99_ratio']:.2f}"
                       for g in result.values() if g["load"] == "burst" or float(g["load"]) > 1.0))
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
