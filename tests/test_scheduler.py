"""The scheduler (trail.scheduler over the C++ core, and the Python reference): targeted scenarios
for each rule, bad input, and hypothesis runs of a simulated engine that check the rules directly
(its own model of every request: state, KV tokens, blocks, keys, c rule), not only agreement
between the two implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trail_kernels import row_flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler_reference import ReferenceScheduler

from trail.scheduler import (PREEMPT, POLICIES, SCHED, SNAP, Kind, Mode, Resume, Scheduler, SchedulerConfig,
                             State, Stop)
from trail.scheduler_types import TRAIL_PAPER

IMPLS = {"native": Scheduler, "reference": ReferenceScheduler}


def make_scheduler(config: SchedulerConfig, impl: str):
    """The C++ core (`native`) or the pure-Python test oracle (`reference`)."""
    return IMPLS[impl](config)


def _blocks(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


# ------------------------------------------------------------------------------------------------
# A simulated engine with its own model of every request
# ------------------------------------------------------------------------------------------------
class Model:
    __slots__ = ("id", "slot", "arrival", "prompt", "max_new", "true_total", "key", "init", "init_pending",
                 "state", "ctx", "target", "gen", "host", "preemptions", "started", "prompt_pred", "forced",
                 "forced_wait", "preempted_wait", "t_enq", "waited", "k_enq", "kwaited")


class Sim:
    """Drives a scheduler like the engine would and checks every decision against the rules."""

    def __init__(self, sched, cfg: SchedulerConfig, rng: np.random.Generator, noise: float = 0.5):
        self.s = sched
        self.cfg = cfg.resolved()
        self.rng = rng
        self.noise = noise
        self.reqs: dict[int, Model] = {}
        self.now = 0.0
        self.next_id = 0
        self.finished: list[int] = []
        self.cancelled: list[int] = []
        self.steps = 0
        self.stats = {"policy_preempt": 0, "forced": 0, "keep": 0, "swap": 0, "recompute": 0}
        n = self.cfg.max_slots
        self.pred = torch.zeros(n, dtype=torch.float32)
        self.generated = torch.zeros(n, dtype=torch.int32)

    # ---- model helpers ----
    def bs(self):
        return self.cfg.block_size

    def gpu_blocks(self, m: Model) -> int:
        return _blocks(m.ctx, self.bs()) if m.state in (State.RUNNING, State.KEPT) else 0

    def used_gpu(self) -> int:
        return sum(self.gpu_blocks(m) for m in self.reqs.values())

    def used_host(self) -> int:
        return sum(m.host for m in self.reqs.values())

    def pred_remaining(self, m: Model) -> float:
        if self.cfg.policy == "trail":
            return m.key
        if self.cfg.policy == "oracle":
            return float(max(m.true_total - m.gen, 0))
        return max(m.prompt_pred - float(m.gen), 0.0)

    def at_front(self, m: Model) -> bool:
        cfg = self.cfg
        return (cfg.resume_forced_first and m.forced_wait) or (cfg.resume_preempted_first and m.preempted_wait)

    def wait_order(self, m: Model) -> tuple:
        """Admission order: key aged by seconds and steps waited over all its waits (the same
        arithmetic as the scheduler's, so ties break alike), forced-evicted ones first."""
        cfg = self.cfg
        if self.at_front(m):
            return (-math.inf, m.arrival, m.id)
        aged = m.key + cfg.aging_rate * (m.t_enq - m.waited) + cfg.aging_per_step * float(m.k_enq - m.kwaited)
        return (aged, m.arrival, m.id)

    def eligible(self, m: Model) -> bool:
        c = self.cfg.c
        return c > 0 and float(m.gen) < c * m.init and m.preemptions < self.cfg.max_preemptions

    # ---- engine actions ----
    def add(self, prompt: int, max_new: int, true_len: int, prompt_pred: float) -> int:
        rid = self.next_id
        self.next_id += 1
        slot = self.s.add(rid, self.now, prompt, max_new, prompt_pred,
                          true_len if self.cfg.policy == "oracle" or self.rng.random() < 0.5 else None)
        assert 0 <= slot < self.cfg.max_slots
        assert all(m.slot != slot for m in self.reqs.values()), "slot handed out twice"
        m = Model()
        m.id, m.slot, m.arrival, m.prompt, m.max_new = rid, slot, self.now, prompt, max_new
        m.true_total = min(true_len, max_new)
        m.prompt_pred = float(prompt_pred)
        m.key = {"fcfs": self.now, "oracle": float(m.true_total)}.get(self.cfg.policy, m.prompt_pred)
        m.init = float(m.true_total) if self.cfg.policy == "oracle" else m.prompt_pred
        m.init_pending = self.cfg.policy == "trail"
        m.state, m.ctx, m.target, m.gen, m.host, m.preemptions, m.started = State.WAITING, 0, prompt, 0, 0, 0, False
        m.forced, m.forced_wait, m.preempted_wait = 0, False, False
        m.t_enq, m.waited, m.k_enq, m.kwaited = self.now, 0.0, self.steps, 0
        self.reqs[rid] = m
        return rid

    def cancel_random(self) -> None:
        if not self.reqs:
            return
        rid = list(self.reqs)[self.rng.integers(len(self.reqs))]
        m = self.reqs.pop(rid)
        assert self.s.cancel(rid) == m.state
        self.cancelled.append(rid)

    def update_waiting_predictions(self) -> None:
        if self.cfg.policy not in ("trail", "sjf_prompt"):
            return
        waiting = [m for m in self.reqs.values() if m.state != State.RUNNING]
        if not waiting:
            return
        pick = [waiting[i] for i in self.rng.choice(len(waiting), size=min(3, len(waiting)), replace=False)]
        vals = torch.tensor([self.rng.uniform(0, 80) for _ in pick], dtype=torch.float32)
        self.s.set_predictions(torch.tensor([m.slot for m in pick], dtype=torch.int32), vals)
        for m, v in zip(pick, vals.tolist()):
            m.key = v
            if self.cfg.policy == "sjf_prompt" or not m.started:
                m.prompt_pred = v
                if not m.started:
                    m.init = v

    def step(self) -> None:
        cfg, bs = self.cfg, self.bs()
        k_now = self.steps  # the scheduler's count of completed steps
        self.steps += 1
        self.pred.fill_(float("nan"))  # only running slots may be read
        self.generated.fill_(-1)
        running0 = [m for m in self.reqs.values() if m.state == State.RUNNING]
        kept0 = {m.id for m in self.reqs.values() if m.state == State.KEPT}
        for m in running0:
            self.generated[m.slot] = m.gen
            if m.ctx >= m.target:
                true_rem = m.true_total - m.gen
                p = float(np.float32(max(0.0, true_rem * math.exp(self.rng.normal(0, self.noise)))))
                self.pred[m.slot] = p
                if cfg.policy == "trail":
                    m.key = p
                    if m.init_pending:
                        m.init, m.init_pending = float(m.gen) + p, False
            if cfg.policy == "oracle":
                m.key = float(max(m.true_total - m.gen, 0))
        eligible0 = {m.id for m in running0 if self.eligible(m)}
        free_gpu = cfg.num_gpu_blocks - self.used_gpu()
        free_host = cfg.num_host_blocks - self.used_host()
        assert free_gpu >= 0 and free_host >= 0
        # upper bound of the running requests' needs: a forced eviction is only allowed beyond it
        ub = 0
        for m in running0:
            u = 1 if m.ctx >= m.target else min(m.target - m.ctx, cfg.max_prefill_chunk, cfg.max_tokens_per_step)
            ub += _blocks(m.ctx + u, bs) - _blocks(m.ctx, bs)

        out = self.s.step(self.pred, self.generated, free_gpu, free_host, self.now)
        sched, pre = out.scheduled.tolist(), out.preempted.tolist()

        # ---- preemptions, in order ----
        touched = set()
        host_budget = free_host
        eligible_left, kept_left = set(eligible0), set(kept0)
        running_left = {m.id for m in running0}
        new_rule = cfg.max_forced_evictions > 0 or cfg.evict_kv_weight > 0
        for rid, slot, mode, forced, from_kept, blocks in pre:
            m = self.reqs[rid]
            assert m.slot == slot and rid not in touched, "preempted twice or wrong slot"
            touched.add(rid)
            assert blocks == _blocks(m.ctx, bs)
            if not from_kept:  # a new wait starts
                m.t_enq, m.k_enq = self.now, k_now
            if from_kept:
                assert m.state == State.KEPT and mode in (Mode.SWAP, Mode.RECOMPUTE)
                kept_left.discard(rid)
                if forced:
                    assert ub + cfg.watermark_blocks > free_gpu, "kept request evicted without a memory shortage"
                    m.forced += 1
                    m.forced_wait = True
            else:
                assert m.state == State.RUNNING
                m.preemptions += 1
                if forced:
                    self.stats["forced"] += 1
                    assert mode != Mode.KEEP
                    assert ub + cfg.watermark_blocks > free_gpu, "forced eviction without a memory shortage"
                    assert not kept_left, "running request evicted while a kept one still holds memory"
                    if new_rule:  # the largest (under the bound, predicted remaining - w * KV, arrival, id)
                        def rank(x: Model) -> tuple:
                            ok = cfg.max_forced_evictions == 0 or x.forced < cfg.max_forced_evictions
                            return (ok, self.pred_remaining(x) - cfg.evict_kv_weight * float(x.ctx), x.arrival, x.id)
                        # the progress anchor (most KV, earliest, lowest id) is spared while another runs
                        cands = [self.reqs[i] for i in running_left]
                        if len(cands) > 1:
                            anchor = max(cands, key=lambda x: (x.ctx, -x.arrival, -x.id))
                            cands = [x for x in cands if x is not anchor]
                        best = max(cands, key=rank)
                        assert best.id == rid, "forced victim is not the largest by the rule"
                    elif rid not in eligible0:
                        assert not eligible_left, "non-preemptible request evicted before a preemptible one"
                    m.forced += 1
                    m.forced_wait = True
                else:
                    self.stats["policy_preempt"] += 1
                    m.preempted_wait = True
                    # the c rule and the cap: the policy never preempts past them
                    assert rid in eligible0, "the policy preempted a request past its c threshold or cap"
                eligible_left.discard(rid)
                running_left.discard(rid)
            if mode == Mode.KEEP:
                self.stats["keep"] += 1
                m.state = State.KEPT
            elif mode == Mode.SWAP:
                self.stats["swap"] += 1
                assert cfg.allow_swap and blocks <= host_budget and m.ctx > 0
                host_budget -= blocks
                m.state, m.host = State.SWAPPED, blocks
            else:
                self.stats["recompute"] += 1
                if m.ctx >= m.target:
                    m.target = m.ctx + 1
                m.state, m.ctx = State.WAITING, 0
        # policy victims: their key exceeds some newcomer's by the margin (raw keys: aging never
        # makes a preemption, and ties within the margin never preempt)
        for rid, _slot, _mode, forced, from_kept, _b in pre:
            if not forced and not from_kept:
                newcomer_keys = [m.key for m in self.reqs.values()
                                 if m.state != State.RUNNING and m.id not in touched]
                assert newcomer_keys and self.reqs[rid].key > min(newcomer_keys) + cfg.margin

        # ---- scheduled rows ----
        ids = [r[SCHED.ID] for r in sched]
        assert len(ids) == len(set(ids)), "request scheduled twice in one step"
        assert not set(ids) & {r[0] for r in pre}, "request preempted and scheduled in one step"
        total_tokens = 0
        admitted = []
        for rid, slot, kind, tokens, ctx_start, blocks, resume, last, flags in sched:
            m = self.reqs[rid]
            assert m.slot == slot and tokens >= 1 and ctx_start == m.ctx
            if m.state == State.RUNNING:
                assert resume == Resume.NONE
            else:
                admitted.append((m, self.wait_order(m)))
                m.waited += self.now - m.t_enq
                m.kwaited += k_now - m.k_enq
                expect = {State.KEPT: Resume.KEEP, State.SWAPPED: Resume.SWAP_IN}.get(
                    m.state, Resume.RECOMPUTE if m.started else Resume.NONE)
                assert resume == expect, (resume, expect, m.state)
                m.started = True
                m.forced_wait = m.preempted_wait = False
                if m.state == State.SWAPPED:
                    m.host = 0
                m.state = State.RUNNING
            if m.ctx < m.target:
                assert kind == Kind.PREFILL and tokens <= min(m.target - m.ctx, cfg.max_prefill_chunk)
                assert last == int(m.ctx + tokens == m.target)
                # every chunk of a re-prefill of prompt + generated tokens is marked RECOMPUTE
                expect_flags = (row_flags.PREFILL | (row_flags.FIRST_CHUNK if m.ctx == 0 else 0)
                                | (row_flags.LAST_CHUNK | row_flags.SAMPLE if last else 0)
                                | (row_flags.RECOMPUTE if m.target > m.prompt else 0))
            else:
                assert kind == Kind.DECODE and tokens == 1 and last == 0
                expect_flags = row_flags.SAMPLE
            assert flags == expect_flags, (flags, expect_flags)
            assert blocks == _blocks(m.ctx + tokens, bs)
            m.ctx += tokens
            total_tokens += tokens
            touched.add(rid)

        # ---- limits: batch, tokens, memory (next step's needs + watermark), host ----
        running = [m for m in self.reqs.values() if m.state == State.RUNNING]
        assert len(running) <= cfg.max_batch
        assert total_tokens <= cfg.max_tokens_per_step
        assert cfg.num_gpu_blocks - self.used_gpu() >= cfg.watermark_blocks, "KV blocks over the limit"
        assert self.used_host() <= cfg.num_host_blocks
        for m in running:
            assert m.id in ids or m.ctx < m.target, "a running decode was left out of the batch"

        # ---- SPRPT: admission in key order; nothing waits behind an eligible longer request ----
        waiting = [m for m in self.reqs.values() if m.state != State.RUNNING and m.id not in touched]
        if waiting:
            wmin = min(waiting, key=self.wait_order)
            for _a, order in admitted:
                assert order < self.wait_order(wmin), "admitted out of key order"
            # a head at the front (resume_forced_first / resume_preempted_first) waits for room and
            # preempts no one
            front_blocks = any(self.at_front(m) for m in waiting)
            # without memory preemption, a head short of memory waits behind longer requests (the
            # stop reason may name the batch cap when both bind)
            front_blocks |= not cfg.memory_preemption and out.stop_reason != Stop.EMPTY
            for r in running if not front_blocks else []:
                if r.id in eligible0:
                    assert r.key <= wmin.key + cfg.margin, (
                        f"request {wmin.id} (key {wmin.key}) waits behind preemptible {r.id} (key {r.key})")

        # ---- the engine runs the batch: tokens, stop checks (finished ones reported in one call) ----
        done = []
        for rid, _slot, kind, _t, _c, _b, _r, last, _f in sched:
            m = self.reqs[rid]
            if kind == Kind.DECODE or last:
                m.gen += 1
                if m.gen >= m.true_total:
                    done.append(rid)
        if len(done) == 1:
            assert self.s.finish(done[0]) == self.reqs[done[0]].slot
        elif done:
            assert self.s.finish_many(torch.tensor(done)).tolist() == [self.reqs[r].slot for r in done]
        for rid in done:
            del self.reqs[rid]
            self.finished.append(rid)
        self.now += 0.01
        self.check_table()

    def check_table(self) -> None:
        snap = self.s.snapshot()
        assert self.s.num_active == len(self.reqs) == snap.shape[0], "request lost or duplicated"
        got = {int(r[SNAP.ID]): r for r in snap.tolist()}
        assert set(got) == set(self.reqs)
        for rid, m in self.reqs.items():
            row = got[rid]
            assert int(row[SNAP.SLOT]) == m.slot and int(row[SNAP.STATE]) == m.state
            assert int(row[SNAP.CTX]) == m.ctx and int(row[SNAP.TARGET]) == m.target
        assert self.s.num_running == sum(m.state == State.RUNNING for m in self.reqs.values())
        assert self.s.num_waiting == len(self.reqs) - self.s.num_running


def _random_config(data, policy=None) -> SchedulerConfig:
    policy = policy or data.draw(st.sampled_from(POLICIES))
    bs = data.draw(st.sampled_from([1, 4, 16]))
    max_batch = data.draw(st.integers(1, 8))
    tight = data.draw(st.booleans())
    watermark = data.draw(st.integers(0, 2))
    # a tight pool still holds the largest request (63 + 63 tokens) above the watermark
    return SchedulerConfig(
        policy=policy, max_slots=64, max_batch=max_batch,
        max_tokens_per_step=data.draw(st.integers(max_batch, 96)),
        max_prefill_chunk=data.draw(st.sampled_from([None, 8, 32])),
        block_size=bs,
        num_gpu_blocks=(_blocks(128, bs) + watermark + data.draw(st.integers(0, 8))) if tight else _blocks(2000, bs),
        num_host_blocks=data.draw(st.sampled_from([0, _blocks(64, bs), _blocks(4000, bs)])),
        watermark_blocks=watermark,
        c=data.draw(st.sampled_from([None, 0.0, 0.5, 0.8, 1.0, 5.0])),
        margin=data.draw(st.sampled_from([0.0, 5.0])),
        max_preemptions=data.draw(st.integers(0, 3)),
        allow_keep=data.draw(st.booleans()),
        allow_swap=data.draw(st.booleans()),
        bytes_per_token=1000.0, pcie_gbps=10.0,
        recompute_s_per_token=data.draw(st.sampled_from([0.0, 1e-5])),
        aging_rate=data.draw(st.sampled_from([0.0, 0.0, 0.0, 50.0])),
        aging_per_step=data.draw(st.sampled_from([0.0, 0.0, 0.0, 3.0])),
        admit_reserve=data.draw(st.sampled_from([0.0, 0.0, 1.0, 1.5])),
        reserve_free_frac=data.draw(st.sampled_from([None, 1.0, 0.5, 0.0])),
        max_forced_evictions=data.draw(st.sampled_from([0, 0, 1, 2])),
        evict_kv_weight=data.draw(st.sampled_from([0.0, 0.0, 1.0])),
        resume_forced_first=data.draw(st.booleans()),
        resume_preempted_first=data.draw(st.booleans()),
        memory_preemption=data.draw(st.sampled_from([True, True, False])),
    )


def _run(sched, cfg, seed: int, n_arrival_steps: int, arrival_p: float, cancel_p: float, bound_factor: int = 4):
    rng = np.random.default_rng(seed)
    sim = Sim(sched, cfg, rng)
    total_work = 0
    for _ in range(n_arrival_steps):
        for _ in range(rng.poisson(arrival_p)):
            if sim.s.num_active >= cfg.max_slots:
                break
            prompt, max_new = int(rng.integers(1, 64)), int(rng.integers(1, 64))
            true_len = int(rng.integers(1, 80))
            sim.add(prompt, max_new, true_len, float(rng.uniform(0, 80)))
            total_work += prompt + max_new
        if rng.random() < cancel_p:
            sim.cancel_random()
        if rng.random() < 0.1:
            sim.update_waiting_predictions()
        sim.step()
    # arrivals stop: everything finishes in bounded steps (no deadlock, no livelock)
    bound = bound_factor * (total_work + 10)
    for _ in range(bound):
        if not sim.reqs:
            break
        sim.step()
    assert not sim.reqs, f"{len(sim.reqs)} requests unfinished after {bound} steps"
    return sim


# ------------------------------------------------------------------------------------------------
# Hypothesis: the rules, checked directly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rules_hold_on_random_traces(impl, data):
    cfg = _random_config(data)
    seed = data.draw(st.integers(0, 2**31 - 1))
    sim = _run(make_scheduler(cfg, impl), cfg, seed, n_arrival_steps=data.draw(st.integers(5, 60)),
               arrival_p=data.draw(st.sampled_from([0.3, 1.0, 3.0])), cancel_p=0.05)
    assert len(sim.finished) + len(sim.cancelled) == sim.next_id


def test_traces_exercise_every_decision():
    """The random traces are only a test if they reach preemption, eviction, swap, keep, recompute."""
    totals = dict.fromkeys(["policy_preempt", "forced", "keep", "swap", "recompute"], 0)
    for seed in range(12):
        for tight in (True, False):
            cfg = SchedulerConfig(policy="trail", max_slots=64, max_batch=4, max_tokens_per_step=48,
                                  block_size=4, num_gpu_blocks=40 if tight else 600,
                                  num_host_blocks=60 if seed % 2 else 0, watermark_blocks=1, c=1.0,
                                  max_preemptions=3, allow_keep=not tight, bytes_per_token=1000.0,
                                  pcie_gbps=10.0, recompute_s_per_token=1e-5 if seed % 3 else 0.0)
            sim = _run(Scheduler(cfg), cfg, seed, n_arrival_steps=40, arrival_p=1.0, cancel_p=0.05)
            for k in totals:
                totals[k] += sim.stats[k]
    assert all(v > 0 for v in totals.values()), totals


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_native_and_reference_agree(data):
    cfg = _random_config(data)
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    a, b = Scheduler(cfg), ReferenceScheduler(cfg)
    sim = Sim(a, cfg, rng)

    class Both:  # drives both, returns the native result after comparing
        def __getattr__(self, name):
            def call(*args):
                ra, rb = getattr(a, name)(*args), getattr(b, name)(*args)
                if name == "step":
                    assert torch.equal(ra.preempted, rb.preempted)
                    key = lambda t: t[t[:, SCHED.ID].argsort()]  # noqa: E731
                    assert torch.equal(key(ra.scheduled), key(rb.scheduled))
                    assert ra.stop_reason == rb.stop_reason
                    assert torch.equal(a.snapshot(), b.snapshot())
                elif isinstance(ra, torch.Tensor):
                    assert torch.equal(ra, rb)
                else:
                    assert ra == rb
                return ra
            return call

        def snapshot(self):
            return a.snapshot()

        num_active = property(lambda self: a.num_active)
        num_running = property(lambda self: a.num_running)
        num_waiting = property(lambda self: a.num_waiting)

    sim.s = Both()
    for _ in range(data.draw(st.integers(5, 50))):
        for _ in range(rng.poisson(1.5)):
            if a.num_active < cfg.max_slots:
                sim.add(int(rng.integers(1, 64)), int(rng.integers(1, 64)), int(rng.integers(1, 80)),
                        float(rng.uniform(0, 80)))
        if rng.random() < 0.05:
            sim.cancel_random()
        if rng.random() < 0.1:
            sim.update_waiting_predictions()
        sim.step()


def test_heapq_baseline_agrees_with_native():
    from bench.micro.heapq_scheduler import HeapqScheduler

    for seed in range(4):
        cfg = SchedulerConfig(policy="trail", max_slots=256, max_batch=16, max_tokens_per_step=64,
                              block_size=4, num_gpu_blocks=120, num_host_blocks=80, watermark_blocks=1,
                              c=1.0, bytes_per_token=1000.0, pcie_gbps=10.0, recompute_s_per_token=1e-5)
        a, b = Scheduler(cfg), HeapqScheduler(cfg)
        sa = _run(a, cfg, seed, 60, 2.0, 0.05)
        sb = _run(b, cfg, seed, 60, 2.0, 0.05)
        assert sa.finished == sb.finished and sa.stats == sb.stats


# ------------------------------------------------------------------------------------------------
# Targeted scenarios
# ------------------------------------------------------------------------------------------------
def _cfg(**kw) -> SchedulerConfig:
    """TRAIL's published rules (TRAIL_PAPER) unless a test sets the new options."""
    base = dict(policy="trail", max_slots=16, max_batch=2, max_tokens_per_step=64, block_size=4,
                num_gpu_blocks=200, num_host_blocks=100, watermark_blocks=0,
                max_preemptions=4, bytes_per_token=1000.0, pcie_gbps=10.0, recompute_s_per_token=1e-5)
    base.update(TRAIL_PAPER)
    base.update(kw)
    return SchedulerConfig(**base)


def _arrays(n=16):
    return torch.zeros(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int32)


def _step(s, pred, gen, free_gpu=200, free_host=100, now=0.0):
    out = s.step(pred, gen, free_gpu, free_host, now)
    return out.scheduled.tolist(), out.preempted.tolist()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("policy,expected", [("fcfs", [0, 1]), ("sjf_prompt", [2, 1]), ("trail", [2, 1]),
                                             ("oracle", [3, 2])])
def test_admission_order_per_policy(impl, policy, expected):
    s = make_scheduler(_cfg(policy=policy), impl)
    # id: prompt prediction, true length
    for rid, (pp, tl) in enumerate([(50.0, 40), (20.0, 30), (10.0, 20), (60.0, 5)]):
        s.add(rid, float(rid), 8, 64, pp, tl)
    sched, pre = _step(s, *_arrays())
    assert [r[SCHED.ID] for r in sched] == expected and pre == []


@pytest.mark.parametrize("impl", IMPLS)
def test_trail_preempts_largest_remaining_then_respects_c(impl):
    s = make_scheduler(_cfg(max_batch=2, margin=5.0), impl)
    pred, gen = _arrays()
    a = s.add(1, 0.0, 4, 64, 40.0)
    b = s.add(2, 0.0, 4, 64, 30.0)
    _step(s, pred, gen)                      # both prefill
    gen[a] = gen[b] = 1
    pred[a], pred[b] = 50.0, 30.0            # initial predictions: 51 and 31 total
    _step(s, pred, gen)                      # decode
    s.add(3, 0.1, 4, 64, 47.0)               # not shorter than 50 by the margin 5
    sched, pre = _step(s, pred, gen)
    assert pre == [] and sorted(r[SCHED.ID] for r in sched) == [1, 2]
    s.add(4, 0.2, 4, 64, 10.0)               # shorter: preempts the longest (1), kept on the GPU
    sched, pre = _step(s, pred, gen)
    assert [(r[PREEMPT.ID], r[PREEMPT.MODE], r[PREEMPT.FORCED]) for r in pre] == [(1, Mode.KEEP, 0)]
    assert sorted(r[SCHED.ID] for r in sched) == [2, 4]
    assert s.state_of(1) == State.KEPT
    c4 = s.slot_of(4)
    gen[c4], pred[c4] = 1, 10.0              # initial prediction 11: preemptible below 8.8 tokens
    # request 2 past its c threshold (0.8 * 31 = 24.8): no longer preemptible by the policy
    gen[b] = 25
    s.add(5, 0.3, 4, 64, 1.0)
    sched, pre = _step(s, pred, gen)
    assert [r[PREEMPT.ID] for r in pre] == [4]  # the other running one (key 10 > 1 + 5)
    assert s.state_of(2) == State.RUNNING


@pytest.mark.parametrize("impl", IMPLS)
def test_preemption_cap(impl):
    s = make_scheduler(_cfg(max_batch=1, max_preemptions=1, allow_keep=False), impl)
    pred, gen = _arrays()
    a = s.add(1, 0.0, 4, 64, 40.0)
    _step(s, pred, gen)
    gen[a], pred[a] = 1, 40.0
    s.add(2, 0.1, 4, 64, 5.0)
    _, pre = _step(s, pred, gen)
    assert [r[PREEMPT.ID] for r in pre] == [1]
    # request 1 resumes once 2 finishes, then is not preempted again (cap 1)
    s.finish(2)
    sched, _ = _step(s, pred, gen)
    assert [r[SCHED.ID] for r in sched] == [1]
    assert sched[0][SCHED.RESUME] in (Resume.SWAP_IN, Resume.RECOMPUTE)
    s.add(3, 0.2, 4, 64, 1.0)
    sched, pre = _step(s, pred, gen)
    assert pre == [] and [r[SCHED.ID] for r in sched] == [1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("host,rec,mode", [(100, 1e-5, Mode.SWAP), (0, 1e-5, Mode.RECOMPUTE),
                                           (100, 1e-9, Mode.RECOMPUTE)])
def test_forced_eviction_mode_by_cost_and_host_space(impl, host, rec, mode):
    # 2 requests of 8-token prompts fill 4 blocks of 4; the decodes need 2 more: one is evicted
    s = make_scheduler(_cfg(max_batch=4, num_gpu_blocks=10, num_host_blocks=host, c=0.0,
                            recompute_s_per_token=rec), impl)
    pred, gen = _arrays()
    a, b = s.add(1, 0.0, 8, 4, 5.0), s.add(2, 0.0, 8, 4, 9.0)
    _step(s, pred, gen, free_gpu=10, free_host=host)
    gen[a] = gen[b] = 1
    pred[a], pred[b] = 5.0, 9.0
    sched, pre = _step(s, pred, gen, free_gpu=1, free_host=host)
    # swap cost 2*8*1000/10e9 = 1.6 us vs recompute 8 * rec
    assert [(r[PREEMPT.ID], r[PREEMPT.MODE], r[PREEMPT.FORCED], r[PREEMPT.BLOCKS]) for r in pre] == \
        [(2, mode, 1, 2)]
    assert [r[SCHED.ID] for r in sched] == [1]
    expect = State.SWAPPED if mode == Mode.SWAP else State.WAITING
    assert s.state_of(2) == expect
    s.finish(1)
    sched, _ = _step(s, pred, gen, free_gpu=10, free_host=host - 2 * (mode == Mode.SWAP))
    (row,) = sched
    if mode == Mode.SWAP:
        assert (row[SCHED.RESUME], row[SCHED.KIND], row[SCHED.CTX_START], row[SCHED.BLOCKS]) == \
            (Resume.SWAP_IN, Kind.DECODE, 8, 3)
    else:  # re-prefill of the prompt and the one generated token
        assert (row[SCHED.RESUME], row[SCHED.KIND], row[SCHED.CTX_START], row[SCHED.TOKENS],
                row[SCHED.LAST_CHUNK]) == (Resume.RECOMPUTE, Kind.PREFILL, 0, 9, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_deadlock_when_nothing_is_preemptible_and_kv_runs_out(impl):
    # c = 0: nothing is ever preemptible; memory for ~3 requests, 6 arrive; all must finish
    cfg = _cfg(max_batch=6, num_gpu_blocks=12, num_host_blocks=0, c=0.0)
    s = make_scheduler(cfg, impl)
    sim = Sim(s, cfg, np.random.default_rng(0))
    for _ in range(6):
        sim.add(8, 12, 12, 10.0)
    for _ in range(400):
        if not sim.reqs:
            break
        sim.step()
    assert not sim.reqs and sim.stats["forced"] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_aging_lets_a_long_request_through(impl):
    def run(aging):
        s = make_scheduler(_cfg(max_batch=1, c=0.0, aging_rate=aging), impl)
        pred, gen = _arrays()
        s.add(0, 0.0, 4, 64, 100.0)  # long, waits behind a stream of short ones
        rid, now = 1, 0.0
        for _ in range(60):
            s.add(rid, now, 4, 64, 5.0)
            rid += 1
            sched, _ = _step(s, pred, gen, now=now)
            if any(r[SCHED.ID] == 0 for r in sched):
                return now
            for r in sched:
                s.finish(r[SCHED.ID])
            now += 1.0
        return None

    assert run(0.0) is None
    t = run(10.0)
    assert t is not None and 9.0 <= t <= 11.0  # (100 - 5) / 10 s of waiting


@pytest.mark.parametrize("impl", IMPLS)
def test_cancel_in_every_state_and_slot_reuse(impl):
    s = make_scheduler(_cfg(max_batch=1, num_gpu_blocks=8, allow_keep=True, margin=0.0), impl)
    pred, gen = _arrays()
    a = s.add(1, 0.0, 4, 4, 30.0)
    _step(s, pred, gen, free_gpu=8)
    gen[a], pred[a] = 1, 30.0
    s.add(2, 0.1, 4, 4, 1.0)
    _, pre = _step(s, pred, gen, free_gpu=7)  # 1 is kept (memory not binding)
    assert pre[0][PREEMPT.MODE] == Mode.KEEP and s.state_of(1) == State.KEPT
    s.add(3, 0.2, 4, 4, 50.0)
    assert s.cancel(1) == State.KEPT
    assert s.cancel(3) == State.WAITING
    assert s.cancel(2) == State.RUNNING
    assert s.num_active == 0 and s.num_running == 0 and s.num_waiting == 0
    with pytest.raises(ValueError, match="unknown request id 1"):
        s.cancel(1)
    assert s.add(1, 1.0, 4, 4, 3.0) in range(16)  # id reusable
    sched, _ = _step(s, pred, gen)
    assert [r[SCHED.ID] for r in sched] == [1]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_rejected_without_corrupting_state(impl):
    s = make_scheduler(_cfg(policy="oracle", num_gpu_blocks=20), impl)
    s.add(7, 0.0, 4, 8, 1.0, true_length=5)
    with pytest.raises(ValueError, match="already active"):
        s.add(7, 0.0, 4, 8, 1.0, true_length=5)
    with pytest.raises(ValueError, match="oracle policy needs true_length"):
        s.add(8, 0.0, 4, 8, 1.0)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(9, 0.0, 60, 60, 1.0, true_length=5)
    with pytest.raises(ValueError, match="prompt_len must be >= 1"):
        s.add(10, 0.0, 0, 8, 1.0, true_length=5)
    with pytest.raises(ValueError, match="not running"):
        s.finish(7)
    pred, gen = _arrays()
    with pytest.raises(ValueError, match="generated"):
        s.step(pred, gen.float(), 20, 0, 0.0)
    with pytest.raises(ValueError, match="max_slots=16"):
        s.step(pred[:8], gen, 20, 0, 0.0)
    with pytest.raises(ValueError, match="free block counts"):
        s.step(pred, gen, -1, 0, 0.0)
    with pytest.raises(ValueError, match="only the trail and sjf_prompt"):
        s.set_predictions(torch.zeros(1, dtype=torch.int32), torch.zeros(1))
    assert s.num_active == 1
    sched, _ = _step(s, pred, gen, free_gpu=20)
    assert [r[SCHED.ID] for r in sched] == [7]
    slot = sched[0][SCHED.SLOT]
    gen[slot] = 3
    _step(s, pred, gen, free_gpu=20)
    for bad, message in ((-3, "below last step's 3"), (2, "below last step's 3"), (9, "exceeds max_new_tokens 8")):
        gen[slot] = bad
        with pytest.raises(ValueError, match=message):
            s.step(pred, gen, 20, 0, 0.0)
    assert s.state_of(7) == State.RUNNING
    gen[slot] = 4
    assert [r[SCHED.ID] for r in _step(s, pred, gen, free_gpu=20)[0]] == [7]


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_infinite_and_negative_predictions_rejected(impl):
    s = make_scheduler(_cfg(), impl)
    pred, gen = _arrays()
    a = s.add(1, 0.0, 4, 8, 3.0)
    _step(s, pred, gen)
    for bad in (float("nan"), float("inf"), -1.0):
        pred[a] = bad
        with pytest.raises(ValueError, match="not a finite number >= 0"):
            s.step(pred, gen, 200, 100, 0.0)
        with pytest.raises(ValueError, match="not a finite number >= 0"):
            s.set_predictions(torch.tensor([a], dtype=torch.int32), torch.tensor([bad]))
        with pytest.raises(ValueError, match="not a finite number >= 0"):
            s.add(2, 0.0, 4, 8, bad)
    pred[a] = 2.0
    assert [r[SCHED.ID] for r in _step(s, pred, gen)[0]] == [1]


def test_config_validation():
    with pytest.raises(ValueError, match="policy must be one of"):
        Scheduler(SchedulerConfig(policy="srpt"))
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        Scheduler(SchedulerConfig(max_batch=8, max_tokens_per_step=4))
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        Scheduler(SchedulerConfig(num_gpu_blocks=4, watermark_blocks=4))
    assert SchedulerConfig(policy="fcfs").resolved().c == 0.0
    assert SchedulerConfig(policy="trail").resolved().c == 0.8


def test_chunked_prefill_in_key_order_and_token_budget():
    s = Scheduler(_cfg(max_batch=4, max_tokens_per_step=20, max_prefill_chunk=16))
    pred, gen = _arrays()
    s.add(1, 0.0, 30, 8, 9.0)
    s.add(2, 0.0, 30, 8, 3.0)
    sched, _ = _step(s, pred, gen)
    assert [(r[SCHED.ID], r[SCHED.TOKENS], r[SCHED.LAST_CHUNK]) for r in sched] == [(2, 16, 0), (1, 4, 0)]
    sched, _ = _step(s, pred, gen)
    got = sorted((r[SCHED.ID], r[SCHED.CTX_START], r[SCHED.TOKENS], r[SCHED.LAST_CHUNK]) for r in sched)
    assert got == [(1, 4, 6, 0), (2, 16, 14, 1)]


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_add_finish_cancel_are_all_or_nothing(impl):
    s = make_scheduler(_cfg(max_batch=4), impl)
    slots = s.add_many([10, 11, 12], [0.0, 0.1, 0.2], [4, 4, 4], [8, 8, 8], [3.0, 1.0, 2.0])
    assert slots.dtype == torch.int32 and slots.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="appears twice"):
        s.add_many([20, 20], [0.0, 0.0], [4, 4], [8, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match="already active"):
        s.add_many([21, 10], [0.0, 0.0], [4, 4], [8, 8], [1.0, 1.0])
    with pytest.raises(ValueError, match="free slots"):
        s.add_many(list(range(100, 120)), [0.0] * 20, [4] * 20, [8] * 20, [1.0] * 20)
    assert s.num_active == 3  # nothing of the bad batches was added
    pred, gen = _arrays()
    sched, _ = _step(s, pred, gen)
    assert [r[SCHED.ID] for r in sched] == [11, 12, 10]
    s.add(13, 0.3, 4, 8, 0.5)
    with pytest.raises(ValueError, match="not running"):
        s.finish_many([10, 13])
    with pytest.raises(ValueError, match="appears twice"):
        s.finish_many([10, 10])
    assert s.num_running == 3
    assert s.finish_many([12, 10]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="unknown request id 99"):
        s.cancel_many([11, 99])
    assert s.cancel_many([13, 11]).tolist() == [State.WAITING, State.RUNNING]
    assert s.num_active == 0


# ------------------------------------------------------------------------------------------------
# Memory-aware options (issue 12)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_admission_reserve_holds_back_a_request_that_would_force_an_eviction(impl):
    # bs 4; request 0 (prompt 8, predicted 40 more tokens) runs; request 1 (prompt 8, predicted 40)
    # fits now (free blocks) but not at their predicted peak: (8 + 40) * 2 tokens > 20 blocks.
    for reserve, admitted in ((0.0, True), (1.0, False), (0.2, True)):
        s = make_scheduler(_cfg(policy="sjf_prompt", c=0.0, max_batch=4, num_gpu_blocks=22, admit_reserve=reserve),
                           impl)
        s.add(0, 0.0, 8, 64, 48.0)
        pred, gen = _arrays()
        sched, _ = _step(s, pred, gen, free_gpu=22)
        assert [r[SCHED.ID] for r in sched] == [0]
        gen[sched[0][SCHED.SLOT]] = 8   # 8 tokens generated: 40 predicted to go
        s.add(1, 1.0, 8, 64, 40.0)
        sched, _ = _step(s, pred, gen, free_gpu=22 - 4, now=1.0)
        assert (1 in [r[SCHED.ID] for r in sched]) == admitted, reserve
    # with nothing running the reserve never blocks (no deadlock)
    s = make_scheduler(_cfg(policy="sjf_prompt", num_gpu_blocks=22, admit_reserve=5.0), impl)
    s.add(0, 0.0, 8, 64, 500.0)
    assert [r[SCHED.ID] for r in _step(s, *_arrays(), free_gpu=22)[0]] == [0]


@pytest.mark.parametrize("impl", IMPLS)
def test_forced_victim_by_remaining_minus_kv_and_bound(impl):
    # three running requests, memory runs out: the victim maximises (under the bound)
    # predicted remaining - w * KV tokens held
    cfg = _cfg(policy="oracle", max_batch=3, num_gpu_blocks=60, num_host_blocks=0, c=0.0, evict_kv_weight=1.0,
               max_forced_evictions=1)
    s = make_scheduler(cfg, impl)
    for rid, (prompt, true) in enumerate([(40, 60), (4, 50), (20, 30)]):
        s.add(rid, float(rid), prompt, 64, 10.0, true)
    pred, gen = _arrays()
    sched, _ = _step(s, pred, gen, free_gpu=60)
    assert sorted(r[SCHED.ID] for r in sched) == [0, 1, 2]
    for r in sched:
        gen[r[SCHED.SLOT]] = 1
    # blocks held: 10 + 1 + 5 = 16; each decode needs a block at the boundary: leave none free
    _, pre = _step(s, pred, gen, free_gpu=0, now=1.0)
    # scores: 0: 59 - 40 = 19, 1: 49 - 4 = 45, 2: 29 - 20 = 9 -> request 1 goes first
    assert pre and pre[0][PREEMPT.ID] == 1 and pre[0][PREEMPT.FORCED] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_forced_evicted_request_resumes_first_and_policy_spares_memory(impl):
    for front in (False, True):
        cfg = _cfg(policy="oracle", max_batch=4, num_gpu_blocks=40, num_host_blocks=40, c=0.0,
                   resume_forced_first=front, memory_preemption=False)
        s = make_scheduler(cfg, impl)
        s.add(0, 0.0, 16, 64, 10.0, 60)
        pred, gen = _arrays()
        sched, _ = _step(s, pred, gen, free_gpu=40)
        gen[sched[0][SCHED.SLOT]] = 1
        _, pre = _step(s, pred, gen, free_gpu=0, now=1.0)        # forced out (swap)
        assert pre[0][PREEMPT.FORCED] == 1 and pre[0][PREEMPT.MODE] == Mode.SWAP
        s.add(1, 2.0, 4, 64, 10.0, 5)                              # shorter newcomer
        sched, pre = _step(s, pred, gen, free_gpu=40, free_host=36, now=2.0)
        first = sched[0][SCHED.ID]
        assert first == (0 if front else 1) and pre == []


# ------------------------------------------------------------------------------------------------
# Rules of issue 26: aging per step, ties never preempt, the reserve only under memory pressure
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("aging", [{"aging_rate": 10.0}, {"aging_per_step": 2.0}])
def test_ties_within_the_margin_never_preempt_even_after_aging(impl, aging):
    # One running request and a newcomer with the same predicted remaining (50): aging lowers the
    # newcomer's waiting key every step, but a preemption compares raw keys, so no KEEP churn.
    s = make_scheduler(_cfg(max_batch=1, c=5.0, margin=8.0, **aging), impl)
    pred, gen = _arrays()
    a = s.add(0, 0.0, 4, 256, 50.0)
    _step(s, pred, gen)
    b = s.add(1, 0.0, 4, 256, 50.0)
    for i in range(1, 100):
        gen[a], pred[a] = i, 50.0
        sched, pre = _step(s, pred, gen, now=float(i))
        assert pre == [] and [r[SCHED.ID] for r in sched] == [0], i
    # shorter by more than the margin: it preempts (kept on the GPU)
    s.set_predictions(torch.tensor([b], dtype=torch.int32), torch.tensor([41.0]))
    gen[a] = 100
    sched, pre = _step(s, pred, gen, now=100.0)
    assert [(r[PREEMPT.ID], r[PREEMPT.MODE]) for r in pre] == [(0, Mode.KEEP)]
    assert [r[SCHED.ID] for r in sched] == [1]


@pytest.mark.parametrize("impl", IMPLS)
def test_aging_per_step_does_not_depend_on_the_step_time(impl):
    """A long request waits behind a stream of short ones; with aging_per_step it is admitted after
    the same number of steps whatever the step time (aging_rate: ~10x more steps at 10x shorter
    steps)."""
    def steps_until_long_runs(dt, **aging):
        s = make_scheduler(_cfg(max_batch=1, c=0.0, **aging), impl)
        pred, gen = _arrays()
        s.add(0, 0.0, 4, 64, 100.0)
        now = 0.0
        for k in range(400):
            s.add(k + 1, now, 4, 64, 5.0)
            sched, _ = _step(s, pred, gen, now=now)
            if any(r[SCHED.ID] == 0 for r in sched):
                return k
            for r in sched:
                s.finish(r[SCHED.ID])
            now += dt
        return None

    per_step = [steps_until_long_runs(dt, aging_per_step=5.0) for dt in (1.0, 0.1, 0.001)]
    assert per_step[0] is not None and per_step == [per_step[0]] * 3 and per_step[0] < 40
    per_s = [steps_until_long_runs(dt, aging_rate=5.0) for dt in (1.0, 0.1)]
    assert per_s[0] == per_step[0] and (per_s[1] is None or per_s[1] > 5 * per_s[0])
    assert steps_until_long_runs(1.0) is None  # no aging: starved


@pytest.mark.parametrize("impl", IMPLS)
def test_admission_reserve_applies_only_under_memory_pressure(impl):
    # The scenario of the reserve test above (22 blocks, request 1 fits now but not at the predicted
    # peak): after admitting it, 15 of 22 blocks would still be free.
    for frac, admitted in ((1.0, False), (0.9, False), (0.5, True), (0.0, True)):
        s = make_scheduler(_cfg(policy="sjf_prompt", c=0.0, max_batch=4, num_gpu_blocks=22, admit_reserve=1.0,
                                reserve_free_frac=frac), impl)
        s.add(0, 0.0, 8, 64, 48.0)
        pred, gen = _arrays()
        sched, _ = _step(s, pred, gen, free_gpu=22)
        gen[sched[0][SCHED.SLOT]] = 8
        s.add(1, 1.0, 8, 64, 40.0)
        sched, _ = _step(s, pred, gen, free_gpu=22 - 4, now=1.0)
        assert (1 in [r[SCHED.ID] for r in sched]) == admitted, frac


def test_new_rule_fields_are_validated():
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="aging_per_step"):
            Scheduler(SchedulerConfig(aging_per_step=bad))
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="reserve_free_frac"):
            Scheduler(SchedulerConfig(reserve_free_frac=bad))
    paper = SchedulerConfig(policy="trail", **TRAIL_PAPER).resolved()
    assert paper.aging_rate == paper.aging_per_step == 0.0 and paper.reserve_free_frac == 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_a_policy_victim_resumes_first_when_asked(impl):
    """resume_preempted_first: a request the policy preempted waits at the queue's front, so the
    next free slot is its own, not a shorter newcomer's (and it preempts no one while there)."""
    for front in (False, True):
        cfg = _cfg(policy="oracle", max_batch=1, c=1.0, margin=0.0, resume_preempted_first=front)
        s = make_scheduler(cfg, impl)
        pred, gen = _arrays()
        s.add(0, 0.0, 4, 64, 10.0, 60)                             # long (true 60)
        sched, _ = _step(s, pred, gen)
        slot0 = sched[0][SCHED.SLOT]
        gen[slot0] = 1
        s.add(1, 1.0, 4, 64, 10.0, 5)                              # shorter newcomer: preempts 0
        sched, pre = _step(s, pred, gen, now=1.0)
        assert [r[SCHED.ID] for r in sched] == [1] and [p[PREEMPT.ID] for p in pre] == [0]
        slot1 = sched[0][SCHED.SLOT]
        s.add(2, 2.0, 4, 64, 10.0, 3)                              # shorter still, arrives later
        gen[slot1] = 1
        sched, pre = _step(s, pred, gen, now=2.0)
        # the front victim blocks admission and preempts no one; without it, 2 preempts 1
        assert [p[PREEMPT.ID] for p in pre] == ([] if front else [1])
        if front:
            gen[slot1] = 5
            s.finish(1)
            sched, _ = _step(s, pred, gen, now=3.0)
            assert [r[SCHED.ID] for r in sched] == [0]             # the victim, not the newcomer


@pytest.mark.parametrize("impl", IMPLS)
def test_forced_evictions_by_turns_cannot_livelock(impl):
    """The case the property test found: fcfs with the forced-victim rule (max_forced_evictions 1),
    a tight pool, no host blocks, recompute only. Without the progress anchor (the running request
    holding the most KV is spared while another runs) three requests evicted one another forever."""
    cfg = SchedulerConfig(policy="fcfs", max_slots=64, max_batch=3, max_tokens_per_step=7, block_size=1,
                          num_gpu_blocks=128, num_host_blocks=0, watermark_blocks=0, margin=0.0, max_preemptions=0,
                          allow_keep=False, allow_swap=False, bytes_per_token=1000.0, pcie_gbps=10.0,
                          recompute_s_per_token=0.0, aging_rate=0.0, aging_per_step=3.0, admit_reserve=0.0,
                          max_forced_evictions=1, evict_kv_weight=0.0, resume_forced_first=False,
                          resume_preempted_first=False, memory_preemption=True)
    sim = _run(make_scheduler(cfg, impl), cfg, 5, n_arrival_steps=29, arrival_p=3.0, cancel_p=0.05)
    assert len(sim.finished) + len(sim.cancelled) == sim.next_id
