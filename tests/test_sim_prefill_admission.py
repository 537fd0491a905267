"""Admission by the prefill probe in the simulator (trail.sim_admission, issue 26 item 1): the free
mode is the earlier ablation exactly, the probe's cost reaches the clock, and the kept-KV mode pays
each prompt once and returns every block."""
import dataclasses

import numpy as np
import pytest

from trail import sim
from trail.sim_admission import ProbeAdmission

POOL = sim.load_recorded()
SPEC = sim.llama3_8b_kv_spec()
# the engine-calibrated fit without its mixed-step term: a probe's cost is then exactly per token
SM = dataclasses.replace(sim.StepTimeModel.from_json(sim.DATA_DIR / "step_fit_engine_llama3-8b.json"),
                         mixed_base_s=0.0)


def _run(tr, eng, adm=None, **kw):
    return sim.simulate(tr, eng.with_policy("trail"), SPEC, SM, admission=adm, **kw)


def test_free_mode_equals_the_trace_with_probe_totals():
    eng = sim.regime_engine("kv", POOL)
    tr = sim.make_trace(POOL, sim.poisson_arrivals(200, 40.0, 3), "recorded", seed=3)
    swapped = dataclasses.replace(tr, prompt_pred=tr.pred[tr.pred_cu[:-1]].astype(np.float64))
    a, b = _run(swapped, eng), _run(tr, eng, ProbeAdmission("free"))
    np.testing.assert_array_equal(a.finish, b.finish)
    np.testing.assert_array_equal(a.first_token, b.first_token)
    assert not np.array_equal(a.finish, _run(tr, eng).finish)     # the key did change something


def test_probe_cost_is_charged_per_prompt_token():
    eng = sim.regime_engine("ample", POOL, max_batch=8)
    tr = sim.make_trace(POOL, np.zeros(60), "recorded", seed=1)
    free = ProbeAdmission("probe", probe_frac=0.0, budget=float("inf"))
    paid = ProbeAdmission("probe", probe_frac=0.5, budget=float("inf"))
    r0, r1 = _run(tr, eng, free, record_steps=True), _run(tr, eng, paid)
    s0, s1 = r0.config["admission"], r1.config["admission"]
    first_rows = int(r0.step_log[0, sim.STEP_LOG_FIELDS.index("rows")])
    assert s0["probed_requests"] == s1["probed_requests"] == 60 - first_rows > 0     # all probed in step 1
    assert s1["probe_tokens"] == s0["probe_tokens"] > 0
    assert r0.steps == r1.steps                                  # same decisions, only the clock moves
    expected = 0.5 * SM.per_prefill_token_s * s1["probe_tokens"]
    assert r1.finish.max() - r0.finish.max() == pytest.approx(expected, rel=1e-9)
    assert expected > 0.01


def test_kept_kv_pays_each_prompt_once_when_memory_is_ample():
    eng = sim.regime_engine("ample", POOL, max_batch=8)
    tr = sim.make_trace(POOL, np.zeros(60), "recorded", seed=2)
    adm = ProbeAdmission("kv", budget=float("inf"))
    res = _run(tr, eng, adm, record_steps=True)
    st = res.config["admission"]
    assert st["cache_evictions"] == 0 and st["cache_hits"] == st["probed_requests"] > 0
    assert st["skipped_prefill_tokens"] == st["probe_tokens"]
    charged = res.step_log[:, sim.STEP_LOG_FIELDS.index("prefill_tokens")].sum()
    assert charged - res.recomputed_tokens == tr.prompt_len.sum()


def test_kept_kv_is_evicted_under_memory_pressure_and_every_block_returns():
    eng = sim.regime_engine("kv", POOL, kv_requests=6.0)
    tr = sim.make_trace(POOL, np.zeros(80), "recorded", seed=4)
    adm = ProbeAdmission("kv")
    res = _run(tr, eng, adm)
    st = res.config["admission"]
    assert np.isfinite(res.finish).all()
    assert st["cache_evictions"] > 0
    assert adm.ledger.cached_blocks == 0 and not adm.ledger.cache
    assert adm.ledger.actually_free == eng.num_gpu_blocks


def test_rejects_policies_without_prediction_keys():
    eng = sim.regime_engine("ample", POOL)
    tr = sim.make_trace(POOL, np.zeros(5), "recorded", seed=0)
    with pytest.raises(ValueError, match="trail or sjf_prompt"):
        sim.simulate(tr, eng.with_policy("fcfs"), SPEC, SM, admission=ProbeAdmission("probe"))
