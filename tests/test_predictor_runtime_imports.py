"""The predictor's runtime (what `LLMEngine.from_pretrained` loads: probe files, bins, the prompt
predictor's inference) imports nothing of the offline pipeline (collect / trace / embed / train /
eval / hf_backend). Checked in a fresh interpreter, where nothing else has imported those yet."""
import json
import subprocess
import sys

OFFLINE = {f"trail.predictor.{name}" for name in (
    "cli_verbs", "collect", "embed", "eval_probe", "eval_select", "filter_adapter", "finetune_prompt",
    "hf_backend", "pipeline", "plots", "prompts", "sim_judge", "trace", "train_probe", "train_prompt")}

RUNTIME = r"""
import json
import sys

import torch

import trail.engine  # the engine and everything it imports at start
from trail import PromptPredictor
from trail.assets import SMOLLM2_ID
from trail.predictor.probe_file import load_probe_params, shipped_probe_dir

folder = shipped_probe_dir(SMOLLM2_ID)
params, spec = load_probe_params(folder / "probe", expect_model=SMOLLM2_ID)
assert params.hidden_size == spec.d
# as the engine builds it, with a random [vocab, d] matrix standing in for the model's embeddings
embeddings = torch.randn(49152, spec.d, generator=torch.Generator().manual_seed(0))
predictor = PromptPredictor(folder / "prompt_boe", embeddings=embeddings, expect_model=SMOLLM2_ID)
total = predictor.expected_total(prompt_ids=[[1, 2, 3], [40, 41, 42, 43]])
assert total.shape == (2,) and bool(torch.isfinite(total).all()), total
print(json.dumps(sorted(sys.modules)))
"""


def test_runtime_loads_the_shipped_predictors_without_the_offline_pipeline():
    out = subprocess.run([sys.executable, "-c", RUNTIME], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "trail.predictor.prompt_predictors" in loaded and "trail.predictor.probe_file" in loaded
    assert not loaded & OFFLINE, f"the runtime imported offline modules: {sorted(loaded & OFFLINE)}"
    assert "transformers" not in loaded
