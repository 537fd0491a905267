"""`trail embed`: teacher-forced forwards over a trace, capturing layer states as probe inputs.

A request with templated prompt p (P tokens) and output o (L tokens, EOS included) is fed as
p + o[:L-1]. Its probe inputs are indexed by g, the number of tokens generated so far:
  g = 0        the mean of the layer's states over the P prompt tokens (the prefill input),
  g = 1..L-1   the state at position P + g - 1 (the decode step that feeds o[g-1]),
and the label is the remaining length L - g (>= 1). Two stores:
  SampledFeatures  every requested layer, g = 0 plus up to `num_decode` (TRAIL: 16) g's sampled
                   per request; fp16 `[layers, N, 1 + num_decode, d]` (training, layer sweep);
  DenseFeatures    one layer at every g of each request; fp16 `[sum L, d]` (evaluation,
                   filter fitting).
The forward is transformers with hooks on the decoder layers (hf_backend), or our model runner's
layer tap when `trail.model_runner` provides one (`runner_backend`).
"""
from __future__ import annotations

import json
import logging
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from trail.predictor import hf_backend
from trail.predictor.trace import Trace, TraceRecord

logger = logging.getLogger(__name__)


def fed_tokens(rec: TraceRecord) -> list[int]:
    return list(rec.prompt_ids) + list(rec.output_ids[: rec.output_len - 1])


def sample_positions(rec: TraceRecord, num_decode: int, seed: int) -> list[int]:
    """The g's (1..L-1) whose decode states are kept: all if fewer than num_decode, else a
    sample seeded by the request id (the same on every machine)."""
    pool = range(1, rec.output_len)
    if len(pool) <= num_decode:
        return list(pool)
    rng = random.Random(seed * 1_000_003 + zlib.crc32(rec.id.encode("utf-8")))
    return sorted(rng.sample(pool, num_decode))


def _rows_of(have: Sequence[str], ids: Sequence[str]) -> list[int]:
    """Row of each of `ids` in `have` (KeyError naming the missing ones)."""
    index = {r: i for i, r in enumerate(have)}
    missing = [r for r in ids if r not in index]
    if missing:
        raise KeyError(f"{len(missing)} request(s) have no features here, e.g. {missing[:3]}")
    return [index[r] for r in ids]


class _FeatureFile:
    """save / load of a features dataclass as safetensors: its tensor fields, and in the metadata
    its meta, ids, layer field (`_LAYER`) and kind (`_KIND`); the constructor takes (ids, layer,
    *tensors in `_TENSORS` order, meta)."""
    _KIND: str
    _LAYER: str
    _TENSORS: tuple[str, ...]

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        meta = dict(self.meta, ids=self.ids, kind=self._KIND, **{self._LAYER: getattr(self, self._LAYER)})
        save_file({k: getattr(self, k).contiguous().cpu() for k in self._TENSORS}, str(path),
                  metadata={"trail": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        t, meta = _load(path, cls._KIND, device)
        return cls(meta.pop("ids"), meta.pop(cls._LAYER), *(t[k] for k in cls._TENSORS), meta)


@dataclass
class SampledFeatures(_FeatureFile):
    _KIND, _LAYER, _TENSORS = "sampled", "layers", ("feats", "g", "total_len", "hit_cap")
    ids: list[str]
    layers: list[int]
    feats: torch.Tensor      # fp16 [len(layers), N, S, d]
    g: torch.Tensor          # int32 [N, S]; -1 = empty slot
    total_len: torch.Tensor  # int32 [N]
    hit_cap: torch.Tensor    # bool [N]
    meta: dict = field(default_factory=dict)

    def layer(self, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not embedded (have {self.layers})")
        return self.feats[self.layers.index(layer)]

    def select(self, ids: Sequence[str]) -> "SampledFeatures":
        """The requests `ids`, in that order (KeyError naming the missing ones)."""
        rows = torch.tensor(_rows_of(self.ids, ids), dtype=torch.long)
        return SampledFeatures(list(ids), list(self.layers), self.feats[:, rows.to(self.feats.device)],
                               self.g[rows.to(self.g.device)], self.total_len[rows.to(self.total_len.device)],
                               self.hit_cap[rows.to(self.hit_cap.device)], dict(self.meta))

    def rows(self, select: torch.Tensor | None = None):
        """(request index, g, remaining) of the non-empty slots, in [N, S] order, restricted to
        the requests where `select` [N] is True."""
        valid = self.g >= 0
        if select is not None:
            valid &= select.to(valid.device)[:, None]
        req, slot = valid.nonzero(as_tuple=True)
        g = self.g[req, slot].long()
        return req, slot, g, self.total_len[req].long() - g


@dataclass
class DenseFeatures(_FeatureFile):
    _KIND, _LAYER, _TENSORS = "dense", "layer", ("feats", "cu", "total_len", "hit_cap")
    ids: list[str]
    layer: int
    feats: torch.Tensor      # fp16 [sum L, d]; request i's rows cu[i]:cu[i+1] are g = 0..L_i-1
    cu: torch.Tensor         # int64 [N + 1]
    total_len: torch.Tensor  # int32 [N]
    hit_cap: torch.Tensor    # bool [N]
    meta: dict = field(default_factory=dict)

    def request(self, i: int) -> torch.Tensor:
        return self.feats[int(self.cu[i]): int(self.cu[i + 1])]

    def select(self, ids: Sequence[str]) -> "DenseFeatures":
        """The requests `ids`, in that order (KeyError naming the missing ones)."""
        rows = _rows_of(self.ids, ids)
        if list(ids) == self.ids:
            return self
        cu = self.cu.long().cpu()
        lens = (cu[1:] - cu[:-1])[rows]
        new_cu = torch.zeros(len(rows) + 1, dtype=torch.int64)
        new_cu[1:] = lens.cumsum(0)
        gather = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in rows]) if rows else \
            torch.zeros(0, dtype=torch.long)
        dev = self.feats.device
        return DenseFeatures(list(ids), self.layer, self.feats[gather.to(dev)], new_cu.to(self.cu.device),
                             self.total_len[torch.tensor(rows, dtype=torch.long, device=self.total_len.device)],
                             self.hit_cap[torch.tensor(rows, dtype=torch.long, device=self.hit_cap.device)],
                             dict(self.meta))


def _load(path, kind, device):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = json.loads((f.metadata() or {}).get("trail", "{}"))
        if meta.get("kind") != kind:
            raise ValueError(f"{path}: expected {kind} features, found {meta.get('kind')!r}")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _check_trace(trace: Trace, lm) -> None:
    model = trace.settings.get("model")
    if model and model != lm.model_id:
        logger.warning("trace was collected with %s, embedding with %s", model, lm.model_id)


def embed_sampled(lm: hf_backend.LoadedModel, trace: Trace, layers: Sequence[int] | None = None,
                  num_decode: int = 16, seed: int = 0, max_tokens: int | None = None,
                  store_device: str | torch.device = "cpu", progress: bool = True) -> SampledFeatures:
    _check_trace(trace, lm)
    layers = sorted(set(range(lm.num_layers) if layers is None else layers))
    _check_layers(layers, lm.num_layers)
    recs = trace.records
    n, s, d = len(recs), 1 + num_decode, lm.hidden_size
    feats = torch.zeros(len(layers), n, s, d, dtype=torch.float16, device=store_device)
    g = torch.full((n, s), -1, dtype=torch.int32)
    for i, r in enumerate(recs):
        gs = [0] + sample_positions(r, num_decode, seed)
        g[i, : len(gs)] = torch.tensor(gs, dtype=torch.int32)
    slot_of = {layer: j for j, layer in enumerate(layers)}
    for idx, batch_g, states_by_layer in _run(lm, recs, layers, g, max_tokens, progress, "embed"):
        for layer, rows in states_by_layer.items():
            feats[slot_of[layer], idx.to(feats.device), : rows.shape[1]] = rows.to(store_device, torch.float16)
    return SampledFeatures([r.id for r in recs], layers, feats, g.to(store_device),
                           _lengths(recs, store_device), _caps(recs, store_device),
                           {"model": lm.model_id, "num_decode": num_decode, "seed": seed,
                            "max_new_tokens": trace.max_new_tokens})


def embed_dense(lm: hf_backend.LoadedModel, trace: Trace, layer: int, max_tokens: int | None = None,
                store_device: str | torch.device = "cpu", progress: bool = True,
                runner_tap=None) -> DenseFeatures:
    """Every g of every request at one layer; through our runner's tap when `runner_tap`
    (a runner_backend.RunnerTap on that layer) is given, else transformers."""
    _check_trace(trace, lm)
    _check_layers([layer], lm.num_layers)
    recs = trace.records
    lens = torch.tensor([r.output_len for r in recs], dtype=torch.int64)
    cu = torch.zeros(len(recs) + 1, dtype=torch.int64)
    cu[1:] = lens.cumsum(0)
    feats = torch.zeros(int(cu[-1]), lm.hidden_size, dtype=torch.float16, device=store_device)
    width = int(lens.max()) if len(recs) else 0
    g = torch.full((len(recs), width), -1, dtype=torch.int32)
    for i, r in enumerate(recs):
        g[i, : r.output_len] = torch.arange(r.output_len, dtype=torch.int32)
    if runner_tap is not None and runner_tap.layer != layer:
        raise ValueError(f"runner tap is on layer {runner_tap.layer}, features wanted from layer {layer}")
    for idx, batch_g, states_by_layer in _run(lm, recs, [layer], g, max_tokens, progress, "embed-dense",
                                              runner_tap):
        rows = states_by_layer[layer]
        for j, i in enumerate(idx.tolist()):
            feats[int(cu[i]): int(cu[i + 1])] = rows[j, : recs[i].output_len].to(store_device, torch.float16)
    return DenseFeatures([r.id for r in recs], layer, feats, cu.to(store_device),
                         _lengths(recs, store_device), _caps(recs, store_device),
                         {"model": lm.model_id, "max_new_tokens": trace.max_new_tokens})


def _lengths(recs, device):
    return torch.tensor([r.output_len for r in recs], dtype=torch.int32, device=device)


def _caps(recs, device):
    return torch.tensor([r.hit_cap for r in recs], dtype=torch.bool, device=device)


def _check_layers(layers, n):
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")


def _run(lm, recs, layers, g, max_tokens, progress, desc, runner_tap=None):
    """Yields (request indices, their g rows, {layer: fp32 [B, S, d]}) per batch, where slot s of
    row b is the probe input at g[b, s] (g = 0: prompt mean; empty slots are zeros)."""
    seqs = [fed_tokens(r) for r in recs]
    if max_tokens is None:
        max_tokens = 65536 if lm.device.type == "cuda" else 4096
    bar = tqdm(total=len(recs), desc=desc, unit="req", disable=not progress)
    for batch in hf_backend.length_batches([len(s) for s in seqs], max_tokens, max_batch=256):
        idx = torch.tensor(batch)
        bg = g[idx].to(lm.device).long()
        plen = torch.tensor([len(recs[i].prompt_ids) for i in batch], device=lm.device)
        out: dict[int, torch.Tensor] = {}

        def consume(layer, states, bg=bg, plen=plen, out=out):
            out[layer] = probe_inputs(states, plen, bg)

        capture_layers(lm, [seqs[i] for i in batch], layers, consume, runner_tap)
        yield idx, bg, out
        bar.update(len(batch))
    bar.close()


def probe_inputs(states: torch.Tensor, prompt_len: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """From padded states [B, T, d]: fp32 [B, S, d] with slot s = prompt mean where g == 0, the
    state at position P + g - 1 where g > 0, zeros where g < 0."""
    b, t, d = states.shape
    pos = torch.arange(t, device=states.device)
    pmask = (pos[None, :] < prompt_len[:, None]).float()
    mean = torch.einsum("bt,btd->bd", pmask, states.float()) / prompt_len[:, None].float()
    at = (prompt_len[:, None] + g - 1).clamp(0, t - 1)
    gathered = torch.gather(states, 1, at[..., None].expand(-1, -1, d)).float()
    out = torch.where((g == 0)[..., None], mean[:, None, :], gathered)
    return out * (g >= 0)[..., None]


def capture_layers(lm, seqs, layers, consume, runner_tap=None) -> None:
    """The one place the forward used for features is chosen."""
    if runner_tap is not None:
        consume(runner_tap.layer, runner_tap.padded_states(seqs))
    else:
        hf_backend.forward_layers(lm, seqs, layers, consume)
