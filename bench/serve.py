"""End-to-end serving benchmark: fcfs vs sjf_prompt vs trail (variants) vs oracle on one engine,
the same requests, open-loop arrivals in real time (issue 16; run by `bench/gpu_suite.sh serve`
through bench/suite/serve_smollm2.py).

Workload: held-out requests of the recorded trace (bench/results/predictor/trace.jsonl.gz: prompts
of ShareGPT / Alpaca and SmolLM2-135M-Instruct's recorded output lengths, greedy with repetition
penalty 1.1, max 512 new tokens), replayed: each request stops at its recorded length with EOS
ignored, so every policy does the same work; the predictors only see the 512 cap. Arrivals: Poisson
at a load x the saturation rate measured first in the same run (fcfs, all requests at once:
completed requests per second), or a burst (all at once). Memory regimes: `ample` (a batch cap,
KV for every running request) and `kv` (a GPU pool for --kv-requests average requests + host blocks:
memory binds, so keep / swap / recompute happen).

    python bench/serve.py --out DIR [--model GGUF|HF_DIR|random:PRESET] [--regimes ample,kv]
        [--loads 1.0,1.1,burst] [--seeds 0,1,2] [--num-requests 120] [--budget-s 420]

Cells (regime x load x seed) run in that order until the time budget is spent; the JSON says which
ran. Per cell and policy: compare.summarize's figures (mean / p50 / p99 latency, TTFT, throughput,
preemptions, swaps, recomputed tokens) plus the ratio to fcfs, the oracle fraction and the ratio to
sjf_prompt; tables (serve.summary.txt) and plots (latency / TTFT / p99 vs load per regime).
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from trail.compare import ReplayRequest, compare, run_policy
from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.request import SamplingParams
from trail.scheduler_types import TRAIL_PAPER

logger = logging.getLogger("serve")
ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "bench" / "results" / "predictor" / "trace.jsonl.gz"

# name -> (policy, policy_options)
POLICIES = {
    "fcfs": ("fcfs", {}),
    "sjf_prompt": ("sjf_prompt", {}),
    "trail": ("trail", {}),                       # c 0.8 + memory-aware admission, aging (defaults)
    "trail_c0": ("trail", {"c": 0.0}),
    "trail_noaging": ("trail", {"aging_rate": 0.0}),
    "trail_paper": ("trail", dict(TRAIL_PAPER)),  # TRAIL as published
    "oracle": ("oracle", {}),
}


def held_out_requests(max_prompt: int = 512) -> list[tuple[list[int], int]]:
    """(prompt ids, recorded output length) of the trace's val + test requests (never trained on)."""
    from trail.predictor.bins import split_of

    out = []
    with gzip.open(TRACE, "rt") as f:
        next(f)
        for line in f:
            r = json.loads(line)
            if split_of(r["id"]) in ("val", "test") and len(r["prompt_ids"]) <= max_prompt:
                out.append((r["prompt_ids"], len(r["output_ids"])))
    return out


def workload(pool, n: int, rate: float | None, seed: int) -> list[ReplayRequest]:
    """n requests drawn from `pool` (without replacement while it lasts); Poisson arrivals at
    `rate` req/s, or all at t = 0 when rate is None."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(pool))[:n] if n <= len(pool) else rng.integers(0, len(pool), n)
    arrivals = np.zeros(n) if rate is None else np.cumsum(rng.exponential(1.0 / rate, n))
    return [ReplayRequest(pool[i][0], pool[i][1], float(t)) for i, t in zip(idx, arrivals)]


def load_parts(model_source: str, device: str):
    from trail.models.loader import load_model
    from trail.predictor.probe_file import load_probe_params, shipped_probe_dir
    from trail_kernels.probe import ProbeParams

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_source, device, dtype)
    if model_source.startswith("random:"):       # timing / smoke runs: a random probe of the shipped size
        probe = ProbeParams.random(model.config.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
        return model, probe, min(19, model.config.num_layers - 1), None
    shipped = shipped_probe_dir("SmolLM2-135M-Instruct")
    probe, spec = load_probe_params(shipped / "probe", expect_d=model.config.hidden_size)
    from trail.engine import prompt_predictor_fn

    return model, probe, spec.layer, prompt_predictor_fn(shipped / "prompt_boe", model, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="GGUF file, HF folder or random:PRESET (default: SmolLM2)")
    ap.add_argument("--regimes", default="ample,kv")
    ap.add_argument("--loads", default="1.0,1.1,burst")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--num-requests", type=int, default=120)
    ap.add_argument("--policies", default="fcfs,sjf_prompt,trail,trail_paper,oracle")
    ap.add_argument("--max-batch", type=int, default=48)
    ap.add_argument("--kv-requests", type=float, default=24, help="kv regime: GPU pool for this many average requests")
    ap.add_argument("--host-blocks", type=int, default=128)
    ap.add_argument("--max-output", type=int, default=512, help="use only requests with recorded lengths up to this")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.model is None:
        from trail.assets import smollm2_gguf_path, smollm2_hf_dir
        args.model = str(smollm2_hf_dir() if args.device == "cpu" else smollm2_gguf_path())
    model, probe, layer, predictor = load_parts(args.model, args.device)
    vocab = model.config.vocab_size
    pool = [([t % vocab for t in p], n) for p, n in held_out_requests() if n <= args.max_output]  # % vocab: identity for SmolLM2
    policies = args.policies.split(",")
    if predictor is None:
        policies = [p for p in policies if p != "sjf_prompt"]
    mean_total = float(np.mean([len(p) + n for p, n in pool]))
    params = SamplingParams(max_new_tokens=512, repetition_penalty=1.1)
    rate_cache = {}

    def make_engine_for(regime):
        def make(name):
            policy, options = POLICIES[name]
            gc.collect()                     # the previous policy's engine and its KV pool go first
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # ample: KV for max_batch requests of max_model_len (the batch cap binds, memory never)
            kw = dict(num_gpu_blocks=args.max_batch * 1024 // 16, num_host_blocks=0)
            if regime == "kv":
                kw = dict(num_gpu_blocks=int(args.kv_requests * mean_total / 16), num_host_blocks=args.host_blocks)
            config = EngineConfig(policy=policy, policy_options=options, max_batch=args.max_batch,
                                  max_slots=max(1024, args.num_requests), max_model_len=1024,
                                  prefill_tokens_per_s=rate_cache.get("prefill"), **kw)
            engine = LLMEngine(model, None, config, probe=probe, probe_layer=layer, probe_max_new=512,
                               prompt_predictor=predictor, eos_token_ids=[2])
            rate_cache["prefill"] = engine.prefill_tokens_per_s
            return engine
        return make

    result = {"model": args.model, "max_output": args.max_output, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "num_requests": args.num_requests, "max_batch": args.max_batch, "policies": policies,
              "pool": len(pool), "cells": [], "skipped": []}
    regimes, sat = args.regimes.split(","), {}
    # warm-up (Triton compiles, caches, allocator): not measured, so saturation is not understated
    run_policy(make_engine_for(regimes[0]), "fcfs", workload(pool, min(args.num_requests, 48), None, 999), params)
    for regime in regimes:
        # saturation: fcfs with every request at once, completed requests per second
        sat_run = run_policy(make_engine_for(regime), "fcfs", workload(pool, args.num_requests, None, 1000), params)
        sat[regime] = result[f"saturation_req_s_{regime}"] = args.num_requests / sat_run["makespan_s"]
        logger.info("%s: saturation %.2f req/s", regime, sat[regime])
    # seed-major, so that a budget cut leaves whole seeds of every regime and load
    for seed in (int(s) for s in args.seeds.split(",")):
        for regime in regimes:
            make = make_engine_for(regime)
            for load in args.loads.split(","):
                if time.perf_counter() - t_start > args.budget_s:
                    result["skipped"].append([regime, load, seed])
                    continue
                rate = None if load == "burst" else float(load) * sat[regime]
                reqs = workload(pool, args.num_requests, rate, seed)
                runs = {name: run_policy(make, name, reqs, params) for name in policies}
                cmp = compare(runs)
                result["cells"].append({"regime": regime, "load": load, "seed": seed, "rate_req_s": rate, **cmp})
                logger.info("%s %s seed %d: %s", regime, load, seed,
                            {n: round(s.get("latency_ratio_to_fcfs", 1.0), 3) for n, s in cmp["policies"].items()})
                (out / "serve.json").write_text(json.dumps(result, indent=1))
    result["wall_s"] = time.perf_counter() - t_start
    (out / "serve.json").write_text(json.dumps(result, indent=1))
    lines = [f"serving benchmark on {result['device']}: {args.model}, {args.num_requests} requests per run "
             f"(replayed lengths), max batch {args.max_batch}; skipped (budget): {result['skipped']}"]
    for regime in args.regimes.split(","):
        lines.append(f"{regime}: saturation {result.get(f'saturation_req_s_{regime}', float('nan')):.2f} req/s")
    lines.append(f"{'regime':<6}{'load':>6}{'seed':>5}  {'policy':<14}{'mean s':>8}{'/fcfs':>7}{'p99/fcfs':>9}"
                 f"{'TTFT/fcfs':>10}{'oracle%':>8}{'preempt':>8}{'recomp':>8}")
    for c in result["cells"]:
        for name, s in c["policies"].items():
            frac = s.get("oracle_gain_fraction")
            lines.append(f"{c['regime']:<6}{c['load']:>6}{c['seed']:>5}  {name:<14}{s['mean_latency_s']:>8.2f}"
                         f"{s['latency_ratio_to_fcfs']:>7.3f}{s['p99_ratio_to_fcfs']:>9.2f}{s['ttft_ratio_to_fcfs']:>10.2f}"
                         f"{'' if frac is None else f'{100 * frac:.0f}':>8}{s['preemptions']:>8}{s['recomputed_tokens']:>8}")
    (out / "serve.summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(result, out)
    return 0


def _plot(result: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for regime in {c["regime"] for c in result["cells"]}:
        cells = [c for c in result["cells"] if c["regime"] == regime and c["load"] != "burst"]
        if not cells:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key, title in zip(axes, ("mean_latency_s", "mean_ttft_s", "p99_latency_s"),
                                  ("mean latency (s)", "mean TTFT (s)", "p99 latency (s)")):
            for name in result["policies"]:
                pts = sorted((float(c["load"]), c["policies"][name][key]) for c in cells if name in c["policies"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xlabel("load (x measured saturation)")
            ax.set_title(title)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{regime} regime, {result['device']}")
        fig.tight_layout()
        fig.savefig(out / f"serve_{regime}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
