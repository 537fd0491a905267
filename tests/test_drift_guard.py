"""The drift guard (trail.drift_guard): the probe's online error against the prompt predictor's
over the last finished requests; while the probe is worse, ranking falls back to the prompt
prediction, and the telemetry records the switch."""
import numpy as np
import pytest
import torch

from trail.drift_guard import DriftGuard, request_errors
from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models import random_model
from trail.request import RequestMetrics, SamplingParams
from trail_kernels.probe_params import ProbeParams


def _metrics(prompt, preds):
    return RequestMetrics(0.0, prompt_prediction=prompt, predictions=list(preds))


def test_request_errors_by_hand():
    # final length 10; the probe said 9 after 0 fed, 4 after 5 fed; the prompt predictor 12 in all
    m = _metrics(12.0, [(0, 9.0), (5, 4.0)])
    probe, prompt = request_errors(m, 10)
    assert probe == pytest.approx((1 + 1) / 2)
    assert prompt == pytest.approx((abs(12 - 10) + abs(7 - 5)) / 2)
    assert request_errors(_metrics(12.0, []), 10) is None
    assert request_errors(_metrics(None, [(0, 1.0)]), 10) is None


def test_switches_on_when_the_probe_is_worse_and_back_when_it_is_better():
    events = []
    guard = DriftGuard(window=4, min_requests=4, margin=0.1, events=events)
    bad, good = _metrics(10.0, [(0, 30.0)]), _metrics(10.0, [(0, 10.0)])   # final 10: prompt exact
    for i in range(3):
        assert guard.add(bad, 10, float(i)) is False            # fewer than min_requests: no decision
    assert guard.add(bad, 10, 3.0) is True
    assert events == [(3.0, True, 20.0, 0.0)]
    # the prompt predictor is off by 5 on the next ones, the probe exact: the window turns
    off = _metrics(15.0, [(0, 10.0)])
    states = [guard.add(off, 10, 4.0 + i) for i in range(4)]
    assert states[-1] is False and events[-1][1] is False and len(events) == 2
    assert DriftGuard(window=0).add(bad, 10, 0.0) is False     # off


def test_margin_keeps_the_guard_from_flapping():
    close = _metrics(11.0, [(0, 11.1)])      # final 10: probe error 1.1, prompt error 1.0
    wide, tight = DriftGuard(window=2, min_requests=2, margin=0.2), DriftGuard(window=2, min_requests=2, margin=0.05)
    assert [wide.add(close, 10, t) for t in (0.0, 1.0)] == [False, False]      # within 20%
    assert [tight.add(close, 10, t) for t in (0.0, 1.0)] == [False, True]      # beyond 5%


@pytest.fixture(scope="module")
def tiny():
    model = random_model("tiny", seed=3)
    probe = ProbeParams.random(model.config.hidden_size, 32, 8, max_len=64, generator=torch.Generator().manual_seed(0))
    return model, probe


def _serve(tiny, drift_window: int):
    """Requests with replayed lengths; the prompt predictor knows each length exactly, the random
    probe does not: the guard must prefer the prompt predictor."""
    model, probe = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, 200, int(rng.integers(3, 8))).tolist() for _ in range(24)]
    lengths = {tuple(p): int(n) for p, n in zip(prompts, rng.integers(2, 30, 24))}
    config = EngineConfig(policy="trail", max_batch=4, max_slots=32, max_model_len=48, prefill_tokens_per_s=1e4,
                          overlap=False, drift_window=drift_window)
    engine = LLMEngine(model, None, config, probe=probe, probe_layer=1, eos_token_ids=[],
                       prompt_predictor=lambda ps: [lengths[tuple(p)] for p in ps])
    seen = []
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=32, replay_length=lengths[tuple(p)]))
    while engine.has_unfinished():
        engine.step()
        if engine.predictions.fallback:
            slot_of = {r.slot: r for r in engine._requests.values()}
            seen += [(float(engine.predictions.values[s]), lengths[tuple(r.prompt_ids)] - (len(r.output_ids) - 1))
                     for s, r in slot_of.items() if r.output_ids]
    return engine, seen


def test_the_engine_falls_back_to_the_prompt_prediction_when_the_probe_drifts(tiny):
    engine, seen = _serve(tiny, drift_window=8)
    totals = engine.telemetry.totals()
    assert totals["prediction_fallback"] and totals["prediction_fallback_switches"] >= 1
    t, on, probe_mae, prompt_mae = engine.telemetry.prediction_fallbacks[0]
    assert on and probe_mae > prompt_mae == 0.0
    assert seen, "no step ran while the fallback was on"
    # what the scheduler reads: the prompt prediction minus the tokens fed (the last token sampled
    # is not fed yet: output length - 1), never the probe's readout
    assert [v for v, _ in seen] == pytest.approx([expect for _, expect in seen])
    off, _ = _serve(tiny, drift_window=0)
    assert not off.telemetry.totals()["prediction_fallback"] and off.telemetry.prediction_fallbacks == []
