"""Rotary embedding of q and k straight out of the fused qkv projection, and the gated MLP's
SiLU-and-multiply: the Triton kernels, their launchers and the torch references of the same
functions (one launch each where the plain torch code takes ~20 and 2 kernels per layer, which is
what a launch-bound small-model decode step pays for).

    q, k = rotary_qk(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
        qkv [T, (H + 2 KVH) * D] -> q [T, H, D], k [T, KVH, D] rotated to `positions` [T]
        ("rotate half" layout; cos / sin [max_positions, D / 2] fp32 tables)
    y = silu_mul(gate_up)       gate_up [T, 2 I] -> silu(gate) * up [T, I]

Arithmetic in fp32 (float64 inputs: silu_mul in float64; the rotation's tables are fp32), one
rounding to the input's dtype at the end.
"""
from __future__ import annotations

import torch

from trail_kernels.dispatch import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_qk_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, qkv_s0, out_s0, out_s1, table_s0,
                          HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_HALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cs = tl.arange(0, BLOCK_HALF)
        hmask = hs < HEADS
        cmask = cs < HALF
        mask = hmask[:, None] & cmask[None, :]
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_ptr + pos * table_s0 + cs, mask=cmask, other=0.0)[None, :]
        sin = tl.load(sin_ptr + pos * table_s0 + cs, mask=cmask, other=0.0)[None, :]
        # q heads then k heads: contiguous in the qkv row, head h at h * 2 * HALF
        src = qkv_ptr + t * qkv_s0 + hs[:, None] * (2 * HALF) + cs[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = out_ptr + t * out_s0 + hs[:, None] * out_s1 + cs[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (x1 * cos - x2 * sin).to(ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, y_ptr, n, x_s0, y_s0, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(x_ptr + t * x_s0 + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + t * x_s0 + n + cols, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(y_ptr + t * y_s0 + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check_rotary(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim):
    if qkv.dim() != 2 or qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"rotary_qk: qkv must be [T, >= (H + 2 KVH) * D] = [T, "
                         f"{(num_heads + 2 * num_kv_heads) * head_dim}], got {tuple(qkv.shape)}")
    if head_dim % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim // 2:
        raise ValueError(f"rotary_qk: cos / sin must be [positions, head_dim / 2 = {head_dim // 2}], "
                         f"got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if positions.shape != (qkv.shape[0],):
        raise ValueError(f"rotary_qk: positions must be [T = {qkv.shape[0]}], got {tuple(positions.shape)}")


def rotary_qk_reference(qkv, positions, cos, sin, num_heads: int, num_kv_heads: int, head_dim: int):
    t = qkv.shape[0]
    qk = qkv[:, :(num_heads + num_kv_heads) * head_dim].reshape(t, num_heads + num_kv_heads, head_dim)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = qk.float().chunk(2, dim=-1)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)
    return out[:, :num_heads], out[:, num_heads:]


def _rotary_qk_triton(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim):
    t, heads = qkv.shape[0], num_heads + num_kv_heads
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(t, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        half = head_dim // 2
        block_h = min(triton.next_power_of_2(heads), 16)
        _rotary_qk_kernel[(t, triton.cdiv(heads, block_h))](
            qkv, positions, cos, sin, out, qkv.stride(0), out.stride(0), out.stride(1), cos.stride(0),
            HEADS=heads, HALF=half, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)
    return out[:, :num_heads], out[:, num_heads:]


def rotary_qk(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              num_heads: int, num_kv_heads: int, head_dim: int, impl: str | None = None):
    """(q [T, H, D], k [T, KVH, D]) rotated to `positions`, from the qkv projection's output."""
    _check_rotary(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
    if use_triton(qkv, positions, cos, impl=impl):
        return _rotary_qk_triton(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
    return rotary_qk_reference(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    wide = gate_up if gate_up.dtype == torch.float64 else gate_up.float()
    gate, up = wide.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def _silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(triton.next_power_of_2(n), 1024)
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4)
    return out


def silu_mul(gate_up: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim ([T, 2 I] -> [T, I])."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up must be [T, 2 * I], got {tuple(gate_up.shape)}")
    if use_triton(gate_up, impl=impl):
        return _silu_mul_triton(gate_up)
    return silu_mul_reference(gate_up)
