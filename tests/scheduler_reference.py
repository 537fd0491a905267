"""The scheduler's test oracle: a pure-Python implementation of the scheduler step (same rules,
same API, same decisions as the C++ core in csrc/scheduler/, which trail.scheduler wraps).
tests/test_scheduler.py compares the two; the micro-benchmark (bench/micro/heapq_scheduler.py)
runs this logic over lazy-deletion heapq queues as the vLLM-style baseline. Not part of trail.

The queues are pluggable: `NaiveQueue` (a dict scanned with min/max: obviously correct, O(n))
is the default; any class with the same methods (push, update, remove, top, pop, __len__,
__contains__) can be passed as `queue_cls`. Keys are (key, arrival, id) tuples: a total order.
"""
from __future__ import annotations

import math

import torch

from trail.scheduler_types import (PREEMPT, POLICIES, SCHED, Mode, Resume, SchedulerConfig, State, StepOutput,
                                   Stop, add_many_args)
from trail_kernels import row_flags

FCFS, SJF_PROMPT, TRAIL, ORACLE = range(4)
FRONT_KEY = -1e300  # waiting key of a forced-evicted request (resume_forced_first)


class NaiveQueue:
    """Min (or max) queue over slots as a dict scanned on every top(): the test oracle's queue."""

    def __init__(self, is_max: bool = False):
        self._d: dict[int, tuple] = {}
        self._max = is_max

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, slot: int) -> bool:
        return slot in self._d

    def push(self, slot: int, key: tuple) -> None:
        if slot in self._d:
            raise AssertionError(f"slot {slot} pushed twice")
        self._d[slot] = key

    def update(self, slot: int, key: tuple) -> None:
        if slot not in self._d:
            raise AssertionError(f"slot {slot} not queued")
        self._d[slot] = key

    def remove(self, slot: int) -> None:
        del self._d[slot]

    def top(self) -> int:
        return (max if self._max else min)(self._d, key=self._d.__getitem__)

    def pop(self) -> int:
        slot = self.top()
        del self._d[slot]
        return slot


class _Req:
    __slots__ = ("id", "arrival", "prompt_len", "max_new", "true_total", "prompt_pred", "state", "resume",
                 "started", "init_pending", "touched", "ctx", "target", "gen", "preemptions", "key", "init",
                 "waited", "t_enq", "kwaited", "k_enq", "s", "plan_tokens", "plan_need", "forced", "forced_wait", "preempted_wait")

    def __init__(self):
        self.state = State.FREE
        self.resume = Resume.NONE
        self.started = self.init_pending = self.touched = False
        self.ctx = self.target = self.gen = self.preemptions = self.forced = 0
        self.kwaited = self.k_enq = 0   # steps waited before the current wait; steps at its start
        self.forced_wait = False
        self.preempted_wait = False
        self.key = self.init = self.waited = self.t_enq = self.s = 0.0
        self.plan_tokens = self.plan_need = 0


class ReferenceScheduler:
    """Same API as trail.scheduler.Scheduler."""

    def __init__(self, config: SchedulerConfig, queue_cls=NaiveQueue):
        self.config = cfg = config.resolved()
        self._policy = POLICIES.index(cfg.policy)
        self._bs = cfg.block_size
        self._table: list[_Req | None] = [None] * cfg.max_slots
        self._free = list(range(cfg.max_slots - 1, -1, -1))
        self._by_id: dict[int, int] = {}
        self._waiting = queue_cls(False)   # (s, arrival, id) min
        self._kept = queue_cls(True)       # (s, arrival, id) max
        self._pre = queue_cls(True)        # (key, arrival, id) max
        self._nonpre = queue_cls(True)
        self._running: list[int] = []
        self._touched: list[int] = []
        self._stop = Stop.EMPTY
        self._host_left = 0
        self._steps = 0                    # completed steps (aging_per_step)

    # ---- helpers -------------------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return (tokens + self._bs - 1) // self._bs

    def _preemptible(self, r: _Req) -> bool:
        c = self.config.c
        return c > 0 and float(r.gen) < c * r.init and r.preemptions < self.config.max_preemptions

    def _at_front(self, r: _Req) -> bool:
        cfg = self.config
        return (cfg.resume_forced_first and r.forced_wait) or (cfg.resume_preempted_first and r.preempted_wait)

    def _wait_s(self, r: _Req) -> float:
        if self._at_front(r):
            return FRONT_KEY
        cfg = self.config
        return r.key + cfg.aging_rate * (r.t_enq - r.waited) + cfg.aging_per_step * float(r.k_enq - r.kwaited)

    def _pred_remaining(self, r: _Req) -> float:
        if self._policy == TRAIL:
            return r.key
        if self._policy == ORACLE:
            return float(max(r.true_total - r.gen, 0))
        return max(r.prompt_pred - float(r.gen), 0.0)

    def _reserve_fits(self, h: int, t: int, gpu_left: int) -> bool:
        """Memory-aware admission (see scheduler.h: admit_reserve), in integer 1/bs-block units."""
        bs, cfg, table = self._bs, self.config, self._table
        held = 0
        peak = []

        def add(r: _Req, tokens: int) -> None:
            nonlocal held
            held += self._blocks(r.ctx + tokens)
            base = max(r.ctx + tokens, r.target)
            cap = max(r.max_new - r.gen, 1)
            want = cfg.admit_reserve * self._pred_remaining(r)
            rem = cap if want >= float(cap) else max(int(math.ceil(want)), 1)
            peak.append((rem, base))

        for s in self._running:
            add(table[s], table[s].plan_tokens)
        add(table[h], t)
        peak.sort(key=lambda x: -x[0])
        total = best = 0
        for k, (rem, base) in enumerate(peak, 1):
            total += base
            best = max(best, total + k * (rem - 1 + bs - 1))
        return best <= (gpu_left + held - cfg.watermark_blocks) * bs

    def _under_pressure(self, free_after: int) -> bool:
        """The admission reserve applies only while the blocks free after the admission would be
        below reserve_free_frac of the pool (1: always)."""
        frac = self.config.reserve_free_frac
        return frac >= 1 or float(free_after) < frac * float(self.config.num_gpu_blocks)

    def _forced_victim(self) -> int:
        cfg, table = self.config, self._table
        if cfg.max_forced_evictions == 0 and cfg.evict_kv_weight == 0:
            if len(self._pre):
                return self._pre.top()
            if len(self._nonpre):
                return self._nonpre.top()
            return -1
        if not self._running:
            return -1

        def rank(s: int) -> tuple:
            r = table[s]
            ok = cfg.max_forced_evictions == 0 or r.forced < cfg.max_forced_evictions
            return (ok, self._pred_remaining(r) - cfg.evict_kv_weight * float(r.ctx), r.arrival, r.id)

        # the progress anchor (most KV, then earliest, then lowest id) is spared while another runs
        anchor = max(self._running, key=lambda s: (table[s].ctx, -table[s].arrival, -table[s].id))
        pool = [s for s in self._running if s != anchor] if len(self._running) > 1 else list(self._running)
        return max(pool, key=rank)

    @staticmethod
    def _run_key(r: _Req) -> tuple:
        return (r.key, r.arrival, r.id)

    @staticmethod
    def _wait_key(r: _Req) -> tuple:
        return (r.s, r.arrival, r.id)

    def _lookup(self, request_id: int, what: str) -> int:
        slot = self._by_id.get(int(request_id))
        if slot is None:
            raise ValueError(f"{what}: unknown request id {request_id}")
        return slot

    def _enqueue(self, slot: int, now: float) -> None:
        r = self._table[slot]
        r.t_enq = now
        r.k_enq = self._steps
        r.s = self._wait_s(r)
        self._waiting.push(slot, self._wait_key(r))
        if r.state == State.KEPT:
            self._kept.push(slot, self._wait_key(r))

    def _add_running(self, slot: int) -> None:
        r = self._table[slot]
        (self._pre if self._preemptible(r) else self._nonpre).push(slot, self._run_key(r))

    def _remove_running(self, slot: int) -> None:
        if slot in self._pre:
            self._pre.remove(slot)
        elif slot in self._nonpre:
            self._nonpre.remove(slot)
        i = self._running.index(slot)
        self._running[i] = self._running[-1]
        self._running.pop()

    def _touch(self, slot: int) -> None:
        r = self._table[slot]
        if not r.touched:
            r.touched = True
            self._touched.append(slot)

    def _free_mode(self, r: _Req) -> Mode:
        cfg = self.config
        n = r.ctx
        if n > 0 and cfg.allow_swap and self._blocks(n) <= self._host_left:
            swap_s = 2.0 * n * cfg.bytes_per_token / (cfg.pcie_gbps * 1e9)
            recompute_s = float(n) * cfg.recompute_s_per_token
            if swap_s < recompute_s:
                return Mode.SWAP
        return Mode.RECOMPUTE

    @staticmethod
    def _drop(r: _Req) -> None:
        if r.ctx >= r.target:
            r.target = r.ctx + 1
        r.ctx = 0
        r.state = State.WAITING
        r.resume = Resume.RECOMPUTE

    def _preempt_running(self, slot: int, mode: Mode, forced: bool, now: float) -> int:
        r = self._table[slot]
        held = self._blocks(r.ctx)
        self._out_pre.append([r.id, slot, int(mode), int(forced), 0, held])
        self._remove_running(slot)
        r.preemptions += 1
        if forced:
            r.forced += 1
            r.forced_wait = True
        else:
            r.preempted_wait = True
        self._touch(slot)
        freed = held
        if mode == Mode.KEEP:
            r.state, r.resume, freed = State.KEPT, Resume.KEEP, 0
        elif mode == Mode.SWAP:
            r.state, r.resume = State.SWAPPED, Resume.SWAP_IN
            self._host_left -= held
        else:
            self._drop(r)
        self._enqueue(slot, now)
        return freed

    def _evict_kept(self, slot: int, forced: bool) -> int:
        r = self._table[slot]
        held = self._blocks(r.ctx)
        mode = self._free_mode(r)
        self._out_pre.append([r.id, slot, int(mode), int(forced), 1, held])
        self._kept.remove(slot)
        if forced:
            r.forced += 1
            r.forced_wait = True
            if self.config.resume_forced_first:
                r.s = self._wait_s(r)
                self._waiting.update(slot, self._wait_key(r))
        if mode == Mode.SWAP:
            r.state, r.resume = State.SWAPPED, Resume.SWAP_IN
            self._host_left -= held
        else:
            self._drop(r)
        self._touch(slot)
        return held

    # ---- API -----------------------------------------------------------------------------------
    def _check_add(self, rid: int, arrival: float, prompt_len: int, max_new_tokens: int,
                   prompt_prediction: float, true_length: int) -> None:
        cfg = self.config
        who = f"add(id={rid})"
        if rid in self._by_id:
            raise ValueError(f"{who}: a request with this id is already active")
        if not math.isfinite(arrival):
            raise ValueError(f"{who}: arrival must be finite")
        if prompt_len < 1:
            raise ValueError(f"{who}: prompt_len must be >= 1, got {prompt_len}")
        if max_new_tokens < 1:
            raise ValueError(f"{who}: max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (math.isfinite(prompt_prediction) and prompt_prediction >= 0):
            raise ValueError(f"{who}: prompt_prediction {prompt_prediction} is not a finite number >= 0")
        if self._policy == ORACLE and true_length < 1:
            raise ValueError(f"{who}: the oracle policy needs true_length >= 1, got {true_length}")
        most = self._blocks(prompt_len + max_new_tokens)
        if most > cfg.num_gpu_blocks - cfg.watermark_blocks:
            raise ValueError(f"{who}: prompt_len + max_new_tokens needs {most} KV blocks, more than the "
                             f"{cfg.num_gpu_blocks - cfg.watermark_blocks} usable (num_gpu_blocks - watermark)")

    def add(self, request_id: int, arrival: float, prompt_len: int, max_new_tokens: int,
            prompt_prediction: float, true_length: int | None = None) -> int:
        args = (int(request_id), float(arrival), int(prompt_len), int(max_new_tokens), float(prompt_prediction),
                -1 if true_length is None else int(true_length))
        self._check_add(*args)
        if not self._free:
            raise ValueError(f"add(id={args[0]}): no free slot (max_slots={self.config.max_slots})")
        return self._add_unchecked(*args)

    def add_many(self, ids, arrivals, prompt_lens, max_new_tokens, prompt_predictions,
                 true_lengths=None) -> torch.Tensor:
        cols = [t.tolist() for t in add_many_args(ids, arrivals, prompt_lens, max_new_tokens, prompt_predictions,
                                                    true_lengths)]
        rows = list(zip(*cols))
        if len(rows) > len(self._free):
            raise ValueError(f"add_many: {len(rows)} requests but only {len(self._free)} free slots "
                             f"(max_slots={self.config.max_slots})")
        seen = set()
        for row in rows:
            self._check_add(*row)
            if row[0] in seen:
                raise ValueError(f"add_many: id {row[0]} appears twice")
            seen.add(row[0])
        return torch.tensor([self._add_unchecked(*row) for row in rows], dtype=torch.int32)

    def _add_unchecked(self, rid: int, arrival: float, prompt_len: int, max_new_tokens: int,
                       prompt_prediction: float, true_length: int) -> int:
        slot = self._free.pop()
        r = _Req()
        r.id, r.arrival, r.prompt_len, r.max_new = rid, arrival, prompt_len, max_new_tokens
        r.true_total = min(true_length, r.max_new) if true_length >= 0 else -1
        r.prompt_pred = prompt_prediction
        r.key = arrival if self._policy == FCFS else float(r.true_total) if self._policy == ORACLE else prompt_prediction
        r.init = float(r.true_total) if self._policy == ORACLE else prompt_prediction
        r.init_pending = self._policy == TRAIL
        r.target = r.prompt_len
        r.state = State.WAITING
        self._table[slot] = r
        self._by_id[rid] = slot
        self._enqueue(slot, arrival)
        return slot

    def _release(self, slot: int) -> None:
        del self._by_id[self._table[slot].id]
        self._table[slot] = None
        self._free.append(slot)

    def _check_finish(self, rid: int) -> int:
        slot = self._lookup(rid, "finish")
        st = self._table[slot].state
        if st != State.RUNNING:
            raise ValueError(f"finish(id={rid}): the request is not running (state {int(st)}); use cancel")
        return slot

    def _finish_slot(self, slot: int) -> None:
        self._remove_running(slot)
        self._release(slot)

    def finish(self, request_id: int) -> int:
        slot = self._check_finish(int(request_id))
        self._finish_slot(slot)
        return slot

    def finish_many(self, ids) -> torch.Tensor:
        slots = [self._check_finish(rid) for rid in torch.as_tensor(ids, dtype=torch.int64).reshape(-1).tolist()]
        if len(set(slots)) != len(slots):
            raise ValueError("finish: an id appears twice")
        for slot in slots:
            self._finish_slot(slot)
        return torch.tensor(slots, dtype=torch.int32)

    def _cancel_slot(self, slot: int) -> State:
        st = self._table[slot].state
        if st == State.RUNNING:
            self._remove_running(slot)
        else:
            self._waiting.remove(slot)
            if st == State.KEPT:
                self._kept.remove(slot)
        self._release(slot)
        return State(st)

    def cancel(self, request_id: int) -> State:
        return self._cancel_slot(self._lookup(request_id, "cancel"))

    def cancel_many(self, ids) -> torch.Tensor:
        slots = [self._lookup(rid, "cancel") for rid in torch.as_tensor(ids, dtype=torch.int64).reshape(-1).tolist()]
        if len(set(slots)) != len(slots):
            raise ValueError("cancel: an id appears twice")
        return torch.tensor([int(self._cancel_slot(slot)) for slot in slots], dtype=torch.int32)

    def set_predictions(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        if self._policy not in (TRAIL, SJF_PROMPT):
            raise ValueError("set_predictions: only the trail and sjf_prompt policies order by predictions")
        if slots.dtype != torch.int32 or values.dtype != torch.float32 or slots.numel() != values.numel():
            raise ValueError("set_predictions: slots must be int32 and values float32, of equal length")
        sl, vals = slots.tolist(), values.tolist()
        for s, v in zip(sl, vals):
            if s < 0 or s >= self.config.max_slots or self._table[s] is None:
                raise ValueError(f"set_predictions: slot {s} holds no request")
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"set_predictions: prediction {v} for slot {s} is not a finite number >= 0")
        for s, v in zip(sl, vals):
            r = self._table[s]
            r.key = v
            if self._policy == SJF_PROMPT or not r.started:
                r.prompt_pred = v
                if not r.started:
                    r.init = v
            if r.state == State.RUNNING:
                if s in self._pre:
                    self._pre.update(s, self._run_key(r))
                elif s in self._nonpre:
                    self._nonpre.update(s, self._run_key(r))
            else:
                r.s = self._wait_s(r)
                self._waiting.update(s, self._wait_key(r))
                if r.state == State.KEPT:
                    self._kept.update(s, self._wait_key(r))

    def step(self, predictions: torch.Tensor, generated: torch.Tensor, free_gpu_blocks: int,
             free_host_blocks: int, now: float) -> StepOutput:
        cfg = self.config
        n = cfg.max_slots
        for t, dt, what in ((predictions, torch.float32, "predictions"), (generated, torch.int32, "generated")):
            if t.device.type != "cpu" or t.dtype != dt or t.dim() != 1 or t.numel() != n or not t.is_contiguous():
                raise ValueError(f"Scheduler.step: {what} must be a contiguous CPU {dt} vector of max_slots={n} "
                                 f"entries, got {t.dtype} {tuple(t.shape)} on {t.device}")
        if free_gpu_blocks < 0 or free_host_blocks < 0:
            raise ValueError(f"step: free block counts must be >= 0, got gpu {free_gpu_blocks}, host {free_host_blocks}")
        now = float(now)
        if not math.isfinite(now):
            raise ValueError("step: now must be finite")
        table, running, bs = self._table, self._running, self._bs
        trail = self._policy == TRAIL
        # Only the running slots are read (numpy views: no copy of the whole buffer).
        preds = predictions.numpy()[running].tolist() if running else []
        gens = generated.numpy()[running].tolist() if running else []
        for s, g, p in zip(running, gens, preds):
            r = table[s]
            who = f"step: slot {s} (id {r.id})"
            if g < r.gen:
                raise ValueError(f"{who}: generated count {g} is below last step's {r.gen}")
            if g > r.max_new:
                raise ValueError(f"{who}: generated count {g} exceeds max_new_tokens {r.max_new}")
            if trail and r.ctx >= r.target and not (math.isfinite(p) and p >= 0):
                raise ValueError(f"{who}: prediction {p} is not a finite number >= 0")

        self._out_sched: list[list[int]] = []
        self._out_pre: list[list[int]] = []
        self._stop = Stop.EMPTY
        for s in self._touched:
            if table[s] is not None:
                table[s].touched = False
        self._touched = []
        admitted: list[int] = []
        deferred: list[int] = []
        self._host_left = free_host_blocks
        pre, nonpre, waiting, kept = self._pre, self._nonpre, self._waiting, self._kept

        # (1) refresh
        for s, g, p in zip(list(running), gens, preds):
            r = table[s]
            r.gen = g
            if trail:
                if r.ctx >= r.target:
                    r.key = p
                    if r.init_pending:
                        r.init = float(r.gen) + r.key
                        r.init_pending = False
            elif self._policy == ORACLE:
                r.key = float(max(r.true_total - r.gen, 0))
            k = (r.key, r.arrival, r.id)
            if self._preemptible(r):
                if s in pre:
                    pre.update(s, k)
                else:
                    nonpre.remove(s)
                    pre.push(s, k)
            else:
                if s in nonpre:
                    nonpre.update(s, k)
                else:
                    pre.remove(s)
                    nonpre.push(s, k)

        # (2) plan
        tokens_left = cfg.max_tokens_per_step
        gpu_left = free_gpu_blocks
        prefillers = []
        for s in running:
            r = table[s]
            if r.ctx >= r.target:
                r.plan_tokens = 1
                r.plan_need = (r.ctx + bs) // bs - (r.ctx + bs - 1) // bs
                tokens_left -= 1
                gpu_left -= r.plan_need
            else:
                prefillers.append(s)
        prefillers.sort(key=lambda s: self._run_key(table[s]))
        for s in prefillers:
            r = table[s]
            r.plan_tokens = min(r.target - r.ctx, max(tokens_left, 0), cfg.max_prefill_chunk)
            r.plan_need = self._blocks(r.ctx + r.plan_tokens) - self._blocks(r.ctx)
            tokens_left -= r.plan_tokens
            gpu_left -= r.plan_need

        # (3) memory always wins
        while gpu_left < cfg.watermark_blocks:
            if len(kept):
                gpu_left += self._evict_kept(kept.top(), True)
                continue
            v = self._forced_victim()
            if v < 0:
                break
            r = table[v]
            tokens_left += r.plan_tokens
            gpu_left += r.plan_need
            gpu_left += self._preempt_running(v, self._free_mode(r), True, now)

        # (4) admission
        while len(waiting):
            h = waiting.top()
            r = table[h]
            if r.touched:
                waiting.pop()
                deferred.append(h)
                continue
            prefill = r.ctx < r.target
            if prefill:
                t = min(r.target - r.ctx, max(tokens_left, 0), cfg.max_prefill_chunk)
            else:
                t = 1 if tokens_left >= 1 else 0
            swap_in = self._blocks(r.ctx) if r.state == State.SWAPPED else 0
            need = self._blocks(r.ctx + t) - self._blocks(r.ctx) + swap_in
            mem_short = gpu_left - need < cfg.watermark_blocks
            if len(running) >= cfg.max_batch:
                lack = Stop.BATCH
            elif t < 1:
                lack = Stop.TOKENS
            elif mem_short:
                lack = Stop.MEMORY
            elif (cfg.admit_reserve > 0 and running and self._under_pressure(gpu_left - need)
                  and not self._reserve_fits(h, t, gpu_left - need)):
                mem_short, lack = True, Stop.MEMORY
            else:
                waiting.pop()
                if r.state == State.KEPT:
                    kept.remove(h)
                r.waited += now - r.t_enq
                r.kwaited += self._steps - r.k_enq
                r.state = State.RUNNING
                r.started = True
                r.forced_wait = False
                r.preempted_wait = False
                self._touch(h)
                r.plan_tokens, r.plan_need = t, need
                running.append(h)
                admitted.append(h)
                tokens_left -= t
                gpu_left -= need
                continue
            if mem_short and len(kept):
                k = kept.top()
                if k != h and not table[k].touched:
                    gpu_left += self._evict_kept(k, False)
                    continue
            if len(pre) and not self._at_front(r) and (cfg.memory_preemption or not mem_short):
                v = pre.top()
                vr = table[v]
                if vr.key > r.key + cfg.margin:  # raw keys: aging never preempts
                    mode = self._free_mode(vr) if (mem_short or not cfg.allow_keep) else Mode.KEEP
                    tokens_left += vr.plan_tokens
                    gpu_left += vr.plan_need
                    gpu_left += self._preempt_running(v, mode, False, now)
                    continue
            self._stop = lack
            break

        # (5) emit
        for s in running:
            r = table[s]
            if r.plan_tokens <= 0:
                continue
            prefill = r.ctx < r.target
            last = prefill and r.ctx + r.plan_tokens == r.target
            flags = row_flags.PREFILL if prefill else row_flags.SAMPLE
            if prefill:
                flags |= (row_flags.FIRST_CHUNK if r.ctx == 0 else 0) | (row_flags.RECOMPUTE if r.target > r.prompt_len else 0)
                flags |= (row_flags.LAST_CHUNK | row_flags.SAMPLE) if last else 0
            self._out_sched.append([
                r.id, s, 1 if prefill else 0, r.plan_tokens, r.ctx, self._blocks(r.ctx + r.plan_tokens),
                int(r.resume), 1 if last else 0, flags])
            r.ctx += r.plan_tokens
            r.resume = Resume.NONE
        for s in admitted:
            self._add_running(s)
        for s in deferred:
            waiting.push(s, self._wait_key(table[s]))
        self._steps += 1
        sched = torch.tensor(self._out_sched, dtype=torch.int64).reshape(-1, SCHED.NCOLS)
        pre_rows = torch.tensor(self._out_pre, dtype=torch.int64).reshape(-1, PREEMPT.NCOLS)
        return StepOutput(sched, pre_rows, int(self._stop))

    # ---- queries -------------------------------------------------------------------------------
    def snapshot(self) -> torch.Tensor:
        rows = [[r.id, s, int(r.state), r.ctx, r.target, r.gen, r.preemptions, r.key, r.init, int(r.resume)]
                for s, r in enumerate(self._table) if r is not None]
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, 10)

    def slot_of(self, request_id: int) -> int:
        slot = self._by_id.get(int(request_id))
        if slot is None:
            raise KeyError(f"slot_of: unknown request id {request_id}")
        return slot

    def state_of(self, request_id: int) -> State:
        return State(self._table[self.slot_of(request_id)].state)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_active(self) -> int:
        return len(self._by_id)
