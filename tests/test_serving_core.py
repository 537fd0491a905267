"""The serving core is the one place a plan is applied (issue 22 item 1):
- during an engine run with preemptions and swaps, the KV cache's allocate / free / swap calls
  come only from `trail.serving_core` (the cache's own internals aside);
- the same workload through the engine (CPU, a real model) and through the simulator (a host-only
  ledger) gives identical plans, step by step;
- the ledger check catches a slot whose blocks differ from its row's BLOCKS."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.kv_cache import KVCache
from trail.models import random_model
from trail.request import SamplingParams
from trail.scheduler_types import TRAIL_PAPER
from trail.serving_core import LedgerMismatch, ServingCore
from trail.sim import SimTrace, StepTimeModel, simulate

N_REQ = 12
RATE = 50.0        # prefill tokens/s: the recompute cost both sides see


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=3, std=0.3)


def _config(policy: str) -> EngineConfig:
    # 12 blocks of 4 tokens for up to 4 requests of up to 7 blocks: memory forces evictions
    return EngineConfig(policy=policy, max_batch=4, max_slots=32, max_model_len=28, block_size=4,
                        num_gpu_blocks=12, num_host_blocks=16, prefill_tokens_per_s=RATE, overlap=False,
                        enforce_eager=True, policy_options=dict(TRAIL_PAPER) if policy != "fcfs" else {})


def _workload():
    rng = np.random.default_rng(5)
    prompt_len = rng.integers(3, 12, N_REQ)
    out_len = rng.integers(2, 17, N_REQ)
    prompts = [rng.integers(8, 500, int(n)).tolist() for n in prompt_len]
    return prompts, out_len


_REAL_SCHEDULE = ServingCore.schedule


def _recorder(plans: list):
    real = _REAL_SCHEDULE

    def schedule(self, predictions, generated, now):
        plan = real(self, predictions, generated, now)
        plans.append((plan.rows.copy(), plan.preempted.copy()))
        return plan
    return schedule


@pytest.mark.parametrize("policy", ["fcfs", "oracle"])
def test_engine_and_simulator_give_identical_plans(model, policy, monkeypatch):
    prompts, out_len = _workload()
    engine_plans, sim_plans = [], []
    monkeypatch.setattr(ServingCore, "schedule", _recorder(engine_plans))
    engine = LLMEngine(model, None, _config(policy))
    for i, (p, n) in enumerate(zip(prompts, out_len)):
        engine.add_request(p, SamplingParams(max_new_tokens=16, replay_length=int(n)), request_id=i, arrival=0.0)
    while engine.has_unfinished():
        engine.step()
    engine.check_idle()

    monkeypatch.setattr(ServingCore, "schedule", _recorder(sim_plans))
    trace = SimTrace(np.zeros(N_REQ), np.array([len(p) for p in prompts], np.int64), out_len.astype(np.int64),
                     np.full(N_REQ, 16, np.int64), np.zeros(N_REQ), np.concatenate([[0], np.cumsum(out_len)]),
                     np.zeros(int(out_len.sum()), np.float32), "exact")
    step_model = StepTimeModel(base_s=1e-3, per_decode_s=0.0, per_prefill_token_s=1.0 / RATE, per_ctx_token_s=0.0)
    result = simulate(trace, _config(policy), engine.kv_spec, step_model)
    assert result.steps == len(sim_plans)

    assert len(engine_plans) == len(sim_plans)
    preempted = 0
    for k, ((er, ep), (sr, sp)) in enumerate(zip(engine_plans, sim_plans)):
        assert np.array_equal(er, sr), f"step {k}: scheduled rows differ\n{er}\n{sr}"
        assert np.array_equal(ep, sp), f"step {k}: preempted rows differ\n{ep}\n{sp}"
        preempted += len(ep)
    assert preempted > 0, "the workload never preempted: it does not test plan application"


def test_kv_is_allocated_freed_and_swapped_only_by_the_core(model, monkeypatch):
    """Every call of the cache's ledger methods during a run with swaps comes from the core."""
    callers = []
    for name in ("allocate", "allocate_many", "grow_to", "free", "swap_out", "swap_in", "discard", "share_prefix",
                 "assign_tables"):
        real = getattr(KVCache, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            callers.append((_name, sys._getframe(1).f_globals.get("__name__")))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(KVCache, name, spy)
    config = EngineConfig(policy="fcfs", max_batch=4, max_slots=32, max_model_len=28, block_size=4,
                          num_gpu_blocks=8, num_host_blocks=32, prefill_tokens_per_s=1.0, enforce_eager=True)
    engine = LLMEngine(model, None, config)
    prompts, out_len = _workload()
    engine.generate(prompts, [SamplingParams(max_new_tokens=16, replay_length=int(n)) for n in out_len],
                    progress=False)
    engine.check_idle()
    names = {n for n, _ in callers}
    assert {"grow_to", "free", "swap_out", "swap_in"} <= names, names
    outside = {(n, m) for n, m in callers if m not in ("trail.serving_core", "trail.kv_cache")}
    assert not outside, f"KV ledger calls from outside the core: {sorted(outside)}"


def test_the_ledger_check_catches_a_slot_that_differs_from_its_row(model):
    engine = LLMEngine(model, None, _config("fcfs"))
    engine.core.check_ledger = True
    engine.add_request([11, 12, 13, 14, 15], SamplingParams(max_new_tokens=8, ignore_eos=True), request_id=0)
    engine.step()
    engine.step()
    slot = engine._requests[0].slot
    engine.kv.grow_to(np.array([slot]), np.array([engine.kv.mapped_blocks(np.array([slot]))[0] + 1]))
    with pytest.raises(LedgerMismatch, match=f"slots \\[{slot}\\]"):
        engine.core.check(np.array([[0, slot, 0, 1, 6, 2, 0, 0, 16]], np.int64))


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_telemetry_counts_every_preemption_of_every_plan(model, overlap, monkeypatch):
    """Telemetry's keep / swap / recompute totals equal the preemptions of the plans the core
    applied, plans that ran nothing included: with overlap, a plan's only rows may belong to
    requests finishing in the step in flight (this workload has such plans with preemptions)."""
    plans = []
    monkeypatch.setattr(ServingCore, "schedule", _recorder(plans))
    config = EngineConfig(policy="oracle", max_batch=2, max_slots=64, max_model_len=28, block_size=4,
                          num_gpu_blocks=7, num_host_blocks=16, prefill_tokens_per_s=1e4, overlap=overlap,
                          enforce_eager=True, policy_options=dict(TRAIL_PAPER))
    engine = LLMEngine(model, None, config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, 500, int(k)).tolist() for k in rng.integers(3, 12, 30)]
    out_len = [int(k) for k in rng.integers(1, 17, 30)]
    engine.generate(prompts, [SamplingParams(max_new_tokens=16, replay_length=n) for n in out_len],
                    true_lengths=out_len, progress=False)
    engine.check_idle()
    preempted = np.concatenate([p for _, p in plans])
    totals = engine.telemetry.totals()
    assert len(preempted) > 0
    assert totals["keep"] + totals["swap"] + totals["recompute"] == len(preempted), (totals, len(preempted))
