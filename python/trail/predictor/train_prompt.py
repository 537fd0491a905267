"""Training a prompt predictor (offline, `trail train-probe`): the probe MLP as a head over prompt
features (`prompt_predictors.prompt_features`: MiniLM sentence embeddings or the LLM's bag of
input embeddings) on the total-length bins, censored at the cap, early stopping on validation.
The result is a probe file that `prompt_predictors.PromptPredictor` loads at runtime.
"""
from __future__ import annotations

from typing import Sequence

import torch

from trail.predictor import bins as B
from trail.predictor.probe_file import ProbeMLP, ProbeSpec
from trail.predictor.trace import TraceRecord
from trail.predictor.train_probe import TrainConfig, model_prior, split_mask, train_mlp


def train_prompt_predictor(kind: str, records: Sequence[TraceRecord], features: torch.Tensor,
                           edges: list[float], cfg: TrainConfig, model_id: str, max_new_tokens: int,
                           encoder_name: str | None = None) -> tuple[ProbeMLP, ProbeSpec]:
    """Head over the total-length bins on the train split, early stopping on validation."""
    ids = [r.id for r in records]
    lens = torch.tensor([r.output_len for r in records], dtype=torch.float32, device=features.device)
    capped = torch.tensor([r.hit_cap for r in records], dtype=torch.bool, device=features.device)
    tr, va = split_mask(ids, "train").to(features.device), split_mask(ids, "val").to(features.device)
    if not tr.any():
        raise ValueError("no training requests for the prompt predictor")
    values = B.bin_values(lens[tr].cpu(), edges)
    cap = torch.full((int(va.sum()),), float(max_new_tokens), device=features.device)
    mlp, info = train_mlp(features[tr], B.bin_index(lens[tr], edges).to(features.device), features[va],
                          lens[va], cap, values, len(edges) - 1, cfg, desc=kind, censored=capped[tr])
    pi = model_prior(mlp, features[tr])
    spec = ProbeSpec(kind=kind, model=model_id, d=int(features.shape[1]), h=cfg.hidden,
                     bin_edges=list(edges), bin_values=values, pi=pi, max_new_tokens=max_new_tokens,
                     encoder=encoder_name,
                     training={"requests": int(tr.sum()), "label": "total output length, censored at the cap",
                               "censored_requests": int(capped[tr].sum()),
                               "best_epoch": info["best_epoch"], "config": cfg.__dict__},
                     validation={"requests": int(va.sum()), "mae_total": info["val_mae_samples"]})
    return mlp, spec
