"""Length predictors for trail: traces, layer features, the probe and prompt predictors, and
their evaluation (`trail collect | embed | train-probe | eval-probe`).

Data flow: prompts -> collect (trace) -> embed (layer states) -> train-probe (probe files) ->
eval-probe (metrics, optionally per-step predictions as an npz) -> judge (the simulator replays
them: fraction of the oracle's gain). Labels of outputs that hit the token cap are censored
(train_probe.censored_nll); finetune_prompt holds the end-to-end fine-tuned prompt baselines,
ranking the rank-correlation metrics, eval_select what eval-probe evaluates by default. Probe files are read by the engine through `probe_file.load_probe`; the
filter itself lives in `trail_kernels.probe` and is only called from here.
"""
from trail.predictor.probe_file import ProbeMLP, ProbeSpec, load_probe, save_probe

__all__ = ["ProbeMLP", "ProbeSpec", "load_probe", "save_probe"]
