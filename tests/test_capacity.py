"""Capacity at an SLO (bench/capacity.py): the SLO test at its edge, the bisection on synthetic
curves (known threshold within 2%, honest when the budget runs out or the curve is not monotone),
solo latencies equal to one-request simulations, the engine-side solo fit, and a small simulated
capacity run on common arrivals."""
import dataclasses
import math

import numpy as np
import pytest

from bench import capacity
from trail import sim


@pytest.fixture(scope="module")
def sim_setup():
    pool = sim.load_recorded()
    # the mechanics, on a fixed fit (the benchmark's: the searches below converge within their budget on it)
    return pool, sim.StepTimeModel.from_json(sim.DATA_DIR / "step_fit_engine_llama3-8b.json"), sim.llama3_8b_kv_spec()


def step_curve(threshold):
    return lambda rate: 1.0 if rate <= threshold else 0.5


# ------------------------------------------------------------------------------------------------
# The SLO
# ------------------------------------------------------------------------------------------------
def test_meets_slo_at_and_around_the_factor():
    solo = np.array([0.75, 0.75, 0.75, 1.0])
    latency = np.array([1.5, np.nextafter(1.5, 2.0), 0.3, 3.0])
    assert capacity.meets_slo(latency, solo).tolist() == [True, False, True, False]
    assert capacity.meets_slo(latency, solo, factor=3.0).tolist() == [True, True, True, True]
    assert capacity.slo_attainment(latency, solo) == 0.5
    assert math.isnan(capacity.slo_attainment([], []))
    with pytest.raises(ValueError):
        capacity.meets_slo([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------------------
# The bisection
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold, lo, hi", [(13.7, 1.0, 2.0), (0.37, 5.0, 10.0), (30.0, 20.0, 40.0)])
def test_search_finds_a_step_threshold_within_rel_tol(threshold, lo, hi):
    out = capacity.capacity_search(step_curve(threshold), lo, hi, target=0.9, rel_tol=0.02, max_evals=12)
    assert out["bracketed"] and out["converged"] and out["monotone"]
    assert threshold / 1.02 <= out["capacity"] <= threshold < out["hi"] <= out["capacity"] * 1.02
    assert len(out["evaluations"]) <= 12
    assert all(e["passed"] == (e["rate"] <= threshold) for e in out["evaluations"])


def test_search_finds_the_crossing_of_a_smooth_curve():
    curve = lambda rate: 1.0 / (1.0 + (rate / 10.0) ** 4)      # noqa: E731
    crossing = 10.0 * (1.0 / 9.0) ** 0.25                         # where it equals 0.9
    out = capacity.capacity_search(curve, 1.0, 2.0)
    assert out["converged"] and crossing / 1.02 <= out["capacity"] <= crossing


def test_search_says_when_the_budget_ran_out():
    short = capacity.capacity_search(step_curve(13.7), 1.0, 2.0, max_evals=3)
    assert len(short["evaluations"]) == 3
    assert not short["bracketed"] and not short["converged"]
    assert short["capacity"] == 4.0 and short["hi"] is None
    partial = capacity.capacity_search(step_curve(13.7), 1.0, 2.0, max_evals=7)
    assert partial["bracketed"] and not partial["converged"]
    assert partial["hi"] / partial["capacity"] > 1.02
    nothing_passes = capacity.capacity_search(lambda rate: 0.0, 1.0, 2.0, max_evals=4)
    assert nothing_passes["capacity"] is None and not nothing_passes["bracketed"]


def test_search_flags_attainment_that_rises_with_the_rate():
    curve = lambda rate: 0.0 if rate > 10 else (0.95 if rate >= 3 else 0.92)   # noqa: E731
    out = capacity.capacity_search(curve, 1.0, 2.0)
    assert not out["monotone"]
    assert (2.0, 4.0) in out["violations"]
    assert capacity.capacity_search(step_curve(10.0), 1.0, 2.0)["violations"] == []


# ------------------------------------------------------------------------------------------------
# Solo latency
# ------------------------------------------------------------------------------------------------
def one_request_latency(prompt_len, output_len, max_new, engine, spec, step_model):
    res = sim.simulate(capacity.one_request_trace(prompt_len, output_len, max_new), engine, spec, step_model)
    return float(res.finish[0] - res.arrival[0])


def test_sim_solo_latency_equals_a_one_request_simulation(sim_setup):
    pool, step_model, spec = sim_setup
    engine = sim.regime_engine("kv", pool)
    trace = sim.make_trace(pool, capacity.unit_rate_arrivals(40, 3), "recorded", seed=3)
    solo = capacity.sim_solo_latency(trace, engine, spec, step_model)
    expected = [one_request_latency(int(p), int(o), int(m), engine, spec, step_model)
                for p, o, m in zip(trace.prompt_len, trace.output_len, trace.max_new)]
    np.testing.assert_allclose(solo, expected, rtol=1e-12)


def test_solo_latency_with_chunked_prefill(sim_setup):
    pool, step_model, spec = sim_setup
    engine = dataclasses.replace(sim.regime_engine("ample", pool), max_tokens_per_step=64)
    prompt, output = np.array([300, 300, 300, 45]), np.array([7, 1, 20, 3])
    solo = capacity.solo_latency_by_lengths(prompt, output, np.full(4, 512), engine, spec, step_model)
    expected = [one_request_latency(int(p), int(o), 512, engine, spec, step_model) for p, o in zip(prompt, output)]
    np.testing.assert_allclose(solo, expected, rtol=1e-12)


def test_engine_solo_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    prompt, output = rng.integers(10, 500, 16), rng.integers(5, 500, 16)
    truth = 0.02 + 3e-5 * prompt + 7e-3 * output
    fit = capacity.engine_solo_model(prompt, output, truth + rng.normal(0, 0.005, 16))   # 5 ms jitter
    assert fit["n"] == 16
    assert fit["c_s_per_output_token"] == pytest.approx(7e-3, rel=0.03)
    assert 0.002 < fit["residual_rms_s"] < 0.01
    np.testing.assert_allclose(capacity.solo_latency_from_fit(fit, prompt, output), truth, atol=0.01)
    with pytest.raises(ValueError):
        capacity.engine_solo_model(prompt, np.full(16, 100), truth)


# ------------------------------------------------------------------------------------------------
# Capacity in the simulator
# ------------------------------------------------------------------------------------------------
def test_sim_capacity_on_common_arrivals(sim_setup):
    pool, step_model, spec = sim_setup
    out = capacity.sim_capacity(pool, "ample", ["fcfs", "fcfs_repeat", "oracle"], step_model, spec, n=150,
                                seeds=(0,))
    fcfs, repeat, oracle = (out["policies"][k] for k in ("fcfs", "fcfs_repeat", "oracle"))
    assert fcfs["search"]["converged"] and oracle["search"]["converged"]
    assert fcfs["capacity_rps"] > 0 and fcfs["x_fcfs_capacity"] == 1.0
    # fcfs on its own engine again: the same requests and arrivals give the same evaluations
    assert repeat["search"]["evaluations"] == fcfs["search"]["evaluations"]
    # shortest remaining first on true lengths serves at least fcfs's load at a latency-ratio SLO
    assert oracle["capacity_rps"] >= fcfs["capacity_rps"]
    assert oracle["x_fcfs_saturation"] == pytest.approx(oracle["capacity_rps"] / out["fcfs_saturation_rps"])
