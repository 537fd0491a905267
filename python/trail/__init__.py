"""trail: length-aware LLM serving (TRAIL: shortest-predicted-remaining-first with limited preemption).

Importing `trail` loads the native library `trail._C` (ops under `torch.ops.trail`, classes under
`torch.classes.trail`). Kernels with Triton and torch-reference implementations live in the sibling
package `trail_kernels`. The public names below are imported on first use: the engine
(`LLMEngine`, `EngineConfig`, `SamplingParams`, `RequestOutput`), and the parts for other engines
(`Probe`, `PromptPredictor`, `Scheduler` + `SchedulerConfig` and its plan columns, `swap_blocks`,
`row_flags`); see README "Use trail in your own engine". They follow semantic versioning.
"""
from trail._native import native_info, ops

__version__ = "0.1.0"
_LAZY = {
    # the engine
    "LLMEngine": "trail.engine", "EngineConfig": "trail.engine_config", "SamplingParams": "trail.request",
    "RequestOutput": "trail.request", "FinishReason": "trail.request",
    # trail inside other engines: the probe, the prompt predictor, the scheduler, the swap op
    "Probe": "trail.length_probe", "PromptPredictor": "trail.predictor.prompt_predictors",
    "Scheduler": "trail.scheduler", "SchedulerConfig": "trail.scheduler_types", "SCHED": "trail.scheduler_types",
    "PREEMPT": "trail.scheduler_types", "Mode": "trail.scheduler_types", "Resume": "trail.scheduler_types",
    "State": "trail.scheduler_types", "swap_blocks": "trail.kv_swap", "row_flags": "trail_kernels",
}
__all__ = ["native_info", "ops", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trail' has no attribute {name!r}")
