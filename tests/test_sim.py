"""The simulator (trail.sim): hand-computed schedules with zero step-time noise (FCFS, SJF, SRPT
with preemption), the JSON round trip, and a small run per memory regime where nothing is lost."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trail import sim
from trail.engine_config import EngineConfig
from trail.kv_cache_spec import KVCacheSpec
from trail.scheduler_types import TRAIL_PAPER

UNIT = sim.StepTimeModel(base_s=1.0, per_decode_s=0.0, per_prefill_token_s=0.0, per_ctx_token_s=0.0)
SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, block_size=4)


def _trace(arrival, lengths, prompt=4, max_new=16):
    L = np.asarray(lengths, np.int64)
    cu = np.zeros(len(L) + 1, np.int64)
    cu[1:] = np.cumsum(L)
    pred = np.concatenate([np.arange(x, 0, -1) for x in L]).astype(np.float32)  # exact remaining at g
    return sim.SimTrace(np.asarray(arrival, np.float64), np.full(len(L), prompt, np.int64), L,
                        np.full(len(L), max_new, np.int64), L.astype(np.float64), cu, pred, "exact")


def _engine(policy, **opts):
    return EngineConfig(policy=policy, policy_options=opts, max_batch=1, max_slots=8, max_tokens_per_step=64,
                        max_model_len=32, block_size=4, num_gpu_blocks=64, num_host_blocks=0)


def _run(trace, policy, **opts):
    return sim.simulate(trace, _engine(policy, **opts), SPEC, UNIT)


def test_fcfs_by_hand():
    # one step = 1 s; batch of one; a request of L tokens takes L steps (prefill samples the first)
    res = _run(_trace([0, 0, 0], [3, 1, 2]), "fcfs")
    assert res.finish.tolist() == [3, 4, 6]
    assert res.first_token.tolist() == [1, 4, 5]
    m = res.metrics()
    assert m["mean_latency"] == pytest.approx(13 / 3) and m["preemptions_total"] == 0


def test_sjf_by_hand_without_preemption():
    res = _run(_trace([0, 0, 0], [3, 1, 2]), "oracle", **dict(TRAIL_PAPER, c=0.0))
    assert res.finish.tolist() == [6, 1, 3]


def test_srpt_preempts_by_hand():
    tr = _trace([0.0, 1.5], [4, 1])
    fc = _run(tr, "fcfs")
    assert fc.finish.tolist() == [4, 5]          # 1 waits for 0
    # oracle, c = 1: at t = 2 request 0 has 2 tokens left, the newcomer 1: it is kept and resumes
    sr = _run(tr, "oracle", **dict(TRAIL_PAPER, c=1.0))
    assert sr.finish.tolist() == [5, 3]
    assert sr.preempt["policy_keep"] == 1 and sr.recomputed_tokens == 0
    # a margin of 2 tokens: the advantage (2 - 1) is not worth it, no preemption
    mg = _run(tr, "oracle", **dict(TRAIL_PAPER, c=1.0, margin=2.0))
    assert mg.finish.tolist() == [4, 5] and mg.preempt["policy_keep"] == 0


def test_trail_uses_per_step_predictions():
    # prompt-time predictions say 0 is short; after its prefill the filter says it is long
    tr = _trace([0.0, 1.5], [4, 1])
    tr.prompt_pred[:] = [1.0, 1.0]
    res = _run(tr, "trail", **dict(TRAIL_PAPER, c=1.0))
    assert res.finish.tolist() == [5, 3]   # as SRPT: the per-step prediction (exact) reorders


@pytest.fixture(scope="module")
def pool():
    return sim.load_recorded()


@pytest.mark.parametrize("regime", ["ample", "kv"])
def test_small_run_per_regime_loses_nothing(pool, regime):
    eng = sim.regime_engine(regime, pool)
    sm = sim.default_step_model()
    spec = sim.llama3_8b_kv_spec()
    tr = sim.make_trace(pool, sim.poisson_arrivals(300, 9.0, 0), "recorded", seed=0)
    for pol in ("fcfs", "trail"):
        res = sim.simulate(tr, eng.with_policy(pol), spec, sm)
        assert np.isfinite(res.finish).all() and (res.finish >= res.first_token).all()
        assert (res.first_token > res.arrival).all()
        if regime == "ample":
            assert res.metrics()["preemptions"]["forced_swap"] == 0


def test_json_round_trip_gives_the_same_run(pool):
    eng = sim.regime_engine("kv", pool)
    tr = sim.make_trace(pool, sim.poisson_arrivals(100, 8.0, 1), "noisy:0.5", seed=1)
    inp = sim.SimInput(tr, eng.with_policy("trail"), sim.llama3_8b_kv_spec(), sim.default_step_model())
    back = sim.SimInput.from_json(json.loads(json.dumps(inp.to_json())))
    a = sim.simulate(inp.trace, inp.engine, inp.spec, inp.step_model)
    b = sim.simulate(back.trace, back.engine, back.spec, back.step_model)
    assert np.allclose(a.finish, b.finish, rtol=1e-6)


def test_compare_reports_ratios_and_oracle_fraction():
    def m(mean):
        return {"mean_latency": mean, "p50_latency": mean, "p99_latency": 2 * mean, "mean_ttft": 1.0,
                "throughput_rps": 1.0, "recomputed_tokens": 0, "swapped_bytes": 0.0, "preemptions_total": 0,
                "max_preemptions_of_one": 0, "preemptions": {"policy_keep": 0}}
    c = sim.compare({"fcfs": [m(10.0)], "sjf_prompt": [m(9.0)], "trail": [m(8.0)], "oracle": [m(6.0)]})
    assert c["trail"]["mean_latency_vs_fcfs"] == pytest.approx(0.8)
    assert c["trail"]["oracle_fraction"] == pytest.approx(0.5)
    assert c["trail"]["mean_latency_vs_sjf_prompt"] == pytest.approx(8 / 9)
    c = sim.compare({"fcfs": [m(10.0)], "trail": [m(9.8)], "oracle": [m(9.5)]})   # oracle gains 5%
    assert np.isnan(c["trail"]["oracle_fraction"])


def test_control_variants_run_and_mean_what_they_say(pool):
    """bench.common's controls: sjf_prompt with trail's memory rules carries exactly those options;
    oracle SRPT (true lengths, free preemption) preempts whenever a shorter request arrives, and
    its mean latency is at most the oracle's with trail's rules (it is the upper anchor)."""
    from bench.common import MEMORY_RULES, VARIANTS, sim_policies
    from trail.scheduler_types import POLICY_DEFAULTS

    pol, opts = VARIANTS["sjf_prompt_memrules"]
    assert pol == "sjf_prompt" and opts == {k: POLICY_DEFAULTS["trail"][k] for k in MEMORY_RULES}
    # by hand: one slot, a long request running, a short one arriving: SRPT preempts at once
    tr = _trace([0.0, 1.5], [6, 1])
    srpt = sim.simulate(tr, _engine(*VARIANTS["oracle_srpt"][:1], **VARIANTS["oracle_srpt"][1]), SPEC, UNIT)
    assert srpt.finish[1] < srpt.finish[0]
    eng = sim.regime_engine("ample", pool)
    res = sim.run_policies(pool, eng, sim.llama3_8b_kv_spec(), sim.default_step_model(),
                           lambda n, seed: sim.poisson_arrivals(n, 14.0, seed), [0],
                           sim_policies(["oracle", "oracle_srpt", "sjf_prompt_memrules"]), predictions="exact", n=400)
    mean = {k: v[0]["mean_latency"] for k, v in res.items()}
    assert mean["oracle_srpt"] <= mean["oracle"] * 1.02, mean
