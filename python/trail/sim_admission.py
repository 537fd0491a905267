"""Admission by the prefill probe, in the simulator (issue 26 item 1): a hook for `trail.sim.simulate`
(`admission=`) that moves a waiting request's key from the prompt predictor's total
(`SimTrace.prompt_pred`) to the prefill probe's first prediction (`SimTrace.pred` at g = 0) and
charges the forward work that takes. Modes:

- `free`: the probe's value is the key from `add` on, at no cost (the earlier ablation's upper
  bound: the same as a trace whose prompt_pred is the probe's first value).
- `probe` ("probe-prefill then rank"): after each step's plan, requests still waiting that were
  never scheduled and never probed run the prompt through layers 0..L in that step
  (`probe_frac` = L / num_layers of a full prefill per token; no KV kept, so their real prefill
  later pays in full); from the next step on they are ranked by the probe's value. The probe's
  token-equivalents (probe_frac x prompt tokens) fill what the step's token budget (`budget`,
  default the engine's max_tokens_per_step) leaves after the plan's own prefill tokens, oldest
  arrival first; the rest wait for a later step, ranked by prompt_pred meanwhile. A probe in a
  decode-only step makes it a mixed step (the step model's mixed_* terms) unless `piggyback`, which
  probes only in steps that already have a prefill row.
- `kv` ("full prefill, KV kept"): the same, but a full prefill (probe_frac is 1) whose KV is kept in
  free GPU blocks while the request waits; its first admission then skips its prefill (those rows
  cost as decode rows; the scheduler's plan still counts their tokens against its budget, a
  conservative simplification). The kept KV is an evictable cache (`CachingLedger`): the scheduler
  sees its blocks as free, and when a plan needs them the waiting request with the largest key
  loses its KV (it keeps its probe key and pays its prefill again at admission). A request is
  prefilled only into blocks free after the plan; if none are, it stays ranked by prompt_pred
  and is retried at the next step. The first token is counted at admission (the prefill's logits
  could give it earlier: not credited).

Only the trail and sjf_prompt policies take new keys (`Scheduler.set_predictions`, which on a
request that never ran also resets its initial prediction, as an `add` with that value would).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from trail.block_ledger import HostBlockLedger
from trail.scheduler import SCHED
from trail_kernels import row_flags

MODES = ("free", "probe", "kv")


class CachingLedger(HostBlockLedger):
    """A host block ledger that also holds the KV of waiting requests as an evictable cache:
    counted free for the scheduler, evicted (largest key first) when a plan's allocation needs the
    blocks, kept (a hit) when the plan admits the request that holds it."""

    def __init__(self, num_gpu_blocks: int, num_host_blocks: int, max_slots: int):
        super().__init__(num_gpu_blocks, num_host_blocks, max_slots)
        self.cache: dict[int, float] = {}       # slot -> key of the waiting request it holds KV for
        self.cached_blocks = 0
        self.hits: list[int] = []
        self.evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.gpu_allocator.num_free + self.cached_blocks

    @property
    def actually_free(self) -> int:
        return self.gpu_allocator.num_free

    def hold(self, slots: np.ndarray, num_blocks: np.ndarray, keys: np.ndarray) -> None:
        super().grow_to(slots, num_blocks)
        for s, k in zip(slots.tolist(), keys.tolist()):
            self.cache[s] = float(k)
        self.cached_blocks += int(num_blocks.sum())

    def _uncache(self, slot: int) -> None:
        del self.cache[slot]
        self.cached_blocks -= int(self._num_mapped[slot])

    def grow_to(self, slots: np.ndarray, num_blocks: np.ndarray) -> int:
        if self.cache:
            slots = np.asarray(slots, np.int64)
            for s in slots.tolist():
                if s in self.cache:
                    self._uncache(s)
                    self.hits.append(s)
            need = int(np.maximum(np.asarray(num_blocks, np.int64) - self._num_mapped[slots], 0).sum())
            while self.gpu_allocator.num_free < need and self.cache:
                victim = max(self.cache, key=self.cache.__getitem__)
                self._uncache(victim)
                super().free(victim)
                self.evictions += 1
        return super().grow_to(slots, num_blocks)

    def free(self, slot: int) -> None:
        if slot in self.cache:
            self._uncache(slot)
        super().free(slot)


class ProbeAdmission:
    """The hook (see the module docstring). `probe_frac`: cost of a probe per prompt token as a
    fraction of a full prefill's (default 19 / 30: SmolLM2-135M's probe layer; mode kv always 1).
    `budget`: token-equivalents per step shared with the plan's prefill (None: the engine's
    max_tokens_per_step; math.inf: no cap). One instance per `simulate` call."""

    def __init__(self, mode: str = "probe", probe_frac: float = 19 / 30, budget: float | None = None,
                 piggyback: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= probe_frac <= 1.0:
            raise ValueError(f"probe_frac must be in [0, 1], got {probe_frac}")
        self.mode, self.piggyback = mode, piggyback
        self.frac = 1.0 if mode == "kv" else float(probe_frac)
        self.budget_opt = budget
        self.bound = False

    def bind(self, core, trace, sc) -> None:
        if self.bound:
            raise RuntimeError("ProbeAdmission: one instance per simulate() call")
        if sc.policy not in ("trail", "sjf_prompt"):
            raise ValueError(f"admission by the prefill probe needs policy trail or sjf_prompt, got {sc.policy!r}")
        self.bound = True
        self.sched = core.scheduler
        n = len(trace)
        self.first = trace.pred[trace.pred_cu[:-1]].astype(np.float32)   # the prefill probe's remaining at g = 0
        self.prompt = trace.prompt_len.astype(np.int64)
        self.slot = np.full(n, -1, np.int64)
        self.started = np.zeros(n, bool)
        self.skip = np.zeros(n, bool)            # kv: KV kept until admission, its prefill rows are free
        self.pending = np.zeros(0, np.int64)     # added, never scheduled, not yet probed (arrival order)
        self.budget = float(sc.max_tokens_per_step if self.budget_opt is None else self.budget_opt)
        self.block_size = sc.block_size
        self.stats = {"probed_requests": 0, "probe_tokens": 0, "probe_token_equivalents": 0.0,
                      "skipped_prefill_tokens": 0, "cache_hits": 0}
        if self.mode == "kv":
            old = core.ledger
            core.ledger = CachingLedger(old.gpu_allocator.num_free, old.host_allocator.num_free, sc.max_slots)
        self.ledger = core.ledger

    def _set(self, ids: np.ndarray) -> None:
        self.sched.set_predictions(torch.from_numpy(self.slot[ids].astype(np.int32)),
                                   torch.from_numpy(self.first[ids]))

    def added(self, ids: np.ndarray, slots: np.ndarray) -> None:
        self.slot[ids] = slots
        if self.mode == "free":
            self._set(ids)
        else:
            self.pending = np.concatenate([self.pending, np.asarray(ids, np.int64)])

    def after_plan(self, S: np.ndarray, prefill: np.ndarray) -> tuple[np.ndarray, float, int]:
        """After the step's plan was applied: (prefill mask of the plan's rows, extra prefill
        token-equivalents, extra prefill rows) for the step-time model."""
        rids = S[:, SCHED.ID]
        if self.mode == "kv":
            led = self.ledger
            if led.hits:
                hit = np.isin(S[:, SCHED.SLOT], led.hits)
                self.skip[rids[hit]] = True
                self.stats["cache_hits"] += int(hit.sum())
                led.hits.clear()
            sk = prefill & self.skip[rids]
            if sk.any():
                self.stats["skipped_prefill_tokens"] += int(S[sk, SCHED.TOKENS].sum())
                prefill = prefill & ~sk
                done = sk & ((S[:, SCHED.FLAGS] & row_flags.SAMPLE) != 0)
                self.skip[rids[done]] = False
        self.started[rids] = True
        if self.mode == "free" or not len(self.pending):
            return prefill, 0.0, 0
        self.pending = self.pending[~self.started[self.pending]]
        left = self.budget - float(S[prefill, SCHED.TOKENS].sum())
        if not len(self.pending) or left <= 0 or (self.piggyback and not prefill.any()):
            return prefill, 0.0, 0
        cost = self.prompt[self.pending] * self.frac
        k = int(np.searchsorted(np.cumsum(cost), left, side="right"))
        if self.mode == "kv" and k:
            nb = -(-self.prompt[self.pending[:k]] // self.block_size)
            k = int(np.searchsorted(np.cumsum(nb), self.ledger.actually_free, side="right"))
        if k == 0:
            return prefill, 0.0, 0
        take, self.pending = self.pending[:k], self.pending[k:]
        if self.mode == "kv":
            self.ledger.hold(self.slot[take], -(-self.prompt[take] // self.block_size), self.first[take])
        self._set(take)
        extra = float(cost[:k].sum())
        self.stats["probed_requests"] += k
        self.stats["probe_tokens"] += int(self.prompt[take].sum())
        self.stats["probe_token_equivalents"] += extra
        return prefill, extra, k

    def summary(self) -> dict:
        out = {"mode": self.mode, "probe_frac": self.frac, "budget": self.budget, "piggyback": self.piggyback,
               **self.stats}
        if self.mode == "kv":
            out["cache_evictions"] = self.ledger.evictions
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in out.items()}
