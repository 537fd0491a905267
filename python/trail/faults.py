"""Faults of an engine step: which device errors poison the context (sticky: the engine stops)
and the error the engine raises then. Everything else is rolled back by the engine (see
trail.engine and trail.serving_core.ServingCore.requeue)."""
from __future__ import annotations

import torch


class EngineDeadError(RuntimeError):
    """The device failed in a way no step can recover from; `outputs` are the final outputs of
    the requests it ended (FinishReason.ERROR)."""
    outputs: list = []


def is_sticky_device_error(exc: BaseException) -> bool:
    """A CUDA error that poisons the context (an illegal access, a device-side assert): every
    later call fails too. A device OOM is not sticky."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    msg = str(exc)
    return ("CUDA error" in msg or "device-side assert" in msg) and "out of memory" not in msg
