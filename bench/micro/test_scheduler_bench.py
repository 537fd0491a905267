"""Scheduler micro-benchmarks: trail's C++ core (`native`) against the same step in Python over
lazy-deletion heapq queues (`heapq`, bench/micro/heapq_scheduler.py), side by side.

- step_realistic: 4,096 waiting (keys unchanged: no new predictions), 512 running with new
  predictions every step; nothing is admitted or preempted (the steady decode state).
- step_all_keys: the same, plus new predictions for all 4,096 waiting requests every step.
- push / update / pop / remove: add 4,096 requests; new keys for 4,096; one step that admits
  512 of 4,096 (pops); cancel 4,096 (removal by id).
The policy is trail with its defaults (scheduler_types.POLICY_DEFAULTS: the rules of 2026-12-07,
aging per step waited, preemption on raw keys, the admission reserve under memory pressure).
Both implementations are driven through identical sequences first and must make the same
decisions (cross-check), then timed. Run:
    pytest bench/micro -k scheduler --benchmark-enable [--benchmark-json=out.json]
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from heapq_scheduler import HeapqScheduler

from trail.scheduler import SCHED, Scheduler, SchedulerConfig

N_WAITING, N_RUNNING = 4096, 512
MAX_SLOTS = 8192
N_PRED_SETS = 8
IMPLS = {"native": Scheduler, "heapq": HeapqScheduler}


def _config(max_batch=N_RUNNING) -> SchedulerConfig:
    return SchedulerConfig(policy="trail", max_slots=MAX_SLOTS, max_batch=max_batch, max_tokens_per_step=1 << 16,
                           block_size=16, num_gpu_blocks=1 << 30, num_host_blocks=1 << 20, c=0.8, margin=8.0,
                           bytes_per_token=131072.0, pcie_gbps=50.0, recompute_s_per_token=30e-6)


class Steady:
    """512 running (decoding) + 4,096 waiting whose keys never beat the running ones: a step
    decodes all 512 and admits / preempts nothing, so it can be repeated."""

    def __init__(self, impl: str):
        rng = np.random.default_rng(0)
        self.s = IMPLS[impl](_config())
        self.pred = torch.zeros(MAX_SLOTS, dtype=torch.float32)
        self.gen = torch.zeros(MAX_SLOTS, dtype=torch.int32)
        run_slots = [self.s.add(i, 0.0, 64, 4096, float(rng.uniform(0, 400))) for i in range(N_RUNNING)]
        out = self.s.step(self.pred, self.gen, 1 << 30, 1 << 20, 0.0)  # prefill all 512 in one step
        assert out.scheduled.shape[0] == N_RUNNING
        self.run_slots = torch.tensor(run_slots, dtype=torch.long)
        self.gen[self.run_slots] = 1
        self.wait_slots = torch.tensor(
            [self.s.add(N_RUNNING + i, 1.0, 64, 4096, float(rng.uniform(1000, 4000))) for i in range(N_WAITING)],
            dtype=torch.int32)
        # distinct prediction vectors for the running slots, cycled: keys move every step
        self.pred_sets = []
        for _ in range(N_PRED_SETS):
            p = torch.zeros(MAX_SLOTS, dtype=torch.float32)
            p[self.run_slots] = torch.from_numpy(rng.uniform(100, 900, N_RUNNING).astype(np.float32))
            self.pred_sets.append(p)
        self.wait_sets = [torch.from_numpy(rng.uniform(1000, 4000, N_WAITING).astype(np.float32))
                          for _ in range(N_PRED_SETS)]
        self.i = 0
        self.now = 1.0

    def step(self, all_keys: bool = False):
        k = self.i % N_PRED_SETS
        self.i += 1
        self.now += 0.01
        if all_keys:
            self.s.set_predictions(self.wait_slots, self.wait_sets[k])
        return self.s.step(self.pred_sets[k], self.gen, 1 << 30, 1 << 20, self.now)


def _same(a, b) -> None:
    by_id = lambda t: t[t[:, SCHED.ID].argsort()]  # noqa: E731
    assert torch.equal(by_id(a.scheduled), by_id(b.scheduled))
    assert torch.equal(a.preempted, b.preempted) and a.stop_reason == b.stop_reason


@pytest.fixture(scope="module")
def cross_checked():
    """Both implementations through the same 24 steps (realistic and all-keys): same decisions."""
    states = {impl: Steady(impl) for impl in IMPLS}
    for i in range(24):
        outs = [states[impl].step(all_keys=i % 2 == 1) for impl in IMPLS]
        _same(*outs)
        assert outs[0].scheduled.shape[0] == N_RUNNING and outs[0].preempted.shape[0] == 0
    return True


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scheduler_step_realistic(benchmark, impl, cross_checked):
    st = Steady(impl)
    benchmark.group = "scheduler step: 4096 waiting (unchanged) + 512 running (new predictions)"
    out = benchmark(st.step)
    assert out.scheduled.shape[0] == N_RUNNING


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scheduler_step_all_keys_changed(benchmark, impl, cross_checked):
    st = Steady(impl)
    benchmark.group = "scheduler step: all 4608 keys changed"
    out = benchmark(st.step, True)
    assert out.scheduled.shape[0] == N_RUNNING


def _fresh_waiting(impl, n=N_WAITING, max_batch=N_RUNNING, batched=False):
    rng = np.random.default_rng(1)
    s = IMPLS[impl](_config(max_batch))
    preds = rng.uniform(0, 1000, n)
    if batched:
        s.add_many(np.arange(n), np.arange(n, dtype=np.float64), np.full(n, 16), np.full(n, 64), preds)
    else:
        for i in range(n):
            s.add(i, float(i), 16, 64, float(preds[i]))
    return s


# native: one Python call per request; native_batched: one add_many / cancel_many call for all.
PER_REQUEST = ["native", "native_batched", "heapq"]


@pytest.mark.parametrize("impl", PER_REQUEST)
def test_scheduler_push(benchmark, impl):
    """Add 4096 requests to an empty scheduler."""
    benchmark.group = "scheduler push: add 4096 requests"
    benchmark.pedantic(_fresh_waiting, args=(impl.split("_")[0],), kwargs={"batched": impl.endswith("batched")},
                       rounds=5, iterations=1)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scheduler_update(benchmark, impl):
    """New keys for 4096 waiting requests, one batched call."""
    s = _fresh_waiting(impl)
    slots = torch.arange(N_WAITING, dtype=torch.int32)
    sets = [torch.rand(N_WAITING) * 1000 for _ in range(N_PRED_SETS)]
    it = iter(range(1 << 30))
    benchmark.group = "scheduler update: 4096 keys"
    benchmark(lambda: s.set_predictions(slots, sets[next(it) % N_PRED_SETS]))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scheduler_pop(benchmark, impl):
    """One step that admits (pops) the 512 shortest of 4096 waiting requests."""
    pred = torch.zeros(MAX_SLOTS, dtype=torch.float32)
    gen = torch.zeros(MAX_SLOTS, dtype=torch.int32)
    benchmark.group = "scheduler pop: admit 512 of 4096"

    def run(s):
        out = s.step(pred, gen, 1 << 30, 1 << 20, 1e4)
        assert out.scheduled.shape[0] == N_RUNNING

    benchmark.pedantic(run, setup=lambda: ((_fresh_waiting(impl),), {}), rounds=5, iterations=1)


@pytest.mark.parametrize("impl", PER_REQUEST)
def test_scheduler_remove(benchmark, impl):
    """Cancel 4096 waiting requests by id, in arrival order."""
    benchmark.group = "scheduler remove: cancel 4096 requests"
    ids = torch.arange(N_WAITING)

    def run(s):
        if impl.endswith("batched"):
            s.cancel_many(ids)
        else:
            for i in range(N_WAITING):
                s.cancel(i)
        assert s.num_active == 0

    benchmark.pedantic(run, setup=lambda: ((_fresh_waiting(impl.split("_")[0], batched=True),), {}),
                       rounds=5, iterations=1)
