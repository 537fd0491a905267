"""Prompt predictors fine-tuned end to end, the strong form of TRAIL's baseline (TRAIL fine-tuned
DistilBERT): the encoder's weights train together with the head on the train split, with the
censored total-length labels of `train_probe.censored_nll`, early-stopped on the validation MAE of
the expected total (capped at max_new_tokens).

  boe_ft     bag of embeddings with its own, trainable embedding table (initialised from the
             LLM's input embeddings, mean over the templated prompt ids) + the probe MLP head;
             cheap enough for any machine;
  minilm_ft  all-MiniLM-L6-v2 (when its folder is found: `prompt_predictors.minilm_dir`), mean
             pooled and L2-normalised, + the same head; encoder lr 1e-5 .. 5e-5.
The result stays in memory for evaluation ([N, K] log bin distributions for given records): the
fine-tuned BoE table alone is vocab x d parameters (113 MB for SmolLM2), not a shippable probe.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from trail.predictor import bins as B
from trail.predictor.probe_file import ProbeMLP, ProbeSpec
from trail.predictor.trace import TraceRecord
from trail.predictor.train_probe import censored_nll, expected_remaining, split_mask

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    hidden: int = 512
    epochs: int = 8
    patience: int = 2
    batch_size: int = 64
    lr_head: float = 1e-3
    lr_encoder: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 0


class BoEEncoder(nn.Module):
    """Mean of trainable embedding rows over each prompt's token ids."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.bag = nn.EmbeddingBag.from_pretrained(embeddings.detach().float().clone(), freeze=False, mode="mean")
        self.dim = int(embeddings.shape[1])

    def forward(self, records: Sequence[TraceRecord]) -> torch.Tensor:
        dev = self.bag.weight.device
        ids = torch.cat([torch.as_tensor(r.prompt_ids, dtype=torch.long) for r in records]).to(dev)
        offsets = torch.tensor([0] + [len(r.prompt_ids) for r in records[:-1]], dtype=torch.long).cumsum(0).to(dev)
        return self.bag(ids, offsets)


class MiniLMTrainable(nn.Module):
    """all-MiniLM-L6-v2 with trainable weights, pooled as sentence-transformers does."""

    def __init__(self, path=None, max_length: int = 256):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from trail.predictor.prompt_predictors import minilm_dir

        folder = minilm_dir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder))
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def forward(self, records: Sequence[TraceRecord]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        enc = self.tokenizer([r.prompt for r in records], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(dev)
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"][..., None].float()
        return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)


class _Predictor(nn.Module):
    def __init__(self, encoder: nn.Module, num_bins: int, hidden: int, mu: torch.Tensor, sd: torch.Tensor):
        super().__init__()
        self.encoder, self.head = encoder, ProbeMLP(encoder.dim, num_bins, hidden)
        self.register_buffer("mu", mu)
        self.register_buffer("sd", sd)

    def forward(self, records):
        return self.head((self.encoder(records) - self.mu) / self.sd)


def _batches(n: int, size: int, gen: torch.Generator | None = None):
    order = torch.randperm(n, generator=gen).tolist() if gen is not None else list(range(n))
    for s in range(0, n, size):
        yield order[s: s + size]


def finetune(kind: str, records: Sequence[TraceRecord], edges: list[float], max_new_tokens: int, *,
             embeddings: torch.Tensor | None = None, minilm_path=None, device: str | torch.device = "cpu",
             cfg: FinetuneConfig | None = None, deadline: float | None = None, progress: bool = False):
    """Train on the train split of `records`, early-stop on its validation split. Returns
    (log_probs [N, K] for every record, a ProbeSpec describing the bins / values, info dict).
    `deadline` (time.monotonic()): stop training at the end of the epoch that passes it."""
    cfg = cfg or FinetuneConfig()
    if kind == "boe_ft":
        if embeddings is None:
            raise ValueError("boe_ft needs the LLM's input embeddings")
        encoder, lr_enc = BoEEncoder(embeddings), cfg.lr_encoder
    elif kind == "minilm_ft":
        encoder, lr_enc = MiniLMTrainable(minilm_path), min(cfg.lr_encoder, 5e-5)
    else:
        raise ValueError(f"unknown fine-tuned prompt predictor {kind!r} (boe_ft or minilm_ft)")
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    encoder = encoder.to(dev)
    ids = [r.id for r in records]
    tr_idx = split_mask(ids, "train").nonzero().flatten().tolist()
    va_idx = split_mask(ids, "val").nonzero().flatten().tolist()
    if not tr_idx:
        raise ValueError("no training requests for the fine-tuned prompt predictor")
    lens = torch.tensor([r.output_len for r in records], dtype=torch.float32)
    capped = torch.tensor([r.hit_cap for r in records], dtype=torch.bool)
    y = B.bin_index(lens, edges)
    values = B.bin_values(lens[tr_idx], edges)
    vals = torch.tensor(values, device=dev)
    with torch.no_grad():
        x0 = torch.cat([encoder([records[tr_idx[j]] for j in b]).float() for b in _batches(len(tr_idx), 256)])
    mu, sd = x0.mean(0), (x0.std(0).clamp_min(1e-4) if len(tr_idx) > 1 else torch.ones_like(x0[0]))
    model = _Predictor(encoder, len(edges) - 1, cfg.hidden, mu, sd).to(dev)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr_enc},
                             {"params": model.head.parameters(), "lr": cfg.lr_head}], weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    def val_mae():
        if not va_idx:
            return math.nan
        model.eval()
        with torch.no_grad():
            lp = torch.cat([model([records[va_idx[j]] for j in b]).float() for b in _batches(len(va_idx), 256)])
        model.train()
        est = expected_remaining(lp, vals, torch.full((len(lp),), float(max_new_tokens), device=dev)).cpu()
        return float((est - lens[va_idx]).abs().mean())

    best_state, best, bad, history = None, math.inf, 0, []
    t0 = time.monotonic()
    model.train()
    for epoch in tqdm(range(cfg.epochs), desc=kind, unit="epoch", disable=not progress, leave=False):
        total = 0.0
        for b in _batches(len(tr_idx), cfg.batch_size, gen):
            rows = [tr_idx[j] for j in b]
            loss = censored_nll(model([records[i] for i in rows]), y[rows].to(dev), capped[rows].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        mae = val_mae()
        history.append({"epoch": epoch, "train_nll": total / len(tr_idx), "val_mae_total": mae})
        logger.info("%s epoch %d: train nll %.3f, validation MAE %.2f", kind, epoch, total / len(tr_idx), mae)
        if not va_idx or mae < best:
            best, bad, best_state = mae, 0, copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("%s: deadline reached after epoch %d", kind, epoch)
            break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        logp = torch.cat([torch.log_softmax(model([records[i] for i in b]).float(), -1).cpu()
                          for b in _batches(len(records), 256)])
    pi = torch.softmax(logp[tr_idx], -1).mean(0).clamp_min(1e-4)
    spec = ProbeSpec(kind="prompt_minilm" if kind == "minilm_ft" else "prompt_boe", model="(fine-tuned, in memory)",
                     d=int(encoder.dim), h=cfg.hidden, bin_edges=list(edges), bin_values=values,
                     pi=(pi / pi.sum()).tolist(), max_new_tokens=max_new_tokens,
                     training={"fine_tuned": kind, "requests": len(tr_idx), "config": cfg.__dict__,
                               "epochs_run": len(history), "seconds": time.monotonic() - t0},
                     validation={"requests": len(va_idx), "mae_total": best})
    return logp, spec, {"history": history, "val_mae_total": best, "seconds": time.monotonic() - t0}
