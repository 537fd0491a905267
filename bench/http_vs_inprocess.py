"""HTTP against in-process serving, same machine, same requests (issue 28's comparison): a burst
of N requests from a trace, each forced to its recorded length (capped at --max-tokens), greedy,
served (a) by an in-process `LLMEngine` stepping to completion and (b) by `trail serve` with the
same model, policy and limits, driven by `trail bench-serve`'s client (streamed SSE). Per request:
latency (arrival to last token) and TTFT; the table gives the means, p99 and HTTP / in-process
ratios. Each mode runs twice in the order A B B A (in-process, HTTP, HTTP, in-process): the two runs
of a mode give its run-to-run noise floor.

    python bench/http_vs_inprocess.py --model random:llama3-8b --device cuda --dtype bfloat16 \\
        --burst 200 --out DIR                                     # the GPU comparison
    python bench/http_vs_inprocess.py --model random:tiny --burst 32  # CPU smoke run

Writes DIR/http_vs_inprocess.json and prints the table. Device and model are named in both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

if not __package__:      # run as `python bench/http_vs_inprocess.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT  # noqa: E402

TRACE = ROOT / "tests" / "data" / "trace_smollm2_val_test.jsonl.gz"


def _requests(args):
    """The burst's requests; on a `random:<preset>` model with a smaller vocabulary than the
    trace's tokenizer, prompt ids are taken modulo its vocabulary (the same for both modes)."""
    from dataclasses import replace

    from trail.bench_serve import load_trace, workload
    from trail.models.config import preset
    from trail.server.random_parts import random_preset

    trace = [r for r in load_trace(args.trace) if r.prompt_ids is not None and r.output_len]
    idx, _ = workload(len(trace), args.burst, None, args.seed)
    reqs = [trace[i] for i in idx]
    name = random_preset(args.model)
    if name is not None:
        vocab = preset(name).vocab_size
        reqs = [replace(r, prompt_ids=[t % vocab for t in r.prompt_ids]) for r in reqs]
    return reqs


def _engine_options(args) -> list[str]:
    return ["--policy", args.policy, "--max-batch", str(args.max_batch), "--max-slots", str(max(args.burst, 64)),
            "--max-model-len", str(args.max_model_len), "--device", args.device, "--dtype", args.dtype,
            "--default-max-tokens", str(args.max_tokens)] + (["--kv-cache-gib", "0.2"] if args.device == "cpu" else [])


def in_process(args, reqs) -> dict:
    import torch

    from trail import EngineConfig, LLMEngine, SamplingParams
    from trail.server.random_parts import engine_parts

    parts = engine_parts(args.model, probe="shipped", prompt_predictor="boe", device=args.device,
                         dtype=getattr(torch, args.dtype))
    config = EngineConfig(policy=args.policy, max_batch=args.max_batch, max_slots=max(args.burst, 64),
                          max_model_len=args.max_model_len, **({"kv_cache_gib": 0.2} if args.device == "cpu" else {}))
    engine = LLMEngine(config=config, **parts)
    ids = [engine.add_request(list(r.prompt_ids), SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0,
                                                                 replay_length=min(r.output_len, args.max_tokens)))
           for r in reqs]
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    outs = [final[i] for i in ids]
    return {"latency": [o.metrics.latency for o in outs], "ttft": [o.metrics.ttft for o in outs],
            "tokens": [len(o.token_ids) for o in outs]}


def over_http(args, reqs) -> dict:
    from trail.bench_serve import request_body, run
    from trail.server.process import ServeProcess

    server = ServeProcess(args.model, *_engine_options(args), timeout=600)
    try:
        bodies = [request_body(r, model=args.model, force=True, max_tokens=args.max_tokens) for r in reqs]
        records, _ = asyncio.run(run(server.url, bodies, np.zeros(len(bodies))))
    finally:
        server.stop(timeout=120)
    bad = [r for r in records if r.get("error")]
    if bad:
        raise RuntimeError(f"{len(bad)} HTTP requests failed: {bad[0]}")
    return {"latency": [r["latency_s"] for r in records], "ttft": [r["ttft_s"] for r in records],
            "tokens": [r["output_tokens"] for r in records]}


def _stats(run: dict) -> dict:
    lat, ttft = np.array(run["latency"]), np.array(run["ttft"])
    return {"mean_latency_s": float(lat.mean()), "p99_latency_s": float(np.percentile(lat, 99)),
            "mean_ttft_s": float(ttft.mean()), "p99_ttft_s": float(np.percentile(ttft, 99))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64, help="the cap; forced lengths are capped at it")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    reqs = _requests(args)
    runs = {}
    for i, mode in enumerate(("in_process", "http", "http", "in_process")):
        t0 = time.perf_counter()
        run = in_process(args, reqs) if mode == "in_process" else over_http(args, reqs)
        runs.setdefault(mode, []).append(run)
        print(f"run {i + 1}/4 {mode}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    for a, b in zip(runs["in_process"][0]["tokens"], runs["http"][0]["tokens"]):
        assert a == b, "the two modes served different lengths: not the same work"
    stats = {m: [_stats(r) for r in rs] for m, rs in runs.items()}
    import torch
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    mean = {m: {k: float(np.mean([s[k] for s in ss])) for k in ss[0]} for m, ss in stats.items()}
    noise = {m: abs(float(np.log(ss[1]["mean_latency_s"] / ss[0]["mean_latency_s"]))) for m, ss in stats.items()}
    result = {"device": device, "model": args.model, "policy": args.policy, "burst": args.burst,
              "max_tokens": args.max_tokens, "runs": stats, "mean": mean,
              "noise_floor_log_ratio": noise,
              "http_over_in_process": {"mean_latency": mean["http"]["mean_latency_s"] / mean["in_process"]["mean_latency_s"],
                                       "mean_ttft_ms_added": 1e3 * (mean["http"]["mean_ttft_s"]
                                                                    - mean["in_process"]["mean_ttft_s"])}}
    lines = [f"HTTP vs in-process, {args.model} ({args.policy}), burst {args.burst}, forced lengths <= "
             f"{args.max_tokens}, {device}",
             f"{'mode':12s}{'mean lat s':>12s}{'p99 lat s':>11s}{'mean TTFT s':>13s}{'p99 TTFT s':>12s}  run-to-run"]
    for m in ("in_process", "http"):
        s = mean[m]
        lines.append(f"{m:12s}{s['mean_latency_s']:>12.3f}{s['p99_latency_s']:>11.3f}{s['mean_ttft_s']:>13.3f}"
                     f"{s['p99_ttft_s']:>12.3f}  {100 * noise[m]:.1f}%")
    h = result["http_over_in_process"]
    lines.append(f"HTTP / in-process mean latency {h['mean_latency']:.3f}x; TTFT {h['mean_ttft_ms_added']:+.1f} ms")
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "http_vs_inprocess.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
