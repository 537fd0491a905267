"""Chooses between a kernel's Triton implementation and its torch reference.

`TRAIL_KERNELS` (read at each call, so tests may change it):
  auto       Triton when the tensors are on CUDA (or under TRITON_INTERPRET=1 when asked
             explicitly), the reference otherwise;
  triton     always Triton (on CPU only under TRITON_INTERPRET=1, set before Triton is imported);
  reference  always the torch reference.
"""
from __future__ import annotations

import functools
import os

import torch

MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("TRAIL_KERNELS", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"TRAIL_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    return mode


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor, impl: str | None = None) -> bool:
    """Whether a kernel call on `tensors` runs its Triton implementation.

    `impl` ('triton' or 'reference') overrides the environment for one call; tests use it.
    """
    mode = impl or kernel_mode()
    if mode not in MODES:
        raise ValueError(f"impl={mode!r} is not one of {', '.join(MODES)}")
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("Triton kernels requested but triton is not installed")
        if not on_cuda and not interpreter_on():
            raise RuntimeError(
                "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return on_cuda and triton_available()
