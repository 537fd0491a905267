"""Length predictors for trail: traces, layer features, the probe and prompt predictors, and
their evaluation (`trail collect | embed | train-probe | eval-probe`).

Data flow: prompts -> collect (trace) -> embed (layer states) -> train-probe (probe files) ->
eval-probe (metrics). Probe files are read by the engine through `probe_file.load_probe`; the
filter itself lives in `trail_kernels.probe` and is only called from here.
"""
from trail.predictor.probe_file import ProbeMLP, ProbeSpec, load_probe, save_probe

__all__ = ["ProbeMLP", "ProbeSpec", "load_probe", "save_probe"]
