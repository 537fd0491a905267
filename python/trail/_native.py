"""Loads the native extension `trail._C` and describes the build that was loaded."""
from __future__ import annotations

import json
import logging

import torch

logger = logging.getLogger(__name__)

try:
    from trail import _C  # noqa: F401  (loading registers torch.ops.trail.*)
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "trail's native extension trail._C is missing or failed to load: install with "
        "`pip install --no-build-isolation .` (see README). Cause: " + str(exc)
    ) from exc

ops = torch.ops.trail


def native_info() -> dict:
    """The loaded build of `trail._C`: 'cuda' or 'cpu', compiler flags, the torch it was built
    against, and the torch it runs with."""
    info = json.loads(ops.native_info())
    info["torch_runtime"] = torch.__version__
    info["library"] = _C.__file__
    return info
