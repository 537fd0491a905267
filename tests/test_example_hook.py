"""examples/transformers_hook.py: trail's probe and scheduler driving a plain transformers model
(real SmolLM2 weights, a forward hook on layer L, our own KV accounting). Under trail the
scheduler really preempts (keeps), and no request's output changes: each runs at batch 1 on its
own cache, so only the order of work may change."""
import importlib.util
from pathlib import Path

import pytest

from trail.scheduler_types import TRAIL_PAPER


@pytest.fixture(scope="module")
def example(smollm2_dir):
    path = Path(__file__).resolve().parents[1] / "examples" / "transformers_hook.py"
    spec = importlib.util.spec_from_file_location("transformers_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_schedules_a_transformers_model_by_predicted_length(example):
    prompts = example.PROMPTS[:4]
    caps = [32, 32, 5, 5]            # later arrivals capped short: trail runs them first
    fcfs = example.serve("fcfs", max_new_tokens=caps, prompts=prompts, arrive_every=1)
    ours = example.serve("trail", max_new_tokens=caps, prompts=prompts, arrive_every=1,
                         **dict(TRAIL_PAPER, c=5.0))
    assert fcfs["decisions"]["keep"] == 0 and ours["decisions"]["keep"] > 0
    for rid, r in ours["requests"].items():
        assert r["out"] == fcfs["requests"][rid]["out"] and r["text"] == fcfs["requests"][rid]["text"]
        assert r["text"].strip(), rid                                      # the answer is text, decoded
        assert r["done"] is not None and 1 <= len(r["out"]) <= r["cap"]
        assert all(0 <= p <= r["cap"] - g + 1e-3 for g, p in r["preds"])    # capped readout, one per token
    # the short late arrivals finish sooner under trail
    assert sum(ours["requests"][i]["done"] for i in (2, 3)) < sum(fcfs["requests"][i]["done"] for i in (2, 3))
