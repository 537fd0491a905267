"""Types shared by the native scheduler (scheduler.py) and its pure-Python reference
(tests/scheduler_reference.py): request states, plan columns, the config and the step output. Both
import this module; neither imports the other at module level."""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, replace
from enum import IntEnum

import numpy as np
import torch

logger = logging.getLogger(__name__)

from trail.policies import POLICIES  # noqa: E402  (the one table)
# Per-policy defaults of the fields left None. fcfs / sjf_prompt run to completion unless memory
# forces an eviction (like vLLM and S3/SSJF) and use none of the options; trail and oracle share
# theirs (the oracle is trail with true lengths), chosen by the simulator sweeps (bench/sim_sweeps.py;
# the rules of 2026-12-07: DESIGN.md "Policy"). trail (TRAIL's rule, c = 0.8, plus): margin 32 tokens on
# raw keys, aging 0.15 tokens of key per step waited (in steps, so it means the same at any step
# time; aging_rate, per second, is 0: 10 tokens/s was tuned at 7-22 ms steps and is inert at ~1 ms),
# admission reserve 0.3 x predicted remaining applied only while under a tenth of the GPU blocks
# would stay free, forced victims by predicted remaining - KV held with at most 1 forced eviction
# each before others are chosen, forced-evicted and policy-preempted requests resumed first (a
# victim's wait ends at the next free slot; the simulator sweep of 2026-12-08, DESIGN.md "Policy"),
# and no policy swaps / recomputes under memory pressure. TRAIL as published: margin 0, no aging, admit_reserve 0,
# max_forced_evictions 0, evict_kv_weight 0, resume_forced_first False, memory_preemption True.
_TRAIL_DEFAULTS = {"c": 0.8, "margin": 32.0, "aging_rate": 0.0, "aging_per_step": 0.15, "admit_reserve": 0.3,
                   "reserve_free_frac": 0.1,
                   "max_forced_evictions": 1, "evict_kv_weight": 1.0, "resume_forced_first": True,
                   "resume_preempted_first": True, "memory_preemption": False}
TRAIL_PAPER = {"c": 0.8, "margin": 0.0, "aging_rate": 0.0, "aging_per_step": 0.0, "admit_reserve": 0.0,
               "reserve_free_frac": 1.0, "max_forced_evictions": 0,
               "evict_kv_weight": 0.0, "resume_forced_first": False, "resume_preempted_first": False,
               "memory_preemption": True}
_BASE_DEFAULTS = {"c": 0.0, "margin": 0.0, "aging_rate": 0.0, "aging_per_step": 0.0, "admit_reserve": 0.0,
                  "reserve_free_frac": 1.0,
                  "max_forced_evictions": 0, "evict_kv_weight": 0.0, "resume_forced_first": False,
                  "resume_preempted_first": False, "memory_preemption": True}
POLICY_DEFAULTS = {"fcfs": _BASE_DEFAULTS, "sjf_prompt": _BASE_DEFAULTS, "trail": _TRAIL_DEFAULTS,
                   "oracle": _TRAIL_DEFAULTS}
_DEFAULT_C = {k: v["c"] for k, v in POLICY_DEFAULTS.items()}


# The type and range of every SchedulerConfig field but the policy: what the native core accepts
# (csrc/bindings/scheduler_bindings.cpp: int32 counts, int64 block and token counts below 2**53,
# finite doubles, booleans as 0 / 1). ("int", lo, hi): an int (numpy integers too), never a bool
# or a float; ("float", lo, strict): an int or float, never a bool or str, finite, >= lo (> lo if
# strict; lo None: any finite number); ("bool",): True or False, never 0 / 1 or a string.
_I31, _I53 = 2**31 - 1, 2**53
FIELD_RULES = {
    "max_slots": ("int", 1, _I31), "max_batch": ("int", 1, _I31), "max_tokens_per_step": ("int", 1, _I53),
    "max_prefill_chunk": ("int", 1, _I53), "block_size": ("int", 1, _I31), "num_gpu_blocks": ("int", 1, _I53),
    "num_host_blocks": ("int", 0, _I53), "watermark_blocks": ("int", 0, _I53),
    "c": ("float", 0.0, False), "margin": ("float", None, False), "max_preemptions": ("int", 0, _I31),
    "aging_rate": ("float", 0.0, False), "aging_per_step": ("float", 0.0, False), "allow_keep": ("bool",), "allow_swap": ("bool",),
    "bytes_per_token": ("float", 0.0, False), "pcie_gbps": ("float", 0.0, True),
    "recompute_s_per_token": ("float", 0.0, False), "admit_reserve": ("float", 0.0, False),
    "reserve_free_frac": ("float", 0.0, False), "max_forced_evictions": ("int", 0, _I31), "evict_kv_weight": ("float", 0.0, False),
    "resume_forced_first": ("bool",), "resume_preempted_first": ("bool",), "memory_preemption": ("bool",),
}


def check_field(name: str, value, where: str = "") -> None:
    """Checks `value` against FIELD_RULES[name] (types strict, nothing coerced); ValueError
    "<where><name> must be <type and range>, got <value> (<type>)" otherwise."""
    rule = FIELD_RULES[name]
    is_bool = isinstance(value, (bool, np.bool_))
    if rule[0] == "bool":
        ok, want = isinstance(value, bool), "a bool (True or False)"
    elif rule[0] == "int":
        lo, hi = rule[1], rule[2]
        ok = isinstance(value, numbers.Integral) and not is_bool and lo <= value <= hi
        want = f"an integer (not bool or float) in [{lo}, {'2**53' if hi == _I53 else hi}]"
    else:
        lo, strict = rule[1], rule[2]
        ok = isinstance(value, numbers.Real) and not is_bool and math.isfinite(value) and (
            lo is None or (value > lo if strict else value >= lo))
        want = "a finite number" + ("" if lo is None else f" {'>' if strict else '>='} {lo:g}") + " (int or float)"
    if not ok:
        raise ValueError(f"{where}{name} must be {want}, got {value!r} ({type(value).__name__})")


class State(IntEnum):
    FREE = 0
    WAITING = 1   # never started, or dropped for recompute (holds no KV)
    RUNNING = 2
    KEPT = 3      # preempted, KV kept on the GPU
    SWAPPED = 4   # preempted, KV on host


class Kind(IntEnum):
    DECODE = 0
    PREFILL = 1


class Resume(IntEnum):
    NONE = 0
    KEEP = 1       # its blocks are still on the GPU
    SWAP_IN = 2    # copy its blocks back from host before the forward pass
    RECOMPUTE = 3  # first chunk of a re-prefill of prompt + generated tokens


class Mode(IntEnum):
    KEEP = 1
    SWAP = 2
    RECOMPUTE = 3


class Stop(IntEnum):
    EMPTY = 0
    BATCH = 1
    TOKENS = 2
    MEMORY = 3


class SCHED:
    """Columns of `StepOutput.scheduled` (int64 rows); FLAGS holds trail_kernels.row_flags bits."""
    ID, SLOT, KIND, TOKENS, CTX_START, BLOCKS, RESUME, LAST_CHUNK, FLAGS = range(9)
    NCOLS = 9


class PREEMPT:
    """Columns of `StepOutput.preempted` (int64 rows, in decision order)."""
    ID, SLOT, MODE, FORCED, FROM_KEPT, BLOCKS = range(6)
    NCOLS = 6


class SNAP:
    """Columns of `snapshot()` (float64 rows, one per active request, in slot order)."""
    ID, SLOT, STATE, CTX, TARGET, GENERATED, PREEMPTIONS, KEY, INIT, RESUME = range(10)
    NCOLS = 10


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits, policy parameters and the swap / recompute cost model (constants measured per
    model: KV bytes per token, pinned PCIe GB/s, recompute seconds per token)."""
    policy: str = "trail"
    max_slots: int = 1024
    max_batch: int = 256
    max_tokens_per_step: int = 8192
    max_prefill_chunk: int | None = None   # None: max_tokens_per_step
    block_size: int = 16
    num_gpu_blocks: int = 1 << 20
    num_host_blocks: int = 0
    watermark_blocks: int = 0
    # None below: the policy's default (POLICY_DEFAULTS).
    c: float | None = None                 # preemptible iff generated < c * initial prediction
    margin: float | None = None            # tokens a victim's remaining must exceed the newcomer's by
    max_preemptions: int = 4
    aging_rate: float | None = None        # tokens of key per second waited (scales with the step time)
    aging_per_step: float | None = None    # tokens of key per step waited (the same at any step time)
    allow_keep: bool = True
    allow_swap: bool = True
    bytes_per_token: float = 0.0
    pcie_gbps: float = 25.0
    recompute_s_per_token: float = 0.0
    # Memory-aware admission: admit only if the predicted peak KV of the running set + the newcomer
    # fits, each request assumed to need admit_reserve x its predicted remaining tokens (0: off).
    admit_reserve: float | None = None
    # ... only under memory pressure: while the GPU blocks free after an admission would be below
    # reserve_free_frac x num_gpu_blocks (1: always, 0: never).
    reserve_free_frac: float | None = None
    # Forced evictions: victims with fewer forced evictions than this first (0: no bound).
    max_forced_evictions: int | None = None
    # Forced victim = largest (predicted remaining - evict_kv_weight * KV tokens held).
    evict_kv_weight: float | None = None
    # Forced-evicted requests wait at the queue's front and never preempt by policy.
    resume_forced_first: bool | None = None
    # Policy-preempted requests wait at the queue's front too (bounds a victim's wait to the next
    # free slot) and never preempt by policy while there.
    resume_preempted_first: bool | None = None
    # May the policy swap / recompute a running request to admit a shorter one when KV is short?
    # (False: policy preemptions only when the batch cap or token budget binds, victims kept.)
    memory_preemption: bool | None = None

    def resolved(self) -> "SchedulerConfig":
        """The same config with policy defaults filled in, validated."""
        if not (isinstance(self.policy, str) and self.policy in POLICIES):
            raise ValueError(f"SchedulerConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        dflt = POLICY_DEFAULTS[self.policy]
        filled = {k: dflt[k] if getattr(self, k) is None else getattr(self, k) for k in dflt}
        cfg = replace(
            self, **filled,
            max_prefill_chunk=self.max_tokens_per_step if self.max_prefill_chunk is None else self.max_prefill_chunk,
        )
        cfg._validate()
        return replace(cfg, c=float(cfg.c))

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"scheduler config: {msg}")

        for name in FIELD_RULES:               # types and ranges, one field at a time
            check_field(name, getattr(self, name), "scheduler config: ")
        need(self.max_tokens_per_step >= self.max_batch,
             f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_batch ({self.max_batch})")
        need(self.reserve_free_frac <= 1, f"reserve_free_frac must be in [0, 1], got {self.reserve_free_frac!r}")
        need(self.num_gpu_blocks > self.watermark_blocks,
             f"num_gpu_blocks ({self.num_gpu_blocks}) must exceed watermark_blocks ({self.watermark_blocks})")

    def native_config(self) -> dict[str, float]:
        """The resolved config by name, as the native core takes it (numbers as float, booleans
        0 / 1, the policy as its index in POLICIES)."""
        c = asdict(self.resolved())
        c["policy"] = POLICIES.index(c["policy"])
        return {k: float(v) for k, v in c.items()}

    def as_dict(self) -> dict:
        return asdict(self.resolved())


@dataclass
class StepOutput:
    """One step's decisions. `scheduled`: int64 [n, SCHED.NCOLS]; `preempted`: int64
    [m, PREEMPT.NCOLS], to be applied before the scheduled rows, in order."""
    scheduled: torch.Tensor
    preempted: torch.Tensor
    stop_reason: int

    @property
    def num_tokens(self) -> int:
        return int(self.scheduled[:, SCHED.TOKENS].sum())



def add_many_args(ids, arrivals, prompt_lens, max_new_tokens, prompt_predictions, true_lengths) -> tuple:
    vec = lambda x, dt: torch.as_tensor(x, dtype=dt).reshape(-1).contiguous()  # noqa: E731
    ids = vec(ids, torch.int64)
    if true_lengths is None:
        true_lengths = torch.full((ids.numel(),), -1, dtype=torch.int64)
    return (ids, vec(arrivals, torch.float64), vec(prompt_lens, torch.int64), vec(max_new_tokens, torch.int64),
            vec(prompt_predictions, torch.float64), vec(true_lengths, torch.int64))


