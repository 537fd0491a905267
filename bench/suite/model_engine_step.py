"""GPU breakdown of one engine step (issues 11, 14): decode steps of the trail engine with a probe
of the shipped size (h=512, K=10), random bf16 weights (timing only), CUDA graphs against eager
(EngineConfig.enforce_eager).

Per configuration (model shape, batch, context): the steady step time (median wall time of the
decode steps, no profiling), its host part (CPU time in the step outside the sync wait) and device
part (CUDA events from the execute phase to the sync), tokens/s; for SmolLM2 at batch 64 also the
profiled per-phase split (host: CPU time per phase; device: GPU time per phase, events read after
the step's own sync); graph+ov rows run the overlapped loop (EngineConfig.overlap: the CPU
prepares step n+1 while the GPU runs step n; host ms is then the CPU work of one step, not on the
step's critical path). Llama-3-8B shape rows are set beside the HBM floor and gpt-fast (DESIGN.md).
Mixed steps (decodes + a prompt prefilled in the same step: graph vs eager) and prefill
throughput (8 x 512 tokens in one step) for both shapes.

    python bench/suite/model_engine_step.py --out DIR [--quick]
Writes DIR/engine_step.json and DIR/engine_step.summary.txt.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models import random_model
from trail.request import SamplingParams
from trail.telemetry import STEP_FIELDS
from trail_kernels.probe_params import ProbeParams

# Llama-3-8B shape anchors at ctx 512 (DESIGN.md measured facts): HBM floor, gpt-fast
ANCHORS_8B = {1: (5.36, 7.13), 16: (5.69, 10.69), 64: (6.76, 22.18)}


def run(model, layer: int, batch: int, prompt_len: int, steps: int, eager: bool, profile: bool,
        overlap: bool = False) -> dict:
    probe = ProbeParams.random(model.config.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
    total = prompt_len + steps + 48
    blocks = batch * (-(-total // 16)) + 64
    t0 = time.perf_counter()
    engine = LLMEngine(model, None, EngineConfig(policy="trail", max_batch=batch, max_slots=max(batch, 64),
                                                 max_model_len=total, max_tokens_per_step=max(2048, batch * prompt_len),
                                                 num_gpu_blocks=blocks, prefill_tokens_per_s=1e5, enforce_eager=eager,
                                                 overlap=overlap),
                       probe=probe, probe_layer=layer, profile_phases=profile)
    start_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    for _ in range(batch):
        engine.add_request(torch.randint(0, model.config.vocab_size, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(max_new_tokens=steps + 40, repetition_penalty=1.1), replay_length=steps + 40)
    walls = []
    for _ in range(steps + 10):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    engine._collect_device_time()
    idx = {n: i for i, n in enumerate(STEP_FIELDS)}
    rows = [r for r in engine.telemetry.steps if r[idx["rows"]] == batch and r[idx["tokens"]] == batch][5:]
    host = [r[idx["host_s"]] for r in rows]
    dev = [r[idx["device_s"]] for r in rows if not math.isnan(r[idx["device_s"]])]
    decode_walls = walls[-len(rows):] if rows else walls[10:]
    out = {"batch": batch, "context": f"{prompt_len}..{prompt_len + steps}", "eager": eager, "overlap": overlap,
           "step_ms": 1e3 * statistics.median(decode_walls), "host_ms": 1e3 * statistics.median(host) if host else None,
           "device_ms": 1e3 * statistics.median(dev) if dev else None, "engine_start_s": start_s,
           "graphs": len(engine.runner._graphs), "steps": len(rows)}
    out["tokens_per_s"] = batch / (out["step_ms"] / 1e3)
    if profile:
        phases = [p for p in engine.telemetry.phases if p["rows"] == batch and p["tokens"] == batch][5:]
        keys = sorted({k for p in phases for k in p if k.endswith("_s")})
        out["median_phase_ms"] = {k: 1e3 * statistics.median(p[k] for p in phases if k in p) for k in keys}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_mixed(model, layer: int, batch: int, chunk: int, steps: int, eager: bool) -> dict:
    """Mixed steps: `batch` requests decoding, and each step one new request whose `chunk`-token
    prompt is prefilled in the same step (it stops after its first token, so every measured step
    is `batch` decodes + one prefill of `chunk` tokens). Also prefill throughput: 8 prompts of 512
    tokens in one step."""
    probe = ProbeParams.random(model.config.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
    total = 64 + steps + 48
    engine = LLMEngine(model, None, EngineConfig(policy="fcfs", max_batch=batch + 1, max_slots=batch + steps + 64,
                                                 max_model_len=max(total, 512 + 8), max_tokens_per_step=4096 + batch,
                                                 num_gpu_blocks=(batch + 16) * 40 + 300, prefill_tokens_per_s=1e5,
                                                 enforce_eager=eager),
                       probe=probe, probe_layer=layer)
    gen = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    for _ in range(batch):
        engine.add_request(torch.randint(0, V, (64,), generator=gen).tolist(),
                           SamplingParams(max_new_tokens=steps + 40), replay_length=steps + 40)
    for _ in range(5):
        engine.step()
    walls, graphed = [], 0
    replay = engine.runner.replay
    def counting(b):
        nonlocal graphed
        graphed += 1
        return replay(b)
    engine.runner.replay = counting
    for _ in range(steps):
        engine.add_request(torch.randint(0, V, (chunk,), generator=gen).tolist(), SamplingParams(max_new_tokens=8),
                           replay_length=1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    engine.runner.replay = replay
    while engine.has_unfinished():
        engine.step()
    pre = []
    for _ in range(4):
        for _ in range(8):
            engine.add_request(torch.randint(0, V, (512,), generator=gen).tolist(), SamplingParams(max_new_tokens=8),
                               replay_length=1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        pre.append(time.perf_counter() - t)
    out = {"batch": batch, "chunk": chunk, "eager": eager, "mixed_step_ms": 1e3 * statistics.median(walls[3:]),
           "graphed_steps": graphed, "steps": len(walls),
           "prefill_8x512_ms": 1e3 * statistics.median(pre[1:]),
           "prefill_tokens_per_s": 4096 / statistics.median(pre[1:])}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _mode(r: dict) -> str:
    return "eager" if r["eager"] else "graph+ov" if r.get("overlap") else "graph"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 batch 64 only")
    ap.add_argument("--no-8b", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []

    def log(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        (out / "engine_step.partial.json").write_text(json.dumps(results, indent=1))

    smol = random_model("smollm2-135m", device="cuda", dtype=torch.bfloat16, seed=0)
    for eager in (True, False):
        log({"model": "smollm2-135m", **run(smol, 19, 64, 50, 40, eager, profile=True)})
    log({"model": "smollm2-135m", **run(smol, 19, 64, 50, 40, False, profile=True, overlap=True)})
    mixed = []
    for eager in (True, False):
        r = {"model": "smollm2-135m", **run_mixed(smol, 19, 47, 256, 20, eager)}
        mixed.append(r)
        print(json.dumps(r), flush=True)
    if not args.quick:
        for batch in (1, 16, 256):
            for eager in (True, False):
                log({"model": "smollm2-135m", **run(smol, 19, batch, 50, 30, eager, profile=False)})
        log({"model": "smollm2-135m", **run(smol, 19, 256, 50, 30, False, profile=False, overlap=True)})
    del smol
    gc.collect()
    torch.cuda.empty_cache()
    if not args.quick and not args.no_8b:
        big = random_model("llama3-8b", device="cuda", dtype=torch.bfloat16, seed=0)
        for batch in (1, 16, 64):
            for eager in (True, False):
                r = run(big, 11, batch, 500, 24, eager, profile=False)
                r["floor_ms"], r["gpt_fast_ms"] = ANCHORS_8B[batch]
                log({"model": "llama3-8b", **r})
            r = run(big, 11, batch, 500, 24, False, profile=False, overlap=True)
            r["floor_ms"], r["gpt_fast_ms"] = ANCHORS_8B[batch]
            log({"model": "llama3-8b", **r})
        for eager in (True, False):
            r = {"model": "llama3-8b", **run_mixed(big, 11, 47, 256, 12, eager)}
            mixed.append(r)
            print(json.dumps(r), flush=True)
        del big
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results, "mixed": mixed}
    (out / "engine_step.json").write_text(json.dumps(result, indent=1))
    lines = [f"engine step (trail + probe, random bf16 weights, decode steps), {result['device']}",
             "model          batch context    mode     step ms  host ms  device ms  tok/s     (8B: floor / gpt-fast ms)"]
    for r in results:
        extra = f"  {r['floor_ms']:.2f} / {r['gpt_fast_ms']:.2f}" if "floor_ms" in r else ""
        lines.append(f"{r['model']:<14} {r['batch']:>5} {r['context']:<10} {_mode(r):<8}"
                     f" {r['step_ms']:7.2f}  {r['host_ms'] or float('nan'):7.2f}  {r['device_ms'] or float('nan'):8.2f}"
                     f"  {r['tokens_per_s']:8.0f}{extra}")
    lines.append("mixed steps (47 decodes + one 256-token prompt prefilled in the same step) and prefill of 8 x 512:")
    lines.append("model          mode    mixed step ms  graphed/steps  prefill 8x512 ms  prefill tok/s")
    for r in mixed:
        lines.append(f"{r['model']:<14} {'eager' if r['eager'] else 'graph':<6} {r['mixed_step_ms']:13.2f}  "
                     f"{r['graphed_steps']:>6}/{r['steps']:<6}  {r['prefill_8x512_ms']:16.2f}  {r['prefill_tokens_per_s']:13.0f}")
    for r in results:
        if "median_phase_ms" in r:
            lines.append(f"phases, smollm2-135m batch {r['batch']} {_mode(r)} (median ms):")
            lines += [f"  {k:<28} {v:8.3f}" for k, v in r["median_phase_ms"].items()]
    (out / "engine_step.summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
