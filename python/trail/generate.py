"""Generation with live length predictions: the model runner, the paged KV cache and the fused
probe kernel in one plain loop, every request in the batch from start to finish (no scheduler, no
preemption). The engine replaces this loop; the demo and quick experiments use it.

Per step: runner forward (layer-L tap) -> `trail_kernels.probe.probe_step` (pool / MLP / Bayes
update by slot, in place) -> the predictions are copied to the host before the sampled tokens, so
the one sync of the step (reading the tokens) brings them along.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from trail.kv_cache import KVCache, KVCacheSpec
from trail.model_runner import DECODE, PREFILL, ModelRunner, Segment
from trail_kernels.probe import FIRST_CHUNK, LAST_CHUNK
from trail_kernels.probe import PREFILL as PREFILL_FLAG
from trail_kernels.probe import ProbeParams, ProbeState, probe_step

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
    token or `max_new_tokens`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_with_predictions needs at least one non-empty prompt")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = len(prompts)
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    blocks_per_request = -(-(max(len(p) for p in prompts) + max_new_tokens) // spec.block_size)
    kv = KVCache(spec, num_blocks=n * blocks_per_request, max_slots=n,
                 max_blocks_per_request=blocks_per_request, device=device)
    runner = ModelRunner(model, kv, tap_layer=probe_layer)
    probe = probe.to(device, dtype if device.type == "cuda" else None)
    state = ProbeState.for_params(probe, max_slots=n, max_rows=n, device=device)
    stops = set(int(t) for t in stop_ids)

    i32 = dict(dtype=torch.int32, device=device)
    max_new = torch.full((n,), max_new_tokens, **i32)
    predictions = torch.empty(n, dtype=torch.float32, pin_memory=device.type == "cuda")
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * n

    kv.allocate({i: len(p) for i, p in enumerate(prompts)})
    kv.commit_block_tables()
    segments = [Segment(i, list(p), 0, PREFILL, True, sample_params) for i, p in enumerate(prompts)]
    flags = torch.full((n,), PREFILL_FLAG | FIRST_CHUNK | LAST_CHUNK, **i32)
    num_generated = torch.zeros(n, **i32)
    step = 0
    while True:
        out = runner.step(segments)
        tap = out.tap
        rows = len(segments)
        expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, flags[:rows], num_generated[:rows],
                              max_new[:rows], probe, state, has_prefill=step == 0)
        predictions.copy_(expected[:n], non_blocking=True)
        tokens = out.next_tokens.cpu()          # the step's one sync; predictions ride along
        new: list[int | None] = [None] * n
        for seg, tok in zip(segments, tokens.tolist()):
            i = seg.slot
            outputs[i].append(tok)
            new[i] = tok
            if tok in stops or len(outputs[i]) >= max_new_tokens:
                done[i] = True
                kv.free(i)
        yield StepRecord(step, new, [len(o) for o in outputs], predictions.tolist(), list(done))
        active = [i for i in range(n) if not done[i]]
        if not active:
            return
        step += 1
        kv.allocate({i: len(prompts[i]) + len(outputs[i]) for i in active})
        kv.commit_block_tables()
        segments = [Segment(i, [outputs[i][-1]], len(prompts[i]) + len(outputs[i]) - 1, DECODE, True,
                            sample_params) for i in active]
        flags[:len(active)] = 0
        # every active request has generated exactly `step` tokens (one per step since the
        # prefill): a scalar fill, not a host tensor copied in (a blocking copy = a sync on CUDA)
        num_generated[:len(active)].fill_(step)
