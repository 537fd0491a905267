"""trail: length-aware LLM serving (TRAIL: shortest-predicted-remaining-first with limited preemption).

`trail.ops` and `trail.native_info` load the native library `trail._C` (ops under `torch.ops.trail`,
classes under `torch.classes.trail`) on first use, as does every module that needs it; importing
`trail` alone imports neither torch nor `trail._C` (so `trail --help` is fast). Kernels with Triton
and torch-reference implementations live in the sibling package `trail_kernels`. The public names
below are imported on first use: the engine (`LLMEngine`, `EngineConfig`, `SamplingParams`,
`RequestOutput`; `AsyncEngine` for asyncio servers), and the parts for other engines (`Probe`,
`PromptPredictor`, `Scheduler` + `SchedulerConfig` and its plan columns, `swap_blocks`,
`row_flags`); see README "Use trail in your own engine". They follow semantic versioning.
"""
__version__ = "0.1.0"
_LAZY = {
    # the native build (trail._native imports torch and loads trail._C)
    "native_info": "trail._native", "ops": "trail._native",
    # the engine
    "LLMEngine": "trail.engine", "EngineConfig": "trail.engine_config", "SamplingParams": "trail.request",
    "RequestOutput": "trail.request", "FinishReason": "trail.request",
    # the engine behind an asyncio server (its core in its own process; trail serve runs on it)
    "AsyncEngine": "trail.async_engine",
    # trail inside other engines: the probe, the prompt predictor, the scheduler, the swap op
    "Probe": "trail.length_probe", "PromptPredictor": "trail.predictor.prompt_predictors",
    "Scheduler": "trail.scheduler", "SchedulerConfig": "trail.scheduler_types", "SCHED": "trail.scheduler_types",
    "PREEMPT": "trail.scheduler_types", "Mode": "trail.scheduler_types", "Resume": "trail.scheduler_types",
    "State": "trail.scheduler_types", "swap_blocks": "trail.kv_swap", "row_flags": "trail_kernels",
}
__all__ = ["native_info", "ops", "__version__", *[k for k in _LAZY if k not in ("native_info", "ops")]]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value          # later lookups skip this hook
        return value
    raise AttributeError(f"module 'trail' has no attribute {name!r}")
