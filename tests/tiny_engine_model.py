"""The tiny random Llama and random length probe the engine tests share (seeded, so every test
file sees the same weights): `tiny_model_probe(device, dtype)`."""
import torch

from trail.models import random_model
from trail_kernels.probe_params import ProbeParams


def tiny_model_probe(device: str = "cpu", dtype: torch.dtype | None = None):
    model = random_model("tiny", seed=3, std=0.3)
    probe = ProbeParams.random(model.config.hidden_size, 32, 8, max_len=64,
                               generator=torch.Generator().manual_seed(0), scale=2.0)
    return (model if dtype is None and device == "cpu" else model.to(device=device, dtype=dtype)), probe
