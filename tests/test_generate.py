"""The live-prediction loop (runner + paged KV + probe kernel) on the real SmolLM2 weights: the
tokens are transformers' greedy tokens, and every prediction is a valid capped remaining length."""
import pytest
import torch

from trail.assets import SMOLLM2_ID
from trail.generate import generate_with_predictions
from trail.models.loader import load_hf, load_tokenizer
from trail.predictor.filter_adapter import probe_params
from trail.predictor.probe_file import load_probe, shipped_probe_dir
from trail.sampling import SampleParams


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_hf(smollm2_dir, device="cpu"), load_tokenizer(smollm2_dir)


def test_live_predictions_are_valid_and_tokens_match_transformers(smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    mlp, spec = load_probe(shipped_probe_dir(SMOLLM2_ID) / "probe", expect_model=SMOLLM2_ID,
                           expect_d=model.config.hidden_size)
    texts = ["Name a fruit.", "Write two sentences about the sea."]
    prompts = [tok(t)["input_ids"] for t in texts]
    max_new = 10
    records = list(generate_with_predictions(model, prompts, probe_params(mlp, spec), spec.layer, max_new,
                                             stop_ids=[], sample_params=SampleParams(repetition_penalty=1.1)))
    assert len(records) == max_new and all(records[-1].finished)
    for rec in records:
        for g, pred in zip(rec.generated, rec.predicted_remaining):
            fed = g - 1                      # the token sampled this step is not fed yet
            assert 0.0 <= pred <= max_new - fed + 1e-4
    # the estimate moves with the evidence: not the same number at every step
    assert len({round(r.predicted_remaining[1], 3) for r in records}) > 2

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                          repetition_penalty=1.1, eos_token_id=None, pad_token_id=0)[0, len(p):]
        ours = [r.new_tokens[i] for r in records]
        assert ours == ref.tolist()


def test_rejects_bad_input(smollm2):
    model, _ = smollm2
    spec_params = None
    with pytest.raises(ValueError, match="non-empty prompt"):
        next(generate_with_predictions(model, [[]], spec_params, 0, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(generate_with_predictions(model, [[1, 2]], spec_params, 0, 0))
