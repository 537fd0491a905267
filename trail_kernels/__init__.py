"""Triton kernels of trail, each beside a plain-torch reference of the same function.

`TRAIL_KERNELS=auto|triton|reference` chooses the implementation (auto: Triton on CUDA tensors,
the reference on CPU). This package imports nothing from `trail`.
"""
from trail_kernels.dispatch import kernel_mode, triton_available, use_triton
from trail_kernels.rms_norm import rms_norm, rms_norm_reference

__all__ = ["kernel_mode", "triton_available", "use_triton", "rms_norm", "rms_norm_reference"]
