"""trail: length-aware LLM serving (TRAIL: shortest-predicted-remaining-first with limited preemption).

Importing `trail` loads the native library `trail._C` (ops under `torch.ops.trail`, classes under
`torch.classes.trail`). Kernels with Triton and torch-reference implementations live in the sibling
package `trail_kernels`. The engine and its types are imported on first use:
`trail.LLMEngine`, `trail.EngineConfig`, `trail.SamplingParams`, `trail.RequestOutput`.
"""
from trail._native import native_info, ops

__version__ = "0.1.0"
__all__ = ["native_info", "ops", "__version__", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput"]

_LAZY = {"LLMEngine": "trail.engine", "EngineConfig": "trail.engine_config", "SamplingParams": "trail.request",
         "RequestOutput": "trail.request"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trail' has no attribute {name!r}")
