"""What an engine step hands back: per-request metrics from the applied plan (preemptions, swapped
blocks, recomputed tokens), the step's text (one batched incremental decode; stop strings; a
request whose decoding fails ends with FinishReason.ERROR), the `RequestOutput`s, and the step's
row in the telemetry. Called by `trail.engine.LLMEngine` only."""
from __future__ import annotations

import logging
import math

import numpy as np

from trail.detokenize import push_many
from trail.request import FinishReason, Request, RequestOutput, TokenPrefix
from trail.scheduler import PREEMPT, SCHED, Mode
from trail_kernels import row_flags

logger = logging.getLogger(__name__)
_MODE_NAME = {Mode.KEEP: "keep", Mode.SWAP: "swap", Mode.RECOMPUTE: "recompute"}


def account_plan(plan, slot_requests: list, now: float) -> None:
    """Per-request metrics of the applied plan: preemptions, swapped blocks, recomputed
    tokens, first scheduling."""
    req = slot_requests
    cols = [PREEMPT.SLOT, PREEMPT.MODE, PREEMPT.FORCED, PREEMPT.BLOCKS]
    for slot, mode, forced, blocks in plan.preempted[:, cols].tolist():
        m = req[slot].metrics
        m.preemptions[_MODE_NAME[Mode(mode)]] += 1
        m.forced_preemptions += forced
        if mode == Mode.SWAP:
            m.swapped_out_blocks += blocks
    rows = plan.rows
    marked = rows[((rows[:, SCHED.FLAGS] & row_flags.RECOMPUTE) != 0) | (rows[:, SCHED.CTX_START] == 0)]
    for slot, n, flags in marked[:, [SCHED.SLOT, SCHED.TOKENS, SCHED.FLAGS]].tolist():
        m = req[slot].metrics
        if flags & row_flags.RECOMPUTE:
            m.recomputed_tokens += n
        elif m.first_scheduled is None:
            m.first_scheduled = now


def record_step(telemetry, step, bytes_per_block: int, profile: bool) -> tuple | None:
    """The step's row in `telemetry` (and its phase times when profiling); returns the pending
    device-time events (start, end, row index) or None."""
    clock, rows, plan = step.clock, step.rows, step.plan
    recompute = (rows[:, SCHED.FLAGS] & row_flags.RECOMPUTE) != 0
    prefill = rows[:, SCHED.KIND] == 1
    telemetry.add_step(
        step.index, step.now, len(rows), int(rows[:, SCHED.TOKENS].sum()), int(rows[prefill, SCHED.TOKENS].sum()),
        int((~prefill).sum()), *_memory_moves(plan, bytes_per_block),
        int(rows[recompute, SCHED.TOKENS].sum()), clock.total() - clock.get("sync"), clock.get("sync"), math.nan)
    if profile:
        telemetry.phases.append(clock.report(len(rows), int(rows[:, SCHED.TOKENS].sum())))
    return None if step.t_dev is None else (step.t_dev, step.end, len(telemetry.steps) - 1)


def record_plan_without_rows(telemetry, index: int, now: float, plan, bytes_per_block: int) -> None:
    """A plan that runs nothing but still moved memory (preemptions, swaps) gets its row too
    (tagged with the index of the next step that runs), so telemetry's totals count every move."""
    if len(plan.preempted) or plan.swap_out_blocks or plan.swap_in_blocks:
        telemetry.add_step(index, now, 0, 0, 0, 0, *_memory_moves(plan, bytes_per_block), 0, 0.0, 0.0, math.nan)


def _memory_moves(plan, bpb: int) -> tuple:
    """keep, swap, recompute, forced preemptions and swap-out / swap-in bytes of a plan."""
    return (plan.count(Mode.KEEP), plan.count(Mode.SWAP), plan.count(Mode.RECOMPUTE), plan.num_forced,
            plan.swap_out_blocks * bpb, plan.swap_in_blocks * bpb)


def stream_text(reqs: list[Request], tokens: np.ndarray, reasons: list) -> None:
    """The step's text, decoded incrementally per request: a stop string ends its request; a
    request that ends otherwise flushes its held-back tail. A request whose decoding fails ends
    with ERROR (its text so far is kept); the others are untouched."""
    idx = [i for i, r in enumerate(reqs) if r.stream is not None]
    if not idx:
        return
    for i in idx:                # one stream at a time, so a failure stays with its request
        req = reqs[i]
        try:
            delta, stopped = push_many([req.stream], [[int(tokens[i])]])[0]
            if stopped and reasons[i] is None:
                reasons[i] = FinishReason.STOP
            if reasons[i] is not None and not stopped:
                delta += req.stream.finish()
        except Exception as exc:
            req.error = f"text decoding failed: {type(exc).__name__}: {exc}"
            logger.warning("request %d ends with an error: %s", req.id, req.error)
            reasons[i] = FinishReason.ERROR
            continue
        req.text += delta


def request_output(req: Request) -> RequestOutput:
    """What the user gets now: the tokens and text since the last output, and everything so far."""
    new_ids = req.output_ids[req.sent_tokens:]
    delta = req.text[req.sent_chars:]
    req.sent_tokens, req.sent_chars = len(req.output_ids), len(req.text)
    ids = list(req.output_ids) if req.finished else TokenPrefix(req.output_ids, len(req.output_ids))
    return RequestOutput(req.id, new_ids, delta, ids, req.text, req.finished,
                         req.finish_reason, req.metrics, req.prompt_ids, req.error)
