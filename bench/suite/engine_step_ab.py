"""Engine step time of two checkouts in one call (issue 22's "within 3% of before"): the steady
decode step of the overlapped loop, `random:<preset>` weights in bf16, a random length probe (the
trail policy, so the probe runs in the graphed step), B requests with prompts of 50-90 tokens.
Each repetition times N consecutive `step()` calls between two device syncs (so every step is
timed to completion) and reports ms per step; the median of the repetitions is the figure. The
floor beside it is the decode step's HBM bytes (weights + the KV read) over 3.35 TB/s.

Uses only API that both the checkout before the serving-core change and after it have, so it runs
against either (put the one to time first on PYTHONPATH):

    PYTHONPATH=ab_before/python:ab_before python bench/suite/engine_step_ab.py --label before --out r.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def run(preset: str, batch: int, reps: int, steps: int, waiting: int = 0) -> dict:
    from trail.engine import LLMEngine
    from trail.engine_config import EngineConfig
    from trail.models.loader import load_model
    from trail.request import SamplingParams
    from trail_kernels.probe import ProbeParams

    dev = torch.device("cuda")
    model = load_model(f"random:{preset}", dev, torch.bfloat16)
    cfg = model.config
    probe = ProbeParams.random(cfg.hidden_size, 512, 10, max_len=512, generator=torch.Generator().manual_seed(0))
    max_len = 96 + 16 + steps * (reps + 2)
    # with waiting requests: c = 0, so no running request is preemptible and, max_batch being
    # full, the queue stays waiting (the scheduler still ranks it every step)
    config = EngineConfig(policy="trail", policy_options={"c": 0.0} if waiting else {},
                          max_batch=batch, max_slots=max(batch + waiting, 64), max_model_len=max_len,
                          max_tokens_per_step=max(2048, batch * 90), num_gpu_blocks=batch * (-(-max_len // 16)) + 64,
                          num_host_blocks=0, prefill_tokens_per_s=1e5, cuda_graph_sizes=(batch,),
                          cuda_graph_tokens=(), overlap=True)
    engine = LLMEngine(model, None, config, probe=probe, probe_layer=cfg.num_layers // 2)
    rng = np.random.default_rng(0)
    for _ in range(batch):
        prompt = rng.integers(100, cfg.vocab_size - 100, int(rng.integers(50, 91))).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=max_len - 96, ignore_eos=True))
    for _ in range(steps):           # prefill, then decoding warm-up
        engine.step()
    for _ in range(waiting):
        prompt = rng.integers(100, cfg.vocab_size - 100, int(rng.integers(50, 91))).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=max_len - 96, ignore_eos=True))
    for _ in range(2):               # the queue's first steps
        engine.step()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps * 1e3)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    ctx = 70 + steps * (1 + reps / 2)            # mean context over the timed steps
    kv = batch * ctx * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    floor_ms = (params + kv) / 3.35e12 * 1e3
    med = statistics.median(times)
    assert engine.scheduler.num_waiting == waiting, "the waiting requests were admitted: not the step meant"
    return {"preset": preset, "batch": batch, "waiting": waiting, "steps_per_rep": steps, "reps_ms": [round(t, 4) for t in times],
            "median_ms": round(med, 4), "floor_ms": round(floor_ms, 4), "pct_of_floor_speed": round(100 * floor_ms / med, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="smollm2-135m:64,smollm2-135m:256,llama3-8b:64")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--waiting", default="0", help="comma-separated waiting-queue lengths, each a run per case")
    args = ap.parse_args()
    import trail
    for case, waiting in [(c, int(w)) for c in args.cases.split(",") for w in args.waiting.split(",")]:
        preset, batch = case.split(":")
        row = {"label": args.label, "trail": trail.__file__, "device": torch.cuda.get_device_name(),
               **run(preset, int(batch), args.reps, args.steps, waiting)}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
