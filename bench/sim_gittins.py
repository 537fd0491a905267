"""Gittins-index ranking against expected-remaining ranking (issue 26 item 2), in the calibrated
simulator: on the same requests and seeds, in both memory regimes, at 0.9-1.2x fcfs saturation
(Poisson) and a burst:

    fcfs, sjf_prompt, oracle   as in the other studies
    trail                      ranked by the filter's expected remaining (the mean of its posterior)
    trail_gittins              ranked by the Gittins key of the same posterior (trail.gittins:
                               1 / max_D P(R <= D) / E[min(R, D)], in tokens); admission by the
                               prompt predictor as today
    trail_gittins_init         the same, but the first key after prefill is the mean: the scheduler reads
                               its c window (preemptible while generated < c x (g + first key)) from
                               that value, so this keeps trail's window and changes only the order
    trail_gpu_pred             trail on the committed per-step predictions (recorded on an H100 in
                               bf16): the check that the CPU re-recording ranks the same

The posteriors come from bench/sim_record_predictions.py --posteriors (CPU, SmolLM2 in bf16, the
shipped probe and filter); trail and trail_gittins both read that file, so they differ only in the
key. Writes bench/results/sim/gittins.md (and the per-seed metrics to --json, not committed).

    python bench/sim_gittins.py [--n 2000] [--seeds 0,1,2,3,4] [--jobs 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

if not __package__:      # run as `python bench/sim_gittins.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (ROOT, SHIPPED_PROBE_RECORDED, fmt_or_na, paired_deltas, regime_tables,  # noqa: E402
                          run_sim_grid, study_tasks)
from trail import sim  # noqa: E402

logger = logging.getLogger("sim_gittins")
OUT = ROOT / "bench" / "results" / "sim"
FIT = sim.DATA_DIR / "step_fit_engine_llama3-8b.json"
POSTERIORS = OUT / "posteriors_2026-11-27b.npz"     # git-ignored (bench/results/**/*.npz): regenerate it
LOADS = [0.9, 1.0, 1.1, 1.2]
BURST_LOAD = 1.0
# name -> (policy, predictions mode, pool)
VARIANTS = {
    "fcfs": ("fcfs", "recorded", "post"),
    "sjf_prompt": ("sjf_prompt", "recorded", "post"),
    "trail": ("trail", "recorded", "post"),
    "trail_gittins": ("trail", "gittins", "post"),
    "trail_gittins_init": ("trail", "gittins", "post_init"),
    "trail_gpu_pred": ("trail", "recorded", "gpu"),
    "oracle": ("oracle", "recorded", "post"),
}

_W: dict = {}


def pools(recorded: str, posteriors: str) -> dict:
    """`post`: the requests the posteriors file holds, ranked by it (mean and Gittins key);
    `post_init`: the same with the Gittins key's first value per request replaced by the mean; `gpu`:
    the same requests in the same order with the committed per-step predictions."""
    post = sim.load_recorded(recorded, posteriors=posteriors)
    full = sim.load_recorded(recorded)
    d, q = np.load(recorded), np.load(posteriors)
    have = {str(k) for k in q["ids"]}
    keep = [i for i, k in enumerate(d["ids"]) if str(k) in have]
    pred = np.concatenate([full.pred[full.cu[i]: full.cu[i + 1]] for i in keep])
    init = post.gittins.copy()
    init[post.cu[:-1]] = post.pred[post.cu[:-1]]        # fed after the first token: the c window's read
    return {"post": post, "post_init": dataclasses.replace(post, gittins=init),
            "gpu": dataclasses.replace(post, pred=pred, gittins=None, source=full.source)}


def _init(recorded: str, posteriors: str, fit: str) -> None:
    _W.update(pools=pools(recorded, posteriors), sm=sim.StepTimeModel.from_json(fit), spec=sim.llama3_8b_kv_spec())


def _job(args):
    regime, kind, label, rate, seed, n, name = args
    sm, spec = _W["sm"], _W["spec"]
    pol, mode, which = VARIANTS[name]
    pool = _W["pools"][which]
    arr = sim.burst_arrivals(n, rate, seed) if kind == "burst" else sim.poisson_arrivals(n, rate, seed)
    tr = sim.make_trace(pool, arr, mode, seed=seed)
    res = sim.simulate(tr, sim.regime_engine(regime, pool).with_policy(pol), spec, sm, seed=seed)
    return f"{regime}|{label}", name, seed, res.metrics()


def key_stats(pool, pairs: int = 200_000, seed: int = 0) -> dict:
    """How the two keys differ over the recorded positions (as fed: value - 1): mean Gittins key /
    mean of the means, quantiles of key / mean per position, and the share of random pairs of
    positions the two keys order differently (all pairs, and pairs whose means are < 25 / 50
    tokens apart, the ones a scheduler compares at the margin)."""
    rng = np.random.default_rng(seed)
    m = np.maximum(pool.pred - 1.0, 0.0)
    g = np.maximum(pool.gittins - 1.0, 0.0)
    i, j = rng.integers(0, len(m), pairs), rng.integers(0, len(m), pairs)
    ok = (m[i] != m[j]) & (g[i] != g[j])
    flip = np.sign(m[i] - m[j]) != np.sign(g[i] - g[j])
    first = pool.cu[:-1]
    r = g / np.maximum(m, 1e-6)
    out = {"key_over_mean": float(g.mean() / m.mean()), "pairs_flipped": float(flip[ok].mean()),
           "key_over_mean_g0": float(g[first].mean() / m[first].mean()),
           "ratio_q": {q: float(np.percentile(r, q)) for q in (5, 10, 25, 50)},
           "ratio_below_0.9": float((r < 0.9).mean()), "ratio_below_0.9_g0": float((r[first] < 0.9).mean()),
           "positions": int(len(m)), "requests": int(len(pool))}
    for w in (25, 50):
        near = ok & (np.abs(m[i] - m[j]) < w)
        out[f"pairs_flipped_within_{w}"] = float(flip[near].mean())
    return out


def summarize(groups: dict) -> dict:
    """Per group: sim.compare() plus paired changes against trail: of mean latency / fcfs (the
    headline), of p99 / fcfs and of TTFT / fcfs, mean and sd over seeds."""
    out = {}
    for key, res in groups.items():
        c = sim.compare(res)
        for m, tag in (("mean_latency", "delta"), ("p99_latency", "delta_p99"), ("mean_ttft", "delta_ttft")):
            for name, d in paired_deltas(res, m).items():
                c[name][tag], c[name][tag + "_sd"] = float(d.mean()), float(d.std())
                c[name][tag + "_seeds"] = d.tolist()
        out[key] = c
    return out


def write_md(path: Path, summary: dict, meta: dict, names) -> None:
    ks = meta["key_stats"]
    L = ["# Gittins-index ranking against expected remaining (issue 26 item 2)", "",
         f"Simulator (`trail.sim`, the real policy step `trail._C`), step model `{Path(meta['fit']).name}` "
         f"(this engine, Llama-3-8B shape, H100), KV of Llama-3-8B (`trail.sim.llama3_8b_kv_spec()`), "
         f"{meta['pool_requests']} held-out requests of the shipped probe (`{Path(meta['recorded']).name}`, resampled) "
         f"with the filter's per-step posteriors (`{Path(meta['posteriors']).name}`, recorded on CPU), "
         f"{meta['n']} requests x seeds {meta['seeds']}. Saturation (fcfs, all at t = 0): "
         f"ample {meta['saturation_rps']['ample']:.2f} req/s, kv {meta['saturation_rps']['kv']:.2f} req/s. "
         f"Burst: half the requests Poisson, half in bursts of 200, at {BURST_LOAD}x. "
         f"Wall time {meta['wall_s']:.0f} s on {meta['jobs']} processes.", "",
         "Regenerate: `" + meta["command"] + "`", "",
         f"The keys over the {ks['positions']:,} recorded positions (as fed): mean Gittins key / mean expected "
         f"remaining {ks['key_over_mean']:.3f} ({ks['key_over_mean_g0']:.3f} right after prefill); "
         f"{ks['pairs_flipped'] * 100:.1f}% of random pairs of positions are ordered differently by the two keys "
         f"({ks['pairs_flipped_within_25'] * 100:.1f}% of those whose means are < 25 tokens apart, "
         f"{ks['pairs_flipped_within_50'] * 100:.1f}% < 50); key / mean per position: 5th / 10th / 25th / 50th "
         f"percentile {' / '.join(f'{v:.2f}' for v in ks['ratio_q'].values())}, below 0.9 at "
         f"{ks['ratio_below_0.9'] * 100:.0f}% of positions ({ks['ratio_below_0.9_g0'] * 100:.0f}% right after prefill).", "",
         "## Verdict (written by hand from this run)", "", "VERDICT", "",
         "Ratios are per-seed ratios to fcfs averaged over seeds (± sd over seeds); Δ = paired change against "
         "trail (same requests and seeds, negative = better) of mean/fcfs, p99/fcfs and TTFT/fcfs, ± sd over "
         "seeds; oracle frac = share of the oracle's mean-latency gain over fcfs (n/a where the oracle gains < 10%).", ""]
    L += regime_tables(
        summary, names, "| load | variant | mean/fcfs | Δ mean | p99/fcfs | Δ p99 | TTFT/fcfs | Δ TTFT | oracle frac |",
        lambda label, name, d: (
            f"| {label} | {name} | {d['mean_latency_vs_fcfs']:.3f} ± {d['mean_latency_vs_fcfs_sd']:.3f} | "
            f"{d['delta']:+.3f} ± {d['delta_sd']:.3f} | {d['p99_latency_vs_fcfs']:.2f} | "
            f"{d['delta_p99']:+.2f} ± {d['delta_p99_sd']:.2f} | {d['mean_ttft_vs_fcfs']:.2f} | "
            f"{d['delta_ttft']:+.2f} ± {d['delta_ttft_sd']:.2f} | {fmt_or_na(d.get('oracle_fraction'), '.2f')} |"))
    L += ["## Gittins - trail per seed (Δ mean/fcfs)", "", "| regime | load | per seed | mean ± sd |", "|---|---|---|---|"]
    for key, c in summary.items():
        r, label = key.split("|", 1)
        if "trail_gittins" not in c:
            continue
        d = c["trail_gittins"]
        L.append(f"| {r} | {label} | {' '.join(f'{x:+.3f}' for x in d['delta_seeds'])} | "
                 f"{d['delta']:+.3f} ± {d['delta_sd']:.3f} |")
    L.append("")
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--fit", default=str(FIT), help="step-time model JSON (default: the engine-calibrated 8B fit)")
    ap.add_argument("--recorded", default=str(SHIPPED_PROBE_RECORDED), help="recorded predictions (.npz)")
    ap.add_argument("--posteriors", default=str(POSTERIORS),
                    help="posteriors npz (bench/sim_record_predictions.py --posteriors)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(OUT / "gittins.md"))
    ap.add_argument("--json", default=None, help="also write the per-seed metrics here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [v for v in args.variants.split(",") if v]
    for need in ("fcfs", "trail"):
        if need not in names:
            raise SystemExit(f"--variants must include {need} (the ratios and deltas are against it)")
    t0 = time.time()
    _init(args.recorded, args.posteriors, args.fit)
    pool, sm, spec = _W["pools"]["post"], _W["sm"], _W["spec"]
    ks = key_stats(pool)
    logger.info("keys: %s", ks)
    sat, labels, tasks = study_tasks(pool, sm, spec, args.n, seeds, names, LOADS, BURST_LOAD)
    logger.info("saturation %s", sat)
    groups = run_sim_grid(_job, tasks, args.jobs, _init, (args.recorded, args.posteriors, args.fit), list(sat),
                          labels, names, seeds)
    summary = summarize(groups)
    cmd = ("PYTHONPATH=python:. OMP_NUM_THREADS=1 python bench/sim_gittins.py "
           f"--n {args.n} --seeds {args.seeds} --jobs {args.jobs}"
           + ("" if args.fit == str(FIT) else f" --fit {args.fit}")
           + ("" if args.recorded == str(SHIPPED_PROBE_RECORDED) else f" --recorded {args.recorded}")
           + ("" if args.posteriors == str(POSTERIORS) else f" --posteriors {args.posteriors}"))
    meta = {"n": args.n, "seeds": seeds, "jobs": args.jobs, "fit": args.fit, "recorded": args.recorded,
            "posteriors": args.posteriors, "pool_requests": len(pool), "saturation_rps": sat, "key_stats": ks,
            "step_model": sm.__dict__, "wall_s": time.time() - t0, "command": cmd}
    write_md(Path(args.out), summary, meta, names)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "raw": groups}, indent=1,
                                              default=float))
    logger.info("wrote %s in %.0f s", args.out, time.time() - t0)


if __name__ == "__main__":
    main()
