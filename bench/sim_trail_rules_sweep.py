"""Which trail rules beat sjf_prompt near saturation and in bursts while keeping p99 near fcfs's?
A sweep of trail's options in the simulator calibrated on the H100 serving run (issue 26).

The cells are bench/serve.py's, as bench/sim_vs_real.py simulates them: the held-out pool of the
shipped probe's recorded predictions (bench.common.held_out_pool, prompts and outputs <= 512),
requests and arrivals drawn by bench.common.workload_indices (a seeded permutation of the pool,
Poisson at load x the regime's saturation rate, or all at t = 0 for a burst), engines of
bench.common.run_engine_config (max batch 48; ample: KV for every running request; kv: a pool for
24 average requests + 128 host blocks), the step-time model fitted to the engine's serving
telemetry (python/trail/data/sim/step_fit_serve_llama3-8b.json) and the Llama-3-8B KV shape.

Every policy of a cell runs on the same requests: the baselines (fcfs, sjf_prompt,
sjf_prompt_memrules, oracle of bench.common.VARIANTS), trail with its defaults ("trail") and the
trail variants of the grid (one option at a time around the defaults, `--grid oat`; a joint grid,
`--grid joint --joint "c=0.5,0.8;margin=32,128"`; or both). Per (regime, load, variant) over the
seeds: mean / p99 / TTFT latency as ratios to fcfs on the same requests, the paired difference
variant - sjf_prompt (of the ratios to fcfs, per seed) with its sd over seeds, preemptions, and
the p99 of each request's stall (time out of the batch after its first token).

    python bench/sim_trail_rules_sweep.py --grid both --seeds 0,1,2,3 --n 1000 \
        --json /tmp/sweep.json --md /tmp/sweep.md [--workers 2]
    python bench/sim_trail_rules_sweep.py --explain ample:1.0:0 [--n 1000]   # per-request outcomes

Deterministic (no step-time noise; seeds fix the requests and arrivals); results do not depend on
--workers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

if not __package__:      # run as `python bench/sim_trail_rules_sweep.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (SHIPPED_PROBE_RECORDED, VARIANTS, held_out_pool, queue_growth,  # noqa: E402
                          run_engine_config, workload_indices)
from bench.sim_vs_real import sim_trace  # noqa: E402
from trail import sim  # noqa: E402
from trail.scheduler_types import POLICY_DEFAULTS  # noqa: E402

logger = logging.getLogger("sim_trail_rules_sweep")

STEP_MODEL = Path(__file__).resolve().parents[1] / "python" / "trail" / "data" / "sim" / "step_fit_serve_llama3-8b.json"
# the serving run's engine limits (bench/results/serve/runs/h100_2026-12-08_cells/serve.json)
RUN = {"max_batch": 48, "kv_requests": 24, "host_blocks": 128}
# ample: measured on the H100 (bench/results/serve/summary.json); kv: the simulator's own sustained
# search (serve.py's criterion and probes, `sustained_saturation`), computed when not given
SATURATION = {"ample": 23.108}
BASELINES = ("fcfs", "sjf_prompt", "sjf_prompt_memrules", "oracle")
TRAIL_MAX_PREEMPTIONS = 4   # SchedulerConfig.max_preemptions' default (not in POLICY_DEFAULTS)
# one option at a time around trail's defaults
OAT = {
    "c": [0.0, 0.25, 0.5],
    "margin": [0.0, 64.0, 128.0, 256.0],
    "aging_per_step": [0.0, 0.3, 0.6],
    "max_preemptions": [1, 2],
}


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------
def variant_name(opts: Mapping) -> str:
    """'trail' for the defaults, else 'trail[k=v,...]' with the options that differ, sorted."""
    diff = {k: v for k, v in sorted(opts.items()) if _default(k) != v}
    return "trail" if not diff else "trail[" + ",".join(f"{k}={_fmt_num(v)}" for k, v in diff.items()) + "]"


def _default(key: str):
    return TRAIL_MAX_PREEMPTIONS if key == "max_preemptions" else POLICY_DEFAULTS["trail"][key]


def _fmt_num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def oat_variants(grid: Mapping[str, Sequence] = OAT) -> dict[str, dict]:
    """{name: options} for every value of each option, the others at trail's defaults."""
    out = {}
    for k, vals in grid.items():
        for v in vals:
            opts = {k: v}
            name = variant_name(opts)
            if name != "trail":
                out[name] = opts
    return out


def _boolean(text: str) -> bool:
    if text.strip().lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"a boolean option takes true or false, got {text!r}")
    return text.strip().lower() in ("true", "1")


def parse_joint(text: str) -> dict[str, list]:
    """'c=0.5,0.8;margin=32,128' -> {'c': [0.5, 0.8], 'margin': [32.0, 128.0]} (max_preemptions
    and max_forced_evictions as ints, boolean options from true / false, the rest as floats)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        k, vals = part.split("=", 1)
        k = k.strip()
        if k not in POLICY_DEFAULTS["trail"] and k != "max_preemptions":
            raise ValueError(f"unknown trail option {k!r}")
        if isinstance(_default(k), bool):
            conv = _boolean
        else:
            conv = int if k in ("max_preemptions", "max_forced_evictions") else float
        out[k] = [conv(v) for v in vals.split(",")]
    return out


def joint_variants(grid: Mapping[str, Sequence]) -> dict[str, dict]:
    """{name: options} for every combination of the grid's values."""
    keys = list(grid)
    out = {}
    for combo in np.array(np.meshgrid(*[np.arange(len(grid[k])) for k in keys], indexing="ij")).reshape(len(keys), -1).T:
        opts = {k: grid[k][i] for k, i in zip(keys, combo.tolist())}
        name = variant_name(opts)
        if name != "trail":
            out[name] = {k: v for k, v in opts.items() if _default(k) != v}
    return out


def parse_variant(name: str) -> dict:
    """The options of a variant name ('trail[c=0.5,margin=64]' -> {'c': 0.5, 'margin': 64.0})."""
    if name == "trail":
        return {}
    if not (name.startswith("trail[") and name.endswith("]")):
        raise ValueError(f"not a trail variant name: {name!r}")
    return {k: v[0] for k, v in parse_joint(name[6:-1].replace(",", ";")).items()}


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------
def cell_draw(pool: Mapping, regime: str, load: str, seed: int, n: int, sat: Mapping[str, float]):
    """(pool indices, arrivals, rate) of a cell: 'burstN' = N requests at t = 0, else Poisson at
    load x sat[regime] (n requests)."""
    if load.startswith("burst"):
        m = int(load[5:] or n)
        idx, arr, _ = workload_indices(len(pool["ids"]), m, None, seed)
        return idx, arr, None
    rate = float(load) * sat[regime]
    idx, arr, _ = workload_indices(len(pool["ids"]), n, rate, seed)
    return idx, arr, rate


def _engine(regime: str, pool: Mapping, n: int, policy: str, opts: Mapping):
    return run_engine_config(regime, pool, dict(RUN, num_requests=n), policy, dict(opts))


def per_request(res: sim.SimResult) -> dict[str, np.ndarray]:
    """latency, ttft, stall (time out of the batch after the first token: (finish - first token)
    - time in the batch, + nothing for the prefill step, so it is <= the truth by one step)."""
    lat = res.finish - res.arrival
    ttft = res.first_token - res.arrival
    stall = np.maximum(lat - ttft - res.in_batch_s, 0.0)
    return {"latency": lat, "ttft": ttft, "stall": stall}


def run_cell(task: tuple) -> dict:
    """One (regime, load, seed): every policy of `names` on the same requests. Returns
    {"cell": ..., "rows": {name: metrics}}."""
    regime, load, seed, n, sat, names, table = task
    pool = _pool()
    model, spec = _model()
    idx, arr, rate = cell_draw(pool, regime, load, seed, n, sat)
    tr = sim_trace(pool, idx, arr)
    rows = {}
    for name in names:
        policy, opts = table[name]
        res = sim.simulate(tr, _engine(regime, pool, len(idx), policy, opts), spec, model, record_steps=True)
        m = res.metrics()
        pr = per_request(res)
        ss = res.step_summary()
        rows[name] = {"mean": m["mean_latency"], "p99": m["p99_latency"], "ttft": m["mean_ttft"],
                      "p99_ttft": m["p99_ttft"], "preempt": m["preemptions_total"],
                      "keep": m["preemptions"]["policy_keep"],
                      "forced": m["preemptions"]["forced_swap"] + m["preemptions"]["forced_recompute"],
                      "stall_p99": float(np.percentile(pr["stall"], 99)),
                      "stalled_share": float((pr["stall"] > 0.05).mean()),
                      "steps": ss["steps"], "mixed_steps": ss["mixed_steps"],
                      "makespan": float(res.finish.max() - res.arrival.min())}
    return {"cell": {"regime": regime, "load": load, "seed": seed, "n": int(len(idx)), "rate": rate}, "rows": rows}


_CACHE: dict = {}


def _pool():
    if "pool" not in _CACHE:
        _CACHE["pool"] = held_out_pool(max_prompt=512, max_output=512, recorded=SHIPPED_PROBE_RECORDED)
    return _CACHE["pool"]


def _model():
    if "model" not in _CACHE:
        _CACHE["model"] = (sim.StepTimeModel.from_json(STEP_MODEL), sim.llama3_8b_kv_spec())
    return _CACHE["model"]


def sustained_saturation(regime: str, probe_n: int = 300, growth: float = 0.25) -> dict:
    """bench/serve.py's saturation search in the simulator: fcfs serves 300-request Poisson probes
    (seed 2000) from the all-at-once completion rate (seed 1000) up / down by 1.3x, then two
    geometric bisections; sustained = queueing-delay growth <= 0.25 service times."""
    from bench.serve import saturation_search

    pool = _pool()
    model, spec = _model()
    eng = _engine(regime, pool, probe_n, "fcfs", {})
    idx, arr, _ = workload_indices(len(pool["ids"]), probe_n, None, 1000)
    start = probe_n / float(sim.simulate(sim_trace(pool, idx, arr), eng, spec, model).finish.max())

    def probe(rate):
        i, a, _ = workload_indices(len(pool["ids"]), probe_n, rate, 2000)
        r = sim.simulate(sim_trace(pool, i, a), eng, spec, model)
        return {"growth": queue_growth(r.arrival, r.first_token - r.arrival, r.finish - r.arrival)}

    found = saturation_search(probe, start, growth=growth)
    found["start"] = start
    return found


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def aggregate(results: Sequence[dict]) -> list[dict]:
    """Per (regime, load, name), over seeds: ratios to fcfs (mean, p99, TTFT), the paired
    difference of the mean-latency ratios name - sjf_prompt (mean and sd over seeds), preemptions,
    stall p99 (s) and the mean latency (s)."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["cell"]["regime"], r["cell"]["load"]), []).append(r)
    out = []
    for (regime, load), cells in groups.items():
        cells = sorted(cells, key=lambda c: c["cell"]["seed"])
        for name in cells[0]["rows"]:
            def col(key, ref=None, cells=cells, name=name):
                v = np.array([c["rows"][name][key] for c in cells], float)
                return v if ref is None else v / np.array([c["rows"][ref][key] for c in cells], float)

            mean_r, sjf_r = col("mean", "fcfs"), np.array([c["rows"]["sjf_prompt"]["mean"] / c["rows"]["fcfs"]["mean"]
                                                           for c in cells]) if "sjf_prompt" in cells[0]["rows"] else None
            diff = mean_r - sjf_r if sjf_r is not None else np.full(len(cells), math.nan)
            out.append({"regime": regime, "load": load, "name": name, "seeds": len(cells),
                        "n": cells[0]["cell"]["n"],
                        "mean_vs_fcfs": float(mean_r.mean()), "mean_vs_fcfs_sd": float(mean_r.std()),
                        "p99_vs_fcfs": float(col("p99", "fcfs").mean()), "p99_vs_fcfs_max": float(col("p99", "fcfs").max()),
                        "ttft_vs_fcfs": float(col("ttft", "fcfs").mean()),
                        "minus_sjf": float(diff.mean()), "minus_sjf_sd": float(diff.std(ddof=1)) if len(diff) > 1 else math.nan,
                        "minus_sjf_wins": int((diff < 0).sum()),
                        "preempt": float(col("preempt").mean()), "keep": float(col("keep").mean()),
                        "forced": float(col("forced").mean()),
                        "stall_p99_s": float(col("stall_p99").mean()), "mean_s": float(col("mean").mean())})
    return out


def load_key(load: str) -> tuple:
    return (1, int(load[5:] or 0)) if load.startswith("burst") else (0, float(load))


def markdown_table(rows: Sequence[dict], names: Sequence[str] | None = None) -> str:
    """One row per (regime, load, name) of `aggregate`, regime / load / the given name order."""
    order = {n: i for i, n in enumerate(names)} if names else {}
    rows = [r for r in rows if not names or r["name"] in order]
    rows = sorted(rows, key=lambda r: (r["regime"], load_key(r["load"]), order.get(r["name"], 0), r["name"]))
    head = ("| regime | load | policy | mean / fcfs | p99 / fcfs (worst seed) | TTFT / fcfs | - sjf_prompt (sd; seeds ahead) "
            "| preempt (keep / forced) | stall p99 s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['load']} | {r['name']} | {r['mean_vs_fcfs']:.3f} ± {r['mean_vs_fcfs_sd']:.3f} "
                     f"| {r['p99_vs_fcfs']:.2f} ({r['p99_vs_fcfs_max']:.2f}) | {r['ttft_vs_fcfs']:.2f} "
                     f"| {r['minus_sjf']:+.3f} ({r['minus_sjf_sd']:.3f}; {r['minus_sjf_wins']}/{r['seeds']}) "
                     f"| {r['preempt']:.0f} ({r['keep']:.0f} / {r['forced']:.0f}) | {r['stall_p99_s']:.2f} |")
    return "\n".join(lines) + "\n"


def score(rows: Sequence[dict], loads_ahead=("1.0", "1.1", "1.2", "burst300", "burst1000"),
          p99_loads=("0.9", "1.0"), p99_bar: float = 1.2) -> list[dict]:
    """Per variant and regime: the mean of (name - sjf_prompt) over `loads_ahead`, the worst
    (largest) of it, the worst p99 / fcfs over `p99_loads` (up to saturation), the worst mean / fcfs
    over every load, and whether p99 stays <= p99_bar."""
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["name"], r["regime"]), {})[r["load"]] = r
    out = []
    for (name, regime), d in by.items():
        ahead = [d[l]["minus_sjf"] for l in loads_ahead if l in d]
        p99 = [d[l]["p99_vs_fcfs"] for l in p99_loads if l in d]
        out.append({"name": name, "regime": regime, "minus_sjf_avg": float(np.mean(ahead)) if ahead else math.nan,
                    "minus_sjf_worst": float(np.max(ahead)) if ahead else math.nan,
                    "p99_worst_to_sat": float(np.max(p99)) if p99 else math.nan,
                    "mean_vs_fcfs_worst": float(max(x["mean_vs_fcfs"] for x in d.values())),
                    "p99_ok": bool(p99 and max(p99) <= p99_bar)})
    return sorted(out, key=lambda s: (s["regime"], s["minus_sjf_avg"]))


# ------------------------------------------------------------------------------------------------
# Per-request outcomes (the why)
# ------------------------------------------------------------------------------------------------
def explain(regime: str, load: str, seed: int, n: int, sat: Mapping[str, float],
            names: Sequence[str] = ("fcfs", "sjf_prompt", "trail", "trail[c=0]")) -> str:
    """trail's and its variants' per-request outcomes against sjf_prompt on the same requests: the
    latency difference by true output length (quintiles), how much of it is stall (out of the batch
    after the first token) or waiting for the first token, and who was stalled."""
    pool = _pool()
    model, spec = _model()
    idx, arr, _ = cell_draw(pool, regime, load, seed, n, sat)
    tr = sim_trace(pool, idx, arr)
    table = dict(VARIANTS)
    res = {}
    for name in names:
        policy, opts = table[name] if name in table else ("trail", parse_variant(name))
        r = sim.simulate(tr, _engine(regime, pool, len(idx), policy, opts), spec, model, record_steps=True)
        res[name] = (r, per_request(r))
    L = tr.output_len
    first_pred = tr.pred[tr.pred_cu[:-1]]
    err = first_pred - L                               # the probe's first prediction of the remaining length, minus the truth
    ref = res["sjf_prompt"][1]
    fc = res["fcfs"][1]["latency"].mean()
    lines = [f"### {regime} {load} seed {seed}: {len(idx)} requests", "",
             "| policy | mean s | / fcfs | in batch s | first token s | stall s | stalled (>50 ms) | steps | mixed steps | preempt (keep) |",
             "|" + "---|" * 10]
    for name, (r, pr) in res.items():
        ss = r.step_summary()
        lines.append(f"| {name} | {pr['latency'].mean():.3f} | {pr['latency'].mean() / fc:.3f} | {r.in_batch_s.mean():.3f} "
                     f"| {pr['ttft'].mean():.3f} | {pr['stall'].mean():.3f} | {(pr['stall'] > 0.05).mean():.1%} "
                     f"| {ss['steps']} | {ss['mixed_steps']} | {sum(r.preempt.values())} ({r.preempt['policy_keep']}) |")
    qs = np.quantile(L, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bins = np.clip(np.searchsorted(qs, L, side="right") - 1, 0, 4)
    lines += ["", "Latency minus sjf_prompt's per request, mean s over each true-output-length quintile "
              "(and the first token / stall parts of it):", "",
              "| policy | " + " | ".join(f"L {int(qs[b])}-{int(qs[b + 1])}" for b in range(5)) + " | all |",
              "|" + "---|" * 7]
    for name, (r, pr) in res.items():
        if name == "sjf_prompt":
            continue
        d = pr["latency"] - ref["latency"]
        dt = pr["ttft"] - ref["ttft"]
        dsl = pr["stall"] - ref["stall"]
        cells = [f"{d[bins == b].mean():+.2f} ({dt[bins == b].mean():+.2f} / {dsl[bins == b].mean():+.2f})" for b in range(5)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {d.mean():+.3f} ({dt.mean():+.3f} / {dsl.mean():+.3f}) |")
    for name, (r, pr) in res.items():
        if not name.startswith("trail"):
            continue
        st = pr["stall"] > 0.05
        if st.any():
            lines += ["", f"{name}: {st.sum()} requests stalled > 50 ms (total stall {pr['stall'].sum():.1f} s, "
                      f"{pr['stall'].sum() / len(L):.3f} s per request); their true length median {np.median(L[st]):.0f} "
                      f"(all: {np.median(L):.0f}); first prediction minus truth median {np.median(err[st]):+.0f} "
                      f"(all: {np.median(err):+.0f}); their latency minus sjf_prompt's mean "
                      f"{(pr['latency'] - ref['latency'])[st].mean():+.2f} s, the others' "
                      f"{(pr['latency'] - ref['latency'])[~st].mean():+.2f} s"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
def build_table(grid: str, joint: str | None, extra: Sequence[str] = ()) -> dict[str, tuple[str, dict]]:
    """name -> (policy, options): the baselines, trail's defaults and the grid's variants."""
    table = {n: VARIANTS[n] for n in BASELINES}
    table["trail"] = ("trail", {})
    variants: dict[str, dict] = {}
    if grid in ("oat", "both"):
        variants.update(oat_variants())
    if grid in ("joint", "both") and joint:
        variants.update(joint_variants(parse_joint(joint)))
    for name in extra:
        variants[name] = parse_variant(name)
    table.update({k: ("trail", v) for k, v in variants.items()})
    return table


def sweep(regimes: Sequence[str], loads: Sequence[str], seeds: Sequence[int], n: int, sat: Mapping[str, float],
          table: Mapping[str, tuple[str, dict]], workers: int = 1, progress: bool = True) -> list[dict]:
    """run_cell over regime x load x seed (results in that order, whatever `workers`)."""
    from tqdm import tqdm

    names = list(table)
    tasks = [(r, l, s, n, dict(sat), names, dict(table)) for r in regimes for l in loads for s in seeds]
    if workers <= 1:
        return [run_cell(t) for t in tqdm(tasks, desc="cells", disable=not progress)]
    with ProcessPoolExecutor(workers) as ex:
        return list(tqdm(ex.map(run_cell, tasks), total=len(tasks), desc="cells", disable=not progress))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="ample,kv")
    ap.add_argument("--loads", default="0.9,1.0,1.1,1.2,burst300,burst1000",
                    help="x the regime's saturation rate (Poisson, --n requests), or burstN (N requests at t = 0)")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--n", type=int, default=1000, help="requests per Poisson cell")
    ap.add_argument("--saturation", default="ample=23.108,kv=search",
                    help="regime=req/s or regime=search (the simulator's sustained search) per regime")
    ap.add_argument("--grid", choices=("none", "oat", "joint", "both"), default="oat")
    ap.add_argument("--joint", default=None, help='joint grid, e.g. "c=0.5,0.8;margin=32,128;aging_per_step=0.15,0.3"')
    ap.add_argument("--variants", default="", help="more variants by name, ';'-separated: trail[c=0.5,margin=64];...")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every cell's rows and the aggregate here")
    ap.add_argument("--md", default=None, help="write the aggregate table here")
    ap.add_argument("--explain", default=None, help="regime:load:seed[,...]: per-request outcomes instead of a sweep")
    ap.add_argument("--explain-variants", default="fcfs;sjf_prompt;trail;trail[c=0]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    sat, sat_info = {}, {}
    for part in args.saturation.split(","):
        regime, val = part.split("=")
        if val == "search":
            found = sustained_saturation(regime)
            sat[regime], sat_info[regime] = found["rate"], {"source": "simulator sustained search", **found}
        else:
            sat[regime], sat_info[regime] = float(val), {"source": "given", "rate": float(val)}
        logger.info("%s: saturation %.3f req/s (%s)", regime, sat[regime], sat_info[regime]["source"])

    if args.explain:
        text = []
        for spec_ in args.explain.split(","):
            regime, load, seed = spec_.split(":")
            text.append(explain(regime, load, int(seed), args.n, sat, args.explain_variants.split(";")))
        out = "\n".join(text)
        print(out)
        if args.md:
            Path(args.md).write_text(out)
        return 0

    table = build_table(args.grid, args.joint, [v for v in args.variants.split(";") if v])
    logger.info("%d policies: %s", len(table), ", ".join(table))
    results = sweep(args.regimes.split(","), args.loads.split(","), [int(s) for s in args.seeds.split(",")], args.n,
                    sat, table, workers=args.workers)
    rows = aggregate(results)
    scores = score(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else list(argv), "saturation": sat_info,
                                               "table": {k: list(v) for k, v in table.items()}, "cells": results,
                                               "aggregate": rows, "score": scores}, indent=1, default=float))
    md = markdown_table(rows, list(table))
    md += "\n| variant | regime | mean(- sjf_prompt) over 1.0-1.2x + bursts | worst | p99 / fcfs worst to 1.0x | mean / fcfs worst |\n|---|---|---|---|---|---|\n"
    md += "\n".join(f"| {s['name']} | {s['regime']} | {s['minus_sjf_avg']:+.4f} | {s['minus_sjf_worst']:+.4f} | "
                    f"{s['p99_worst_to_sat']:.2f} | {s['mean_vs_fcfs_worst']:.3f} |" for s in scores) + "\n"
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
