"""The scheduler the engine calls once per step: policies `fcfs`, `sjf_prompt`, `trail`, `oracle`
over the C++ core `torch.classes.trail.Scheduler` (csrc/scheduler/), one code path with parameters.

Data flow: the engine `add`s a request (gets its slot), then every step passes the per-slot
predicted remaining lengths (float32 [max_slots]) and generated counts (int32 [max_slots]) as CPU
tensors (the pinned buffers the GPU copied into), and the free GPU / host KV blocks. `step` returns
the batch as two int64 tensors, read by column (`SCHED` / `PREEMPT` below), with no per-request
Python work. `trail.serving_core.ServingCore` applies the preempted rows first (in order: keep /
swap out / free), then the scheduled rows (swap in where `resume == SWAP_IN`, grow the slot to
`blocks`), the runner runs `tokens` tokens from position `ctx_start`, and finished or aborted
requests leave through `cancel_many`; `requeue_many` sends the requests of a lost step back.

Slots are assigned by the scheduler at `add` (a LIFO free list: 0, 1, 2, ... at first, the most
recently freed slot next) and freed by `finish` / `cancel`.
Rules (DESIGN.md "Policy"): order by key (fcfs: arrival; sjf_prompt: prompt prediction; trail: the
newest predicted remaining length; oracle: true remaining length), ties by arrival then id. Running
requests are preemptible by the policy iff c > 0 and generated < c * initial_prediction and
preemptions < max_preemptions. Memory always wins: forced evictions ignore c.
Memory-aware options (SchedulerConfig; on by default for trail / oracle, off for fcfs /
sjf_prompt, TRAIL's published rules in `scheduler_types.TRAIL_PAPER`): admission reserve for the
predicted growth of the running set (admit_reserve), forced victims by predicted remaining - KV
held with a per-request bound (evict_kv_weight, max_forced_evictions), forced-evicted requests
resumed first (resume_forced_first) and so are policy victims (resume_preempted_first), no policy
swap / recompute under memory pressure
(memory_preemption), a preemption margin in tokens (on raw keys: ties within it never preempt) and
aging of the waiting order per step waited (aging_per_step) or per second (aging_rate); aging orders
the queue and never makes a preemption. The reserve applies only under memory pressure
(reserve_free_frac).

`ReferenceScheduler` (tests/scheduler_reference.py) is a pure-Python implementation of the same
step with the same API, the tests' oracle.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

import trail._native  # noqa: F401  (loads trail._C, which registers torch.classes.trail.*)
from trail.scheduler_types import (PREEMPT, POLICIES, SCHED, SNAP, Kind, Mode, Resume,  # noqa: F401
                                   SchedulerConfig, State, StepOutput, Stop, add_many_args)

logger = logging.getLogger(__name__)


@contextmanager
def _core_errors(kind: type[Exception]):
    """The native core's RuntimeError as `kind` (ValueError for bad input, KeyError for an
    unknown id), with the core's message."""
    try:
        yield
    except RuntimeError as exc:
        raise kind(str(exc)) from None


class Scheduler:
    """The native scheduler (C++ core). Same API as `ReferenceScheduler`."""

    def __init__(self, config: SchedulerConfig):
        self.config = config.resolved()
        self._core = torch.classes.trail.Scheduler(self.config.native_config())
        logger.debug("scheduler: %s", self.config)

    def add(self, request_id: int, arrival: float, prompt_len: int, max_new_tokens: int,
            prompt_prediction: float, true_length: int | None = None) -> int:
        """Queues a request; returns the slot it holds until finish / cancel."""
        with _core_errors(ValueError):
            return self._core.add(int(request_id), float(arrival), int(prompt_len), int(max_new_tokens),
                                  float(prompt_prediction), -1 if true_length is None else int(true_length))

    def add_many(self, ids, arrivals, prompt_lens, max_new_tokens, prompt_predictions,
                 true_lengths=None) -> torch.Tensor:
        """Batched `add` (one native call; all or nothing). Returns the int32 slots."""
        args = add_many_args(ids, arrivals, prompt_lens, max_new_tokens, prompt_predictions, true_lengths)
        with _core_errors(ValueError):
            return self._core.add_many(*args)

    def finish_many(self, ids) -> torch.Tensor:
        """Batched `finish` (all or nothing). Returns the int32 slots freed."""
        with _core_errors(ValueError):
            return self._core.finish_many(torch.as_tensor(ids, dtype=torch.int64).reshape(-1).contiguous())

    def cancel_many(self, ids) -> torch.Tensor:
        """Batched `cancel` (all or nothing). Returns the int32 `State` each was in."""
        with _core_errors(ValueError):
            return self._core.cancel_many(torch.as_tensor(ids, dtype=torch.int64).reshape(-1).contiguous())

    def finish(self, request_id: int) -> int:
        """A running request ended; returns its (now free) slot."""
        with _core_errors(ValueError):
            return self._core.finish(int(request_id))

    def cancel(self, request_id: int) -> State:
        """Removes a request in any state; returns the state it was in (what to free)."""
        with _core_errors(ValueError):
            return State(self._core.cancel(int(request_id)))

    def requeue_many(self, ids, generated, now: float) -> torch.Tensor:
        """A step's work was lost: each request goes back to waiting with no KV, to be prefilled
        again over its prompt and its first `generated` output tokens (a recompute when > 0).
        All or nothing. Returns the int32 `State` each was in (what to free)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).contiguous()
        gen = torch.as_tensor(generated, dtype=torch.int32).reshape(-1).contiguous()
        with _core_errors(ValueError):
            return self._core.requeue_many(ids, gen, float(now))

    def set_predictions(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """New predicted remaining lengths (int32 slots, float32 values) for requests in any state."""
        with _core_errors(ValueError):
            self._core.set_predictions(slots, values)

    def step(self, predictions: torch.Tensor, generated: torch.Tensor, free_gpu_blocks: int,
             free_host_blocks: int, now: float) -> StepOutput:
        try:  # inline, not _core_errors: this runs every engine step
            scheduled, preempted, stop = self._core.step(predictions, generated, int(free_gpu_blocks),
                                                         int(free_host_blocks), float(now))
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
        return StepOutput(scheduled, preempted, stop)

    def snapshot(self) -> torch.Tensor:
        return self._core.snapshot()

    def slot_of(self, request_id: int) -> int:
        with _core_errors(KeyError):
            return self._core.slot_of(int(request_id))

    def state_of(self, request_id: int) -> State:
        with _core_errors(KeyError):
            return State(self._core.state_of(int(request_id)))

    @property
    def num_waiting(self) -> int:
        return self._core.num_waiting()

    @property
    def num_running(self) -> int:
        return self._core.num_running()

    @property
    def num_active(self) -> int:
        return self._core.num_active()


def make_scheduler(config: SchedulerConfig, impl: str = "native"):
    """`native` (the C++ core), the one implementation here; the pure-Python reference of the same
    step is a test oracle (tests/scheduler_reference.py)."""
    if impl == "native":
        return Scheduler(config)
    raise ValueError(f"scheduler impl must be 'native', got {impl!r}")
