"""Rotary position embeddings: inverse frequencies for the config's scaling (default, linear,
llama3, yarn, as transformers defines them) and the cos/sin table; the rotation of q and k
("rotate half" layout of HF checkpoints) is `trail_kernels.rotary.rotary_qk`.
"""
from __future__ import annotations

import math

import torch

from trail.models.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] fp32, attention scaling of cos/sin)."""
    dim = config.head_dim
    base = config.rope_theta
    rope = config.rope_scaling
    kind = rope.get("rope_type", "default")
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / rope["factor"], 1.0
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(config, inv)
    raise ValueError(f"rope_type {kind!r} is not supported")


def _yarn(config: ModelConfig, inv_extra: torch.Tensor) -> tuple[torch.Tensor, float]:
    rope = config.rope_scaling
    dim, base = config.head_dim, config.rope_theta
    orig = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.max_position_embeddings / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_inter = inv_extra / factor
    return inv_inter * (1 - extrapolation) + inv_extra * extrapolation, attn


class RotaryTable:
    """cos/sin [max_positions, head_dim // 2] in fp32 on the device; grows on demand."""

    def __init__(self, config: ModelConfig, device: torch.device, max_positions: int | None = None):
        self.inv_freq, self.scaling = inv_frequencies(config)
        self.inv_freq = self.inv_freq.to(device)
        self.device = device
        self.cos = self.sin = None
        self.ensure(max_positions or min(config.max_position_embeddings, 8192))

    def ensure(self, n: int) -> None:
        if self.cos is not None:
            if self.cos.shape[0] >= n:
                return
            n = max(n, 2 * self.cos.shape[0])
        pos = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        self.cos = freqs.cos() * self.scaling
        self.sin = freqs.sin() * self.scaling
