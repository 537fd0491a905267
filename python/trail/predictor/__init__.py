"""Length predictors for trail: traces, layer features, the probe and prompt predictors, and
their evaluation (`trail collect | embed | train-probe | eval-probe`).

Data flow: prompts -> collect (trace) -> embed (layer states) -> train-probe (probe files) ->
eval-probe (metrics, optionally per-step predictions as an npz) -> judge (the simulator replays
them: fraction of the oracle's gain). Labels of outputs that hit the token cap are censored
(train_probe.censored_nll); finetune_prompt holds the end-to-end fine-tuned prompt baselines,
ranking the rank-correlation metrics, eval_select what eval-probe evaluates by default.

Runtime (what the engine loads): `probe_file` (probe files, the shipped probes), `bins`, and
`prompt_predictors` (features + `PromptPredictor`). They import nothing of the offline pipeline
(collect, trace, embed, train_probe, train_prompt, eval_*, hf_backend, pipeline);
tests/test_predictor_runtime_imports.py holds them to it. The filter itself lives in
`trail_kernels.probe`.
"""
from trail.predictor.probe_file import ProbeMLP, ProbeSpec, load_probe, save_probe

__all__ = ["ProbeMLP", "ProbeSpec", "load_probe", "save_probe"]
