"""RMSNorm, optionally fused with a residual add: the Triton kernel, its launcher and the torch
reference of the same function.

    rms_norm(x, w, eps)                 -> x / rms(x) * w
    rms_norm(x, w, eps, residual=r)     -> (y, x + r) with y = (x + r) / rms(x + r) * w

Statistics in fp32 whatever the input dtype; the output has the input's dtype.
"""
from __future__ import annotations

import torch

from trail_kernels.dispatch import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, n_cols, x_stride, res_stride,
                         y_stride, res_out_stride, eps, HAS_RESIDUAL: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(res_out_ptr + row * res_out_stride + cols,
                     x.to(res_out_ptr.dtype.element_ty), mask=mask)
        var = tl.sum(x * x, axis=0) / n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = x * tl.rsqrt(var + eps) * w
        tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None):
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        summed = x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return (y, summed) if residual is not None else y


def _rms_norm_triton(x, weight, eps, residual):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    if residual is not None:
        r2 = residual.reshape(-1, shape[-1])
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        r_out = torch.empty_like(x2)
    else:
        r2, r_out = x2, y
    block = triton.next_power_of_2(n_cols)
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            x2, r2, weight, y, r_out, n_cols, x2.stride(0), r2.stride(0), y.stride(0),
            r_out.stride(0), eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=4 if block <= 4096 else 8,
        )
    if residual is not None:
        return y.view(shape), r_out.view(shape)
    return y.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, impl: str | None = None):
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has {x.shape[-1]} features but weight has {weight.shape[-1]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
    if use_triton(x, weight, impl=impl):
        return _rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)
