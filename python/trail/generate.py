"""Generation with live length predictions, as a use of the engine: every request from start to
finish under fcfs with room for all of them (no queueing, no preemption), reporting per step each
request's new token and the filter's predicted remaining length. The demo's "watch the
prediction sharpen" view and quick experiments use it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.request import SamplingParams
from trail_kernels.probe_params import ProbeParams

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one step produced, per request (index = position in the prompt list)."""
    step: int
    new_tokens: list[int | None]          # None for a request that had already finished
    generated: list[int]                   # output tokens so far
    # the filter's expected number of output tokens after those fed to the model so far: it
    # counts the token sampled this step (the model has not read it yet), capped at max_new - fed;
    # a request that finished in an earlier step keeps its last value
    predicted_remaining: list[float]
    finished: list[bool] = field(default_factory=list)


def generate_with_predictions(model, prompts: Sequence[Sequence[int]], probe: ProbeParams,
                              probe_layer: int, max_new_tokens: int, stop_ids: Sequence[int] = (),
                              sample_params=None) -> Iterator[StepRecord]:
    """Yields one StepRecord per step (step 0 = the prefill) until every request stopped (a stop
    token or `max_new_tokens`). `sample_params`: any object with SamplingParams' sampling fields
    (temperature, top_p, top_k, repetition_penalty, seed), None for greedy."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_with_predictions needs at least one non-empty prompt")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    n = len(prompts)
    longest = max(len(p) for p in prompts) + max_new_tokens
    block = 16
    config = EngineConfig(policy="fcfs", max_batch=n, max_slots=n, max_tokens_per_step=max(n, sum(map(len, prompts))),
                          max_model_len=longest, block_size=block, num_gpu_blocks=n * -(-longest // block),
                          num_host_blocks=0, prefill_tokens_per_s=1.0, overlap=False)   # one record per step
    engine = LLMEngine(model, None, config, probe=probe, probe_layer=probe_layer, eos_token_ids=stop_ids)
    sp = sample_params
    params = SamplingParams(max_new_tokens=max_new_tokens, **({} if sp is None else dict(
        temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, repetition_penalty=sp.repetition_penalty,
        seed=sp.seed)))
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=i)
    generated, predicted, done = [0] * n, [0.0] * n, [False] * n
    step = 0
    while engine.has_unfinished():
        new: list[int | None] = [None] * n
        for out in engine.step():
            i = out.request_id
            new[i] = out.token_ids[-1]
            generated[i] = len(out.token_ids)
            if out.metrics.predictions:
                predicted[i] = out.metrics.predictions[-1][1]
            done[i] = out.finished
        yield StepRecord(step, new, list(generated), list(predicted), list(done))
        step += 1
