"""Host time of the engine step on CPU: what the engine's own Python / numpy / scheduler work costs
per step, so a host regression shows without a GPU.

A tiny random model (the `tiny` preset) and a small probe on CPU, the default loop (overlap), the
trail policy with c = 0 (no request is preemptible, so the waiting queue stays waiting): 64 or 256
requests decoding, 0 or 4,096 requests waiting (never admitted: max_batch is the running count,
but the scheduler ranks them every step). Device work on CPU would swamp the host phases, so
these come from the engine's own phase profile (`LLMEngine(profile_phases=True)`: host seconds
per phase in `engine.telemetry.phases`): the medians of schedule, prepare (the plan turned into
the runner's tensors) and postprocess (tokens appended, stop checks, outputs) per step are in
`extra_info`, with their sum (`host_s`); the benchmark's own time is the full step (the tiny
forward, probe and sample included). Run:
    pytest bench/micro -k engine_host --benchmark-enable [--benchmark-json=out.json]
CI runs it once as a smoke run (scripts/test_cpu.sh, --benchmark-disable).
"""
from __future__ import annotations

import statistics

import pytest
import torch

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models import random_model
from trail.request import SamplingParams
from trail.telemetry import STEP_FIELDS
from trail_kernels.probe_params import ProbeParams

PROMPT, MAX_NEW = 8, 160
ROUNDS, WARMUP = 20, 3
HOST_PHASES = ("schedule", "prepare", "postprocess")
F = {n: i for i, n in enumerate(STEP_FIELDS)}


@pytest.fixture(scope="module")
def tiny():
    """The model and probe; torch on one thread meanwhile (the tiny matmuls gain nothing from
    more, and on a busy CI machine extra threads only wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = random_model("tiny", seed=3)
    probe = ProbeParams.random(model.config.hidden_size, 32, 8, max_len=256, generator=torch.Generator().manual_seed(0))
    yield model, probe
    torch.set_num_threads(threads)


def steady_engine(tiny, running: int, waiting: int) -> LLMEngine:
    """`running` requests decoding (their prompts prefilled) and `waiting` queued behind them."""
    model, probe = tiny
    n_slots = running + waiting + 8
    config = EngineConfig(policy="trail", policy_options={"c": 0.0}, max_batch=running, max_slots=n_slots,
                          max_model_len=PROMPT + MAX_NEW, max_tokens_per_step=max(2048, running * PROMPT),
                          num_gpu_blocks=running * -(-(PROMPT + MAX_NEW) // 16) + 64, num_host_blocks=0,
                          prefill_tokens_per_s=1e5)
    engine = LLMEngine(model, None, config, probe=probe, probe_layer=1, profile_phases=True)
    gen = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    for _ in range(running):
        engine.add_request(torch.randint(0, V, (PROMPT,), generator=gen).tolist(), params)
    for _ in range(4):                   # prefill (one step), then decoding
        engine.step()
    for _ in range(waiting):
        engine.add_request(torch.randint(0, V, (PROMPT,), generator=gen).tolist(), params)
    engine.step()
    return engine


@pytest.mark.parametrize("waiting", [0, 4096])
@pytest.mark.parametrize("running", [64, 256])
def test_engine_step_host(benchmark, tiny, running, waiting):
    engine = steady_engine(tiny, running, waiting)
    n_steps, n_phases = len(engine.telemetry.steps), len(engine.telemetry.phases)
    benchmark.group = "engine step on CPU (tiny model): host phases in extra_info"
    benchmark.pedantic(engine.step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    engine.step()                        # with overlap the last timed step completes here
    steps = engine.telemetry.steps[n_steps:]
    phases = engine.telemetry.phases[n_phases:]
    assert steps and all(s[F["rows"]] == running and s[F["tokens"]] == running for s in steps), \
        "a timed step was not a pure decode of the running requests"
    assert engine.num_unfinished == running + waiting
    med = {p: statistics.median(ph[f"host_{p}_s"] for ph in phases) for p in HOST_PHASES}
    benchmark.extra_info.update({"running": running, "waiting": waiting, "steps": len(phases),
                                 **{f"{p}_s": v for p, v in med.items()}, "host_s": sum(med.values())})
    print(f"\nrunning {running:>3} waiting {waiting:>4}: host per step "
          + "  ".join(f"{p} {1e6 * v:7.1f} us" for p, v in med.items()) + f"  (sum {1e6 * sum(med.values()):.1f} us)")
