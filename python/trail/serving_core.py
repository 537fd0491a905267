"""The serving core: the one place a step's plan is applied. It owns the scheduler (trail._C) and
the block ledger (the engine's `KVCache`, or the simulator's `HostBlockLedger`), and nothing else
calls the ledger's allocate / free / swap.

    core = ServingCore(scheduler_config, ledger)
    slots = core.add(ids, arrivals, prompt_lens, max_new, prompt_predictions, true_lengths)
    plan = core.schedule(predictions, generated, now)     # decided AND applied to the ledger
    ... run plan.rows (the forward pass) ...
    core.release(ids, slots)                              # finished or aborted: scheduler + blocks
    core.requeue(ids, slots, generated, now)              # a step's work was lost: back to waiting

`schedule` runs the policy step and applies its preempted rows in order (keep: nothing; swap: one
batched copy to host; recompute: free), then the scheduled rows' swap-ins (one batched copy, the
compute stream waits for it) and allocations, with the plan's BLOCKS column as the one formula of
how many blocks a row's slot maps. With `check_ledger` (or TRAIL_CHECK_LEDGER=1) every scheduled
slot's mapped blocks are compared with BLOCKS after each step.

Rollback: if anything between `schedule` and the end of the plan's execution fails, the KV that
plan was to write may be partly written, and with the overlapped loop the step before it may be
lost too. `requeue` sends the requests back to waiting with no KV (their blocks freed, their
swapped copies dropped) to be prefilled again over prompt + the outputs the caller confirmed: a
recompute, which gives the same tokens as the lost steps would have.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from trail.kv_cache import SwappedKV
from trail.scheduler import PREEMPT, SCHED, SNAP, Mode, Resume, Scheduler, State
from trail.scheduler_types import SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass
class AppliedPlan:
    """One step's plan after the core applied it. rows / preempted: int64 [n, SCHED.NCOLS] /
    [m, PREEMPT.NCOLS] (numpy views of the scheduler's output)."""
    rows: np.ndarray
    preempted: np.ndarray
    stop_reason: int
    swap_out_blocks: int = 0
    swap_in_blocks: int = 0

    def count(self, mode: Mode) -> int:
        return int((self.preempted[:, PREEMPT.MODE] == mode).sum())

    @property
    def num_forced(self) -> int:
        return int(self.preempted[:, PREEMPT.FORCED].sum())


class LedgerMismatch(AssertionError):
    """A slot's mapped blocks differ from its plan row's BLOCKS (a bug in the core or the ledger)."""


class ServingCore:
    def __init__(self, config: SchedulerConfig, ledger, *, compute_stream: Any = None,
                 check_ledger: bool | None = None):
        self.scheduler = Scheduler(config)
        self.ledger = ledger
        self.compute_stream = compute_stream
        self.check_ledger = os.environ.get("TRAIL_CHECK_LEDGER") == "1" if check_ledger is None else check_ledger
        self._swapped: dict[int, SwappedKV] = {}        # slot -> its KV in the host swap space

    @property
    def config(self) -> SchedulerConfig:
        return self.scheduler.config

    def add(self, ids, arrivals, prompt_lens, max_new_tokens, prompt_predictions, true_lengths=None) -> np.ndarray:
        """Queues requests (all or nothing); returns their slots."""
        return self.scheduler.add_many(ids, arrivals, prompt_lens, max_new_tokens, prompt_predictions,
                                       true_lengths).numpy().astype(np.int64)

    def schedule(self, predictions, generated, now: float) -> AppliedPlan:
        """The policy step, applied to the ledger: preemptions, swap-ins, allocations."""
        ledger = self.ledger
        ledger.reclaim()
        out = self.scheduler.step(predictions, generated, ledger.num_free_blocks, ledger.num_free_host_blocks, now)
        plan = AppliedPlan(out.scheduled.numpy(), out.preempted.numpy(), out.stop_reason)
        if len(plan.preempted):
            plan.swap_out_blocks = self._preempt(plan.preempted)
        rows = plan.rows
        if len(rows):
            plan.swap_in_blocks = self._swap_in(rows[rows[:, SCHED.RESUME] == Resume.SWAP_IN, SCHED.SLOT])
            ledger.grow_to(rows[:, SCHED.SLOT], rows[:, SCHED.BLOCKS])
            if self.check_ledger:
                self.check(rows)
        return plan

    def _preempt(self, pre: np.ndarray) -> int:
        """keep: nothing; swap: one batched copy to host (its GPU blocks usable by this step's work
        at once: the compute stream waits for the copy); recompute: free the blocks."""
        modes, slots = pre[:, PREEMPT.MODE], pre[:, PREEMPT.SLOT]
        swap = slots[modes == Mode.SWAP].tolist()
        moved = 0
        if swap:
            for slot, handle in zip(swap, self.ledger.swap_out(swap)):
                self._swapped[slot] = handle
                moved += handle.num_blocks
            self.ledger.reclaim(stream=self.compute_stream)
        for slot in slots[modes == Mode.RECOMPUTE].tolist():
            self.ledger.free(slot)
        return moved

    def _swap_in(self, slots: np.ndarray) -> int:
        if not len(slots):
            return 0
        items = [(slot, self._swapped[slot]) for slot in slots.tolist()]
        event = self.ledger.swap_in(items)
        for slot, _ in items:
            del self._swapped[slot]
        self.ledger.wait(event, self.compute_stream)
        self.ledger.reclaim(stream=self.compute_stream)
        return sum(h.num_blocks for _, h in items)

    def check(self, rows: np.ndarray) -> None:
        """Each scheduled slot maps exactly its row's BLOCKS."""
        mapped = self.ledger.mapped_blocks(rows[:, SCHED.SLOT])
        bad = np.flatnonzero(mapped != rows[:, SCHED.BLOCKS])
        if bad.size:
            raise LedgerMismatch(f"slots {rows[bad, SCHED.SLOT].tolist()} map {mapped[bad].tolist()} blocks, "
                                 f"the plan says {rows[bad, SCHED.BLOCKS].tolist()}")

    def _free_memory(self, slots) -> None:
        """GPU blocks and any swapped copy (robust to a plan applied part way: a swap that never
        ran leaves the blocks mapped, one that ran leaves a handle)."""
        for slot in np.asarray(slots).tolist():
            handle = self._swapped.pop(slot, None)
            if handle is not None and not handle.released:
                self.ledger.discard(handle)
            self.ledger.free(slot)

    def release(self, ids, slots) -> np.ndarray:
        """Finished or aborted requests, in any state: out of the scheduler, their GPU blocks or
        swapped copies released. Returns the `State` each was in."""
        states = self.scheduler.cancel_many(ids).numpy()
        self._free_memory(slots)
        return states

    def requeue(self, ids, slots, generated, now: float) -> np.ndarray:
        """Back to waiting with no KV, to be prefilled again over prompt + `generated` outputs
        (see the module docstring). Returns the `State` each was in."""
        states = self.scheduler.requeue_many(ids, generated, now).numpy()
        self._free_memory(slots)
        return states

    def knows(self, request_id: int) -> bool:
        """Whether the scheduler holds `request_id` (added and not yet released)."""
        try:
            self.scheduler.state_of(request_id)
        except KeyError:
            return False
        return True

    def holders(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of the requests that hold KV or are running (what a lost step can touch)."""
        snap = self.scheduler.snapshot().numpy()
        hold = (snap[:, SNAP.STATE] != State.WAITING) | (snap[:, SNAP.CTX] > 0)
        return snap[hold, SNAP.ID].astype(np.int64), snap[hold, SNAP.SLOT].astype(np.int64)


@contextmanager
def borrowed_blocks(ledger, slot: int, num_tokens: int):
    """Blocks for a measurement outside any plan (the engine's start-up prefill timing), released
    on exit; only while the slot holds no request."""
    ledger.allocate_many(np.array([slot]), np.array([num_tokens]))
    try:
        yield
    finally:
        ledger.free(slot)
