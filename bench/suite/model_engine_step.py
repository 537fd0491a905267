"""GPU breakdown of one engine step (issue 11): SmolLM2-135M shape (random bf16 weights: timing
only), trail policy with a probe of the shipped size (d=576, h=512, K=10), 64 requests decoding
together at ~66 tokens of context (prompts of 50 tokens), as in the runner's earlier anchor.

Per decode step at batch 64: host time of scheduler / preparation (preemptions, KV, batch plan and
the packed copy) / launches, the device time of forward / probe / sample (CUDA events, read after
the step's own sync), and the sync wait; plus the steady-state step time without profiling.

    python bench/suite/model_engine_step.py --out DIR
Writes DIR/engine_step.json and DIR/engine_step.summary.txt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models import random_model
from trail.request import SamplingParams
from trail_kernels.probe import ProbeParams


def run(batch: int, prompt_len: int, steps: int, profile: bool) -> tuple[list[dict], list[float], LLMEngine]:
    model = random_model("smollm2-135m", device="cuda", dtype=torch.bfloat16, seed=0)
    probe = ProbeParams.random(model.config.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
    engine = LLMEngine(model, None, EngineConfig(policy="trail", max_batch=batch, max_model_len=1024,
                                                 max_tokens_per_step=batch * prompt_len, num_gpu_blocks=8192,
                                                 prefill_tokens_per_s=1e5),
                       probe=probe, probe_layer=19, profile_phases=profile)
    gen = torch.Generator().manual_seed(0)
    for _ in range(batch):
        engine.add_request(torch.randint(0, 49152, (prompt_len,), generator=gen).tolist(),
                           SamplingParams(max_new_tokens=512, repetition_penalty=1.1), replay_length=steps + 40)
    walls = []
    for i in range(steps + 20):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    decode = [p for p in engine.telemetry.phases if p["rows"] == batch and p["tokens"] == batch]
    return decode[20:], walls[20:], engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=50)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases, _, _ = run(args.batch, args.prompt_len, args.steps, profile=True)
    _, walls, engine = run(args.batch, args.prompt_len, args.steps, profile=False)
    keys = sorted({k for p in phases for k in p if k.endswith("_s")})
    med = {k: statistics.median(p[k] for p in phases if k in p) for k in keys}
    steady = statistics.median(walls)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
              "context": f"{args.prompt_len}+20..{args.prompt_len + args.steps + 20}", "profiled_steps": len(phases),
              "median_phase_s": med, "steady_step_s_unprofiled": steady, "steps_per_s": 1 / steady,
              "tokens_per_s": args.batch / steady}
    (out / "engine_step.json").write_text(json.dumps(result, indent=1))
    lines = [f"engine step, SmolLM2-135M shape (random bf16), trail + probe, batch {args.batch}, "
             f"context ~{args.prompt_len + 20}-{args.prompt_len + args.steps + 20}, {result['device']}",
             f"steady step (no profiling): {1e3 * steady:.2f} ms = {args.batch / steady:.0f} tok/s",
             "median per phase (profiled run; host = CPU time in the phase, device = GPU time of the phase):"]
    lines += [f"  {k:<28} {1e3 * v:8.3f} ms" for k, v in med.items()]
    (out / "engine_step.summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
