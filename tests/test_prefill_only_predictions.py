"""The prefill-only control (issue 25): in the engine (`PrefillOnlyPredictions`) a request's
predicted remaining is its first probe readout counted down, never updated by the per-step filter;
in the simulator (`--predictions prefill`) the same from the recorded first prediction."""
import numpy as np
import torch

from trail import sim
from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models import random_model
from trail.predictions import PrefillOnlyPredictions, ProbePredictions
from trail.request import SamplingParams
from trail_kernels.probe_params import ProbeParams


def _predicted(predictions) -> list[list[tuple[int, float]]]:
    model = random_model("tiny", seed=3)
    probe = ProbeParams.random(model.config.hidden_size, 32, 8, max_len=64, generator=torch.Generator().manual_seed(0))
    engine = LLMEngine(model, None, EngineConfig(policy="trail", max_batch=4, max_model_len=64,
                                                 prefill_tokens_per_s=1e4, overlap=False),
                       probe=probe, probe_layer=1, eos_token_ids=[], predictions=predictions)
    rng = np.random.default_rng(0)
    outs = engine.generate([rng.integers(8, 200, 6).tolist() for _ in range(6)],
                           SamplingParams(max_new_tokens=24, replay_length=20), progress=False)
    return [o.metrics.predictions for o in outs]


def test_engine_counts_the_first_readout_down():
    for preds in _predicted(PrefillOnlyPredictions()):
        assert len(preds) >= 10
        totals = {round(g + v, 4) for g, v in preds if v > 0}
        assert len(totals) == 1, preds                     # first readout + fed: one value per request
    # the per-step filter moves it (so the check above can fail)
    assert any(len({round(g + v, 4) for g, v in preds}) > 1 for preds in _predicted(ProbePredictions()))


def test_simulator_prefill_mode_counts_the_first_recorded_prediction_down():
    pool = sim.load_recorded()
    rec = sim.make_trace(pool, np.zeros(50), "recorded", seed=1)
    pre = sim.make_trace(pool, np.zeros(50), "prefill", seed=1)
    assert np.array_equal(rec.output_len, pre.output_len)
    for i in range(50):
        a, b = pre.pred_cu[i], pre.pred_cu[i + 1]
        g = np.arange(b - a)
        assert np.allclose(pre.pred[a:b], np.maximum(rec.pred[a] - g, 0))
