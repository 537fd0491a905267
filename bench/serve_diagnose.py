"""Why trail / oracle lost to fcfs in the ample regime of the first serving runs
(bench/results/h100_2026-11-27/serve_run{1,2}): the same requests replayed in the simulator
(bench/sim_vs_real.py: same ids, arrivals, engine limits, recorded probe predictions, a two-class
step model calibrated to the run) and what-ifs on each suspect:

  noise     the real runs' spread between policies that made the same decisions (sjf_prompt /
            trail_paper with <= 1 preemption vs fcfs at loads with no queueing), against the sim;
  knee      how far the offered rate sat from the sustained saturation rate of the calibrated
            model (Poisson probes), and how fcfs's mean latency moves with a +-10% step time;
  mixed     steps with a prefill row (eager, ~24 ms) vs decode-only graph steps: count and time
            share per policy; the same cells with mixed steps costing a graph step;
  aging     trail / oracle with aging 0 and with aging scaled to the step time;
  n         500 requests instead of 150 at loads relative to the sustained saturation rate.

    python bench/serve_diagnose.py [--run bench/results/h100_2026-11-27/serve_run2] [--out bench/results/serve_analysis]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

if not __package__:      # run as `python bench/serve_diagnose.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import sim_vs_real as svr  # noqa: E402
from bench.common import ROOT, VARIANTS, held_out_pool, queue_growth, run_engine_config, workload_indices  # noqa: E402
from trail import sim  # noqa: E402

logger = logging.getLogger("serve_diagnose")


def sustained_saturation(pool, run, regime, model, spec, n=300, seeds=(2000,), lo=2.0, hi=200.0,
                         growth=0.25, policy="fcfs") -> float:
    """Highest Poisson rate at which `policy`'s queueing delay does not grow by more than
    `growth` mean service times from the first to the last quarter of arrivals (serve.py's
    criterion, bench.common.queue_growth; bisection on a log scale; mean over seeds)."""

    def ok(rate, seed):
        idx, arr, _ = workload_indices(len(pool["ids"]), n, rate, seed)
        tr = svr.sim_trace(pool, idx, arr)
        r = sim.simulate(tr, run_engine_config(regime, pool, run, policy), spec, model)
        return queue_growth(r.arrival, r.first_token - r.arrival, r.finish - r.arrival) <= growth

    out = []
    for seed in seeds:
        a, b = lo, hi
        for _ in range(14):
            mid = float(np.sqrt(a * b))
            a, b = (mid, b) if ok(mid, seed) else (a, mid)
        out.append(a)
    return float(np.mean(out))


def all_at_once_rate(pool, run, regime, model, spec, n=150, seed=1000) -> float:
    idx, arr, _ = workload_indices(len(pool["ids"]), n, None, seed)
    r = sim.simulate(svr.sim_trace(pool, idx, arr), run_engine_config(regime, pool, run, "fcfs"), spec, model)
    return n / float(r.finish.max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "bench/results/h100_2026-11-27/serve_run2"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_analysis"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_dir, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = json.loads((run_dir / "serve.json").read_text())
    pool = held_out_pool(max_prompt=int(run.get("max_prompt", 512)), max_output=int(run.get("max_output", 512)))
    spec = svr.smollm2_kv_spec()
    model = svr.run_step_model(run_dir, run, pool, spec)
    res: dict = {"run": str(run_dir), "step_model": model.__dict__}

    # --- noise: equivalent decisions, different real outcomes
    pairs = []
    for c in run["cells"]:
        if c["load"] == "burst" or c["regime"] != "ample":
            continue
        for name in ("sjf_prompt", "trail_paper", "trail", "oracle"):
            s = c["policies"].get(name)
            if s is not None:
                pairs.append({"load": c["load"], "seed": c["seed"], "policy": name, "preemptions": s["preemptions"],
                              "real_ratio": s["latency_ratio_to_fcfs"], "real_ttft_fcfs": c["policies"]["fcfs"]["mean_ttft_s"]})
    res["ample_ratios"] = pairs

    # --- the same cells in the sim: baseline + what-ifs
    graph_mixed = replace(model, mixed_base_s=0.0, mixed_per_row_s=0.0, source=model.source + "; mixed steps as graph steps")
    whatifs = {
        "as_run": (model, None),
        "mixed_as_graph": (graph_mixed, None),
        "aging_0": (model, {"trail": {"aging_rate": 0.0, "aging_per_step": 0.0},
                            "oracle": {"aging_rate": 0.0, "aging_per_step": 0.0}}),
        "margin_0": (model, {"trail": {"margin": 0.0}, "oracle": {"margin": 0.0}}),
        "c_0": (model, {"trail": {"c": 0.0}, "oracle": {"c": 0.0}}),
    }
    from tqdm.auto import tqdm

    cells = []
    for c in tqdm(run["cells"], desc="what-ifs", unit="cell"):
        row = {"regime": c["regime"], "load": c["load"], "seed": c["seed"],
               "real": {n: s["latency_ratio_to_fcfs"] for n, s in c["policies"].items()}}
        for w, (m, ov) in whatifs.items():
            simd = svr.simulate_cell(run, c, pool, m, spec, overrides=ov)
            row[w] = {n: {"ratio": s["ratio_to_fcfs"], "mean_s": s["mean_latency"], "preemptions": s["preemptions_total"],
                          "mixed_steps": s["mixed_steps"], "mixed_time_share": s["mixed_time_share"], "steps": s["steps"]}
                      for n, s in simd.items()}
        cells.append(row)
        logger.info("%s %s %s done", c["regime"], c["load"], c["seed"])
    res["cells"] = cells

    # --- knee: sustained saturation of the calibrated model vs the run's all-at-once figure
    knee = {}
    for regime in ("ample", "kv"):
        sat_meas = run.get(f"saturation_req_s_{regime}")
        sus = sustained_saturation(pool, run, regime, model, spec)
        sus600 = sustained_saturation(pool, run, regime, model, spec, n=1000, seeds=(0, 1, 2))
        sus_graph = sustained_saturation(pool, run, regime, graph_mixed, spec)
        knee[regime] = {"all_at_once_measured": sat_meas, "all_at_once_sim": all_at_once_rate(pool, run, regime, model, spec),
                        "all_at_once_sim_mixed_as_graph": all_at_once_rate(pool, run, regime, graph_mixed, spec),
                        "sustained_sim": sus, "sustained_sim_n1000_3seeds": sus600,
                        "sustained_sim_mixed_as_graph": sus_graph,
                        "offered_1.1x_over_sustained": (1.1 * sat_meas / sus) if sat_meas else None}
        logger.info("%s: measured all-at-once %.2f, sustained (sim) %.2f req/s, with graph mixed steps %.2f",
                    regime, sat_meas or float("nan"), sus, sus_graph)
    res["knee"] = knee

    # sensitivity of fcfs to the step time at the run's cells (ample, Poisson)
    sens = []
    for c in run["cells"]:
        if c["regime"] != "ample" or c["load"] == "burst":
            continue
        row = {"load": c["load"], "seed": c["seed"]}
        for scale in (0.9, 1.0, 1.1, 1.2):
            m = replace(model, **{k: getattr(model, k) * scale for k in ("base_s", "per_decode_s", "per_prefill_token_s",
                                                                          "mixed_base_s", "mixed_per_row_s")})
            row[f"x{scale}"] = svr.simulate_cell(run, c, pool, m, spec, policies=["fcfs"])["fcfs"]["mean_latency"]
        sens.append(row)
    res["step_time_sensitivity_fcfs_mean_s"] = sens

    # --- n: 500 requests at 0.8 / 1.0 / 1.1 x the sustained rate, 3 seeds, as run and mixed-as-graph
    big = {}
    # the lead's mixed-step CUDA graphs: a mixed step ~ a graph step + 2 ms, prefill per token as
    # calibrated, or nearly free (both unmeasured until the next run's telemetry)
    mixed_5ms = replace(model, mixed_base_s=0.002, source=model.source + "; mixed steps +2 ms (assumed graphs)")
    mixed_5ms_cheap = replace(mixed_5ms, per_prefill_token_s=2e-6, source=mixed_5ms.source + ", prefill 2 us/token")
    extra = {"trail_aging100": ("trail", {"aging_rate": 100.0}), "trail_maxpre1": ("trail", {"max_preemptions": 1})}
    names = ("fcfs", "sjf_prompt", "trail", "trail_c0", "trail_aging100", "trail_maxpre1", "trail_paper", "oracle")
    for label, m in (("as_run", model), ("mixed_as_graph", graph_mixed), ("mixed_5ms", mixed_5ms),
                     ("mixed_5ms_cheap_prefill", mixed_5ms_cheap)):
        sus = sustained_saturation(pool, run, "ample", m, spec)
        big[f"{label} sustained_req_s"] = sus
        for load in (0.8, 1.0, 1.1):
            per = {}
            for seed in (0, 1, 2):
                cell = {"regime": "ample", "load": str(load), "seed": seed, "rate_req_s": load * sus}
                simd = svr.simulate_cell(run, cell, pool, m, spec, policies=names, n_override=500, extra=extra)
                for n, s in simd.items():
                    per.setdefault(n, []).append(s)
            big[f"{label} {load}"] = {n: {"ratio_mean": float(np.mean([s["ratio_to_fcfs"] for s in v])),
                                          "ratio_sd": float(np.std([s["ratio_to_fcfs"] for s in v])),
                                          "p99_ratio": float(np.mean([s["p99_latency"] / f["p99_latency"]
                                                                      for s, f in zip(v, per["fcfs"])])),
                                          "ttft_ratio": float(np.mean([s["ttft_ratio_to_fcfs"] for s in v])),
                                          "preemptions": float(np.mean([s["preemptions_total"] for s in v])),
                                          "mixed_time_share": float(np.mean([s["mixed_time_share"] for s in v]))}
                                      for n, v in per.items()}
            logger.info("n=500 %s %.1f: %s", label, load, {n: round(v["ratio_mean"], 3) for n, v in big[f"{label} {load}"].items()})
    res["n500_ample"] = big

    # where the latency goes (seed 0, 1.1x sustained, 500 requests): in the batch vs out of it
    decomp = {}
    for label, m in (("as_run", model), ("mixed_5ms_cheap_prefill", mixed_5ms_cheap)):
        sus = big[f"{label} sustained_req_s"]
        idx, arr, _ = workload_indices(len(pool["ids"]), 500, 1.1 * sus, 0)
        tr = svr.sim_trace(pool, idx, arr)
        for name in ("fcfs", "trail", "trail_c0", "oracle"):
            pol, opts = VARIANTS[name]
            r = sim.simulate(tr, run_engine_config("ample", pool, run, pol, opts), spec, m)
            decomp[f"{label} {name}"] = r.waiting()
    res["latency_decomposition_1.1x_seed0"] = decomp
    (out / "diagnose.json").write_text(json.dumps(res, indent=1))
    (out / "diagnose.md").write_text(report(res))
    logger.info("wrote %s and diagnose.md", out / "diagnose.json")
    return 0


def report(res: dict) -> str:
    """diagnose.json -> markdown tables (bench/results/serve_analysis/diagnose.md)."""
    f3 = lambda x: f"{x:.3f}"  # noqa: E731
    lines = [f"# Simulator diagnosis of {res['run']}", "", f"step model: {res['step_model']['source']}", "",
             "## Real ratios to fcfs vs the simulator on the same requests (as run, and what-ifs)", "",
             "| cell | policy | real | sim as run | sim preempt | sim mixed steps (time share) | mixed as graph | aging 0 | margin 0 | c 0 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        for name, real in c["real"].items():
            a = c["as_run"][name]
            lines.append(f"| {c['regime']} {c['load']} s{c['seed']} | {name} | {f3(real)} | {f3(a['ratio'])} | {a['preemptions']} | "
                         f"{a['mixed_steps']} ({a['mixed_time_share']:.0%}) | {f3(c['mixed_as_graph'][name]['ratio'])} | "
                         f"{f3(c['aging_0'][name]['ratio'])} | {f3(c['margin_0'][name]['ratio'])} | {f3(c['c_0'][name]['ratio'])} |")
    lines += ["", "## Saturation: all-at-once vs sustained (simulated, calibrated step model)", "",
              "| regime | all-at-once measured | all-at-once sim | sustained sim (serve.py's search: 300-request probe, growth <= 0.25) | sustained sim (1,000 requests, 3 seeds) | sustained sim, mixed as graph | run's 1.1x / sustained |",
              "|---|---|---|---|---|---|---|"]
    for regime, k in res["knee"].items():
        lines.append(f"| {regime} | {k['all_at_once_measured']:.2f} | {k['all_at_once_sim']:.2f} | {k['sustained_sim']:.2f} | "
                     f"{k['sustained_sim_n1000_3seeds']:.2f} | {k['sustained_sim_mixed_as_graph']:.2f} | {k['offered_1.1x_over_sustained']:.2f} |")
    lines += ["", "## fcfs mean latency (s) vs a scaled step time, ample cells", "", "| cell | x0.9 | x1.0 | x1.1 | x1.2 |", "|---|---|---|---|---|"]
    for s in res["step_time_sensitivity_fcfs_mean_s"]:
        lines.append(f"| {s['load']} s{s['seed']} | {s['x0.9']:.2f} | {s['x1.0']:.2f} | {s['x1.1']:.2f} | {s['x1.2']:.2f} |")
    lines += ["", "## 500 requests, 3 seeds, ample, load x the model's sustained rate: mean latency / fcfs (sd), p99 / fcfs, TTFT / fcfs, preemptions", ""]
    for key, v in res["n500_ample"].items():
        if key.endswith("sustained_req_s"):
            lines.append(f"- {key}: {v:.2f} req/s")
    lines += ["", "| step model, load | policy | mean/fcfs | p99/fcfs | TTFT/fcfs | preemptions | mixed time share |", "|---|---|---|---|---|---|---|"]
    for key, v in res["n500_ample"].items():
        if key.endswith("sustained_req_s"):
            continue
        for name, x in v.items():
            lines.append(f"| {key} | {name} | {x['ratio_mean']:.3f} ± {x['ratio_sd']:.3f} | {x['p99_ratio']:.2f} | "
                         f"{x['ttft_ratio']:.2f} | {x['preemptions']:.0f} | {x['mixed_time_share']:.0%} |")
    lines += ["", "## Where the latency goes (seed 0, 1.1x sustained, 500 requests; seconds per request)", "",
              "| costs, policy | latency | TTFT | in batch | out of batch (queued or preempted) |", "|---|---|---|---|---|"]
    for key, w in res.get("latency_decomposition_1.1x_seed0", {}).items():
        lines.append(f"| {key} | {w['latency_s']:.2f} | {w['ttft_s']:.2f} | {w['in_batch_s']:.2f} | {w['not_in_batch_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:     # re-render diagnose.md from diagnose.json
        d = Path(sys.argv[2] if len(sys.argv) > 2 else ROOT / "bench/results/serve_analysis")
        (d / "diagnose.md").write_text(report(json.loads((d / "diagnose.json").read_text())))
    else:
        raise SystemExit(main())
