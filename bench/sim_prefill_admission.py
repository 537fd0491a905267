"""Admission by the prefill probe with its cost charged (issue 26 item 1), in the calibrated
simulator: on the same requests and seeds, in both memory regimes, at 0.9-1.2x fcfs saturation
(Poisson) and a burst, fcfs / sjf_prompt / trail / oracle against trail whose waiting requests are
ranked by the prefill probe (`trail.sim_admission.ProbeAdmission`):

    trail+probe free   the probe's value at add, no cost (the earlier ablation's upper bound)
    trail+probe (a)    prompt through layers 0..L in the next step (L/num_layers of a prefill per
                       token, no KV kept), ranked by the probe from the step after
    trail+probe (a) pb the same, probing only in steps that already prefill (no extra mixed step)
    trail+prefill (b)  full prefill at arrival, KV kept (evictable) while waiting, prefill skipped
                       at admission

Writes bench/results/sim/prefill_admission.md (and the raw per-seed metrics to --json, not
committed by default).

    python bench/sim_prefill_admission.py [--n 2000] [--seeds 0,1,2] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

if not __package__:      # run as `python bench/sim_prefill_admission.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (ROOT, SHIPPED_PROBE_RECORDED, fmt_or_na, paired_deltas, regime_tables,  # noqa: E402
                          run_sim_grid, study_tasks)
from trail import sim  # noqa: E402
from trail.sim_admission import ProbeAdmission  # noqa: E402

logger = logging.getLogger("sim_prefill_admission")
OUT = ROOT / "bench" / "results" / "sim"
FIT = sim.DATA_DIR / "step_fit_serve_llama3-8b.json"      # validated against serving runs
LOADS = [0.9, 1.0, 1.1, 1.2]
BURST_LOAD = 1.0
PROBE_FRAC = 19 / 30        # SmolLM2-135M: probe at layer 19 of 30; assumed the same for the 8B shape
# name -> (policy, admission mode or None, ProbeAdmission options)
VARIANTS = {
    "fcfs": ("fcfs", None, {}),
    "sjf_prompt": ("sjf_prompt", None, {}),
    "trail": ("trail", None, {}),
    "trail+probe free": ("trail", "free", {}),
    "trail+probe (a)": ("trail", "probe", {}),
    "trail+probe (a) pb": ("trail", "probe", {"piggyback": True}),
    "trail+prefill (b)": ("trail", "kv", {}),
    "oracle": ("oracle", None, {}),
}

_W: dict = {}


def _init(recorded: str, fit: str, probe_frac: float) -> None:
    _W.update(pool=sim.load_recorded(recorded), sm=sim.StepTimeModel.from_json(fit), spec=sim.llama3_8b_kv_spec(),
              frac=probe_frac)


def _job(args):
    regime, kind, label, rate, seed, n, name = args
    pool, sm, spec = _W["pool"], _W["sm"], _W["spec"]
    arr = sim.burst_arrivals(n, rate, seed) if kind == "burst" else sim.poisson_arrivals(n, rate, seed)
    tr = sim.make_trace(pool, arr, "recorded", seed=seed)
    pol, mode, opts = VARIANTS[name]
    adm = None if mode is None else ProbeAdmission(mode, probe_frac=_W["frac"], **opts)
    res = sim.simulate(tr, sim.regime_engine(regime, pool).with_policy(pol), spec, sm, seed=seed, admission=adm)
    m = res.metrics()
    m["admission"] = res.config.get("admission")
    return f"{regime}|{label}", name, seed, m


def summarize(groups: dict) -> dict:
    """Per group: sim.compare() plus the paired change of mean latency / fcfs against trail."""
    out = {}
    for key, res in groups.items():
        c = sim.compare(res)
        for name, d in paired_deltas(res, "mean_latency").items():
            runs = res[name]
            c[name]["delta_vs_trail"], c[name]["delta_vs_trail_sd"] = float(d.mean()), float(d.std())
            adm = [r.get("admission") for r in runs if r.get("admission")]
            if adm:
                c[name]["probed_requests"] = float(np.mean([a["probed_requests"] for a in adm]))
                c[name]["cache_evictions"] = float(np.mean([a.get("cache_evictions", 0) for a in adm]))
        out[key] = c
    return out


def write_md(path: Path, summary: dict, meta: dict) -> None:
    L = ["# Admission by the prefill probe, its cost charged (issue 26 item 1)", "",
         f"Simulator (`trail.sim`, the real policy step `trail._C`), step model `{Path(meta['fit']).name}` "
         f"(this engine, Llama-3-8B shape, H100: per prefill token {meta['step_model']['per_prefill_token_s'] * 1e6:.1f} us, "
         f"mixed-step extra {meta['step_model']['mixed_base_s'] * 1e3:.1f} ms, decode base "
         f"{meta['step_model']['base_s'] * 1e3:.1f} ms), KV of Llama-3-8B, recorded predictions of the shipped probe "
         f"(`{Path(meta['recorded']).name}`, {meta['pool_requests']} held-out requests resampled), "
         f"{meta['n']} requests x seeds {meta['seeds']}, probe fraction {meta['probe_frac']:.3f} (layer 19 of 30). "
         f"Saturation (fcfs, all at t = 0): ample {meta['saturation_rps']['ample']:.2f} req/s, "
         f"kv {meta['saturation_rps']['kv']:.2f} req/s. Burst: half the requests Poisson, half in bursts of 200, "
         f"at {BURST_LOAD}x. Wall time {meta['wall_s']:.0f} s on {meta['jobs']} processes.", "",
         "Regenerate: `" + meta["command"] + "`", "",
         "Ratios are per-seed ratios to fcfs averaged over seeds (± sd over seeds); Δ trail = paired change of "
         "mean/fcfs against today's trail (negative = better) ± sd over seeds; oracle frac = share of the oracle's "
         "mean-latency gain over fcfs (n/a where the oracle gains < 10%); probed = requests probed / prefilled "
         "before admission per run; evicted = (b)'s kept KV dropped before admission.", ""]
    L += regime_tables(
        summary, list(VARIANTS),
        "| load | variant | mean/fcfs | Δ trail | p99/fcfs | TTFT/fcfs | oracle frac | probed | evicted |",
        lambda label, name, d: (
            f"| {label} | {name} | {d['mean_latency_vs_fcfs']:.3f} ± {d['mean_latency_vs_fcfs_sd']:.3f} | "
            f"{d['delta_vs_trail']:+.3f} ± {d['delta_vs_trail_sd']:.3f} | {d['p99_latency_vs_fcfs']:.2f} | "
            f"{d['mean_ttft_vs_fcfs']:.2f} | {fmt_or_na(d.get('oracle_fraction'), '.2f')} | "
            f"{fmt_or_na(d.get('probed_requests'), '.0f')} | {fmt_or_na(d.get('cache_evictions'), '.0f')} |"))
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--probe-frac", type=float, default=PROBE_FRAC)
    ap.add_argument("--fit", default=str(FIT), help="step-time model JSON (default: the 8B fit to serving telemetry)")
    ap.add_argument("--recorded", default=str(SHIPPED_PROBE_RECORDED), help="recorded predictions (.npz)")
    ap.add_argument("--out", default=str(OUT / "prefill_admission.md"))
    ap.add_argument("--json", default=None, help="also write the per-seed metrics here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    _init(args.recorded, args.fit, args.probe_frac)
    pool, sm, spec = _W["pool"], _W["sm"], _W["spec"]
    sat, labels, tasks = study_tasks(pool, sm, spec, args.n, seeds, list(VARIANTS), LOADS, BURST_LOAD)
    logger.info("saturation %s", sat)
    groups = run_sim_grid(_job, tasks, args.jobs, _init, (args.recorded, args.fit, args.probe_frac), list(sat),
                          labels, list(VARIANTS), seeds)
    summary = summarize(groups)
    cmd = ("PYTHONPATH=python:. OMP_NUM_THREADS=1 python bench/sim_prefill_admission.py "
           f"--n {args.n} --seeds {args.seeds} --jobs {args.jobs}"
           + ("" if args.probe_frac == PROBE_FRAC else f" --probe-frac {args.probe_frac}")
           + ("" if args.fit == str(FIT) else f" --fit {args.fit}")
           + ("" if args.recorded == str(SHIPPED_PROBE_RECORDED) else f" --recorded {args.recorded}"))
    meta = {"n": args.n, "seeds": seeds, "jobs": args.jobs, "probe_frac": args.probe_frac, "fit": args.fit,
            "recorded": args.recorded, "pool_requests": len(pool), "saturation_rps": sat,
            "step_model": sm.__dict__, "wall_s": time.time() - t0, "command": cmd}
    write_md(Path(args.out), summary, meta)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "raw": groups}, indent=1,
                                              default=float))
    logger.info("wrote %s in %.0f s", args.out, time.time() - t0)

if __name__ == "__main__":
    main()
