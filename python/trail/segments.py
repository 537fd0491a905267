"""Steps as `Segment`s — one per request: a slot, its next tokens and where they start — for
callers that think per request (tests, teacher forcing, the predictor's runner backend), and
their checked conversion to the `BatchPlan` the runner executes (`ModelRunner.step`).
`validate_plan` is the host-side check of a plan's shapes and ranges.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trail.batch import BatchPlan
from trail.sampling import validate_params
from trail_kernels import row_flags

PREFILL, DECODE = "prefill", "decode"


@dataclass
class Segment:
    slot: int
    token_ids: Sequence[int]
    start: int
    kind: str = PREFILL
    sample: bool = True          # draw a next token after this segment (False: a non-final chunk)
    params: object | None = None  # temperature, top_p, top_k, repetition_penalty, seed (None: greedy)


def segments_to_plan(segments: Sequence[Segment]) -> BatchPlan:
    """Checks `segments` (kinds, token counts, distinct slots, sampling parameters) and turns
    them into a BatchPlan (rows in segment order)."""
    if not segments:
        raise ValueError("a step needs at least one segment")
    slots = set()
    for i, s in enumerate(segments):
        n = len(s.token_ids)
        if s.slot in slots:
            raise ValueError(f"segment {i}: slot {s.slot} appears twice in one step")
        slots.add(s.slot)
        if s.kind not in (PREFILL, DECODE):
            raise ValueError(f"segment {i}: kind {s.kind!r} is not 'prefill' or 'decode'")
        if n == 0 or (s.kind == DECODE and n != 1):
            raise ValueError(f"segment {i}: {n} tokens (a decode has 1, a prefill at least 1)")
        if s.sample and s.params is not None:
            validate_params(s.params)
    flags = []
    for s in segments:
        if s.kind == DECODE:
            flags.append(row_flags.SAMPLE)
        else:
            flags.append(row_flags.PREFILL | (row_flags.FIRST_CHUNK if s.start == 0 else 0)
                         | ((row_flags.LAST_CHUNK | row_flags.SAMPLE) if s.sample else 0))
    return BatchPlan(np.array([s.slot for s in segments], np.int64), np.array(flags, np.int64),
                     np.array([s.start for s in segments], np.int64),
                     np.array([len(s.token_ids) for s in segments], np.int64),
                     np.concatenate([np.asarray(s.token_ids, dtype=np.int64) for s in segments]))


def validate_plan(plan: BatchPlan, max_slots: int, max_context: int, vocab_size: int,
               sliding_window: int | None = None) -> None:
    """Shapes and ranges of `plan` against slots [0, max_slots), `max_context` positions a slot
    and the vocabulary (host state only: no device reads)."""
    S = plan.num_rows
    if S == 0:
        raise ValueError("a step needs at least one row")
    for name in ("flags", "starts", "num_tokens"):
        if len(getattr(plan, name)) != S:
            raise ValueError(f"BatchPlan.{name} has {len(getattr(plan, name))} rows, slots {S}")
    if plan.slots.min() < 0 or plan.slots.max() >= max_slots:
        raise ValueError(f"slots must lie in [0, {max_slots}), got {plan.slots.tolist()}")
    if len(np.unique(plan.slots)) != S:
        raise ValueError(f"a slot appears twice in one step: {plan.slots.tolist()}")
    if plan.num_tokens.min() < 1 or plan.starts.min() < 0:
        raise ValueError("every row needs >= 1 token and a start >= 0")
    if int(plan.num_tokens.sum()) != len(plan.token_ids):
        raise ValueError(f"{len(plan.token_ids)} token ids for rows of {int(plan.num_tokens.sum())} tokens")
    ends = plan.starts + plan.num_tokens
    if ends.max() > max_context:
        raise ValueError(f"positions up to {int(ends.max())} exceed a slot's capacity {max_context}")
    if sliding_window is not None and ends.max() > sliding_window:
        raise NotImplementedError(f"context {int(ends.max())} exceeds the sliding window {sliding_window}, "
                                  "which is not implemented")
    ids = plan.token_ids
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
