"""One engine step on the model: segments in, next tokens (and the layer-L tap) out.

    runner = ModelRunner(model, kv_cache, tap_layer=L)
    out = runner.step([Segment(slot, token_ids, start, "prefill", sample=is_last_chunk, params), ...])
    out.next_tokens   int64 [R] on the device, one per segment with sample=True (in segment order;
                      out.sampled lists those segments' indices)
    out.tap           LayerTap(states [T, d], cu_seqlens int32 [S+1], slot_ids int32 [S], ...)

A segment is one request's tokens this step: `start` tokens of its slot are already in the cache
(0 for a fresh prefill; > 0 for a later prefill chunk, a recompute or a decode) and the segment's
tokens take positions start .. start+len-1. Blocks for all of them must already be mapped in
`kv_cache.block_tables[slot]`.

The batch description is built on the host and copied to the device once per step (one packed
buffer); nothing in `forward` or `sample` reads device memory back, so the engine's one sync is
its own read of `next_tokens`.

Repetition penalty needs every token a request has fed to the model; the runner keeps a
`[max_slots, vocab]` bool mask on the device, set as tokens pass through `forward` and cleared when
a slot starts over (start == 0). A request that moves to another slot with tokens already cached
(e.g. swap-in to a new slot) must call `rebind_slot(slot, all_its_tokens)` first.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import trail
from trail.models.llama import AttentionMetadata, LlamaModel
from trail.sampling import GREEDY, counter_uniform, sample, validate_params

PREFILL, DECODE = "prefill", "decode"


@dataclass
class Segment:
    slot: int
    token_ids: Sequence[int]
    start: int
    kind: str = PREFILL
    sample: bool = True          # draw a next token after this segment (False: a non-final chunk)
    params: object | None = None  # temperature, top_p, top_k, repetition_penalty, seed (None: greedy)


@dataclass
class LayerTap:
    """Layer-`layer` states of every token this step (DESIGN.md layer convention)."""
    layer: int
    states: torch.Tensor         # [T, hidden], model dtype
    cu_seqlens: torch.Tensor     # int32 [S + 1]
    slot_ids: torch.Tensor       # int32 [S]
    starts: torch.Tensor         # int32 [S], position of each segment's first token
    is_decode: torch.Tensor      # bool [S]
    sampled: torch.Tensor        # bool [S], segment is a request's last prefill chunk or a decode


@dataclass
class StepBatch:
    """Device tensors of one step (views into one copied buffer) and the host-side bounds."""
    input_ids: torch.Tensor
    meta: AttentionMetadata
    token_slots: torch.Tensor
    starts: torch.Tensor
    is_decode: torch.Tensor
    sampled_mask: torch.Tensor
    logits_indices: torch.Tensor
    sample_slots: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    uniforms: torch.Tensor
    reset_slots: torch.Tensor
    sampled: list[int]           # host: indices of the segments that sample
    num_tokens: int


@dataclass
class StepOutput:
    next_tokens: torch.Tensor    # int64 [R]
    sampled: list[int]
    tap: LayerTap | None
    batch: StepBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache, tap_layer: int | None = None, seed: int = 0):
        cfg = model.config
        spec = kv_cache.spec
        if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
            raise ValueError(f"KV cache spec {spec} does not fit the model (layers={cfg.num_layers}, "
                             f"kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim})")
        if tap_layer is not None and not 0 <= tap_layer < cfg.num_layers:
            raise ValueError(f"tap_layer={tap_layer} out of range [0, {cfg.num_layers})")
        self.model, self.kv_cache, self.config = model, kv_cache, cfg
        self.device = kv_cache.device
        self.tap_layer = tap_layer
        self.block_size = kv_cache.block_size
        self.max_slots, self.max_blocks = kv_cache.block_tables.shape
        self.max_context = self.max_blocks * self.block_size
        self.seen = torch.zeros(self.max_slots, cfg.vocab_size, dtype=torch.bool, device=self.device)
        self._rng = random.Random(seed)
        self._pin = self.device.type == "cuda"

    # ---- host side ------------------------------------------------------------------------
    def _check(self, segments: Sequence[Segment]) -> None:
        if not segments:
            raise ValueError("a step needs at least one segment")
        slots = set()
        for i, s in enumerate(segments):
            n = len(s.token_ids)
            if not 0 <= s.slot < self.max_slots:
                raise ValueError(f"segment {i}: slot {s.slot} out of range [0, {self.max_slots})")
            if s.slot in slots:
                raise ValueError(f"segment {i}: slot {s.slot} appears twice in one step")
            slots.add(s.slot)
            if s.kind not in (PREFILL, DECODE):
                raise ValueError(f"segment {i}: kind {s.kind!r} is not 'prefill' or 'decode'")
            if n == 0 or (s.kind == DECODE and n != 1):
                raise ValueError(f"segment {i}: {n} tokens (a decode has 1, a prefill at least 1)")
            if s.start < 0 or s.start + n > self.max_context:
                raise ValueError(f"segment {i}: positions {s.start}..{s.start + n - 1} outside the "
                                 f"slot's capacity {self.max_context}")
            window = self.config.sliding_window
            if window is not None and s.start + n > window:
                raise NotImplementedError(f"segment {i}: context {s.start + n} exceeds the sliding "
                                          f"window {window}, which is not implemented")
            if s.sample and s.params is not None:
                validate_params(s.params)

    def prepare(self, segments: Sequence[Segment]) -> StepBatch:
        self._check(segments)
        S = len(segments)
        lens = np.fromiter((len(s.token_ids) for s in segments), np.int64, S)
        starts = np.fromiter((s.start for s in segments), np.int64, S)
        cu = np.zeros(S + 1, np.int64)
        np.cumsum(lens, out=cu[1:])
        T = int(cu[-1])
        ids = np.concatenate([np.asarray(s.token_ids, dtype=np.int64) for s in segments])
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        positions = np.repeat(starts - cu[:-1], lens) + np.arange(T)
        slots = np.fromiter((s.slot for s in segments), np.int64, S)
        sampled = [i for i, s in enumerate(segments) if s.sample]
        R = len(sampled)
        params = [segments[i].params or GREEDY for i in sampled]
        new_pos = [int(starts[i] + lens[i]) for i in sampled]
        seeds = [p.seed if p.seed is not None else self._rng.getrandbits(63) for p in params]
        is_decode = np.fromiter((s.kind == DECODE for s in segments), np.int64, S)
        sampled_mask = np.zeros(S, np.int64)
        sampled_mask[sampled] = 1

        ints = [ids, positions, np.repeat(slots, lens), cu, starts + lens, slots, starts, is_decode,
                sampled_mask, cu[1:][sampled] - 1, slots[sampled],
                np.array([p.top_k for p in params], np.int64), slots[starts == 0]]
        floats = [np.array([p.temperature for p in params], np.float64),
                  np.array([p.top_p for p in params], np.float64),
                  np.array([p.repetition_penalty for p in params], np.float64),
                  np.array([counter_uniform(s, c) for s, c in zip(seeds, new_pos)], np.float64)]
        parts = ints + [f.view(np.int64) for f in floats]
        host = torch.from_numpy(np.concatenate(parts))
        if self._pin:
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        views, off = [], 0
        for p in parts:
            views.append(dev[off:off + len(p)])
            off += len(p)
        (input_ids, positions_d, token_slots, cu_d, ctx_d, slots_d, starts_d, dec_d, smask_d,
         logits_idx, sample_slots, top_k, reset_slots) = views[:len(ints)]
        temperature, top_p, penalty, uniforms = (v.view(torch.float64) for v in views[len(ints):])
        token_slots = token_slots.to(torch.int32)
        slots_d = slots_d.to(torch.int32)
        block_tables = self.kv_cache.block_tables
        slot_mapping = trail.ops.slot_mapping(block_tables, token_slots, positions_d, self.block_size)
        meta = AttentionMetadata(
            positions=positions_d, slot_mapping=slot_mapping, block_tables=block_tables,
            slot_ids=slots_d, cu_seqlens_q=cu_d.to(torch.int32), context_lens=ctx_d.to(torch.int32),
            max_seqlen_q=int(lens.max()), max_context_len=int((starts + lens).max()),
            decode_only=bool((lens == 1).all()))
        return StepBatch(
            input_ids=input_ids, meta=meta, token_slots=token_slots, starts=starts_d.to(torch.int32),
            is_decode=dec_d.bool(), sampled_mask=smask_d.bool(), logits_indices=logits_idx,
            sample_slots=sample_slots, temperature=temperature.float(), top_k=top_k,
            top_p=top_p.float(), repetition_penalty=penalty.float(), uniforms=uniforms,
            reset_slots=reset_slots, sampled=sampled, num_tokens=T)

    # ---- device side -----------------------------------------------------------------------
    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, LayerTap | None]:
        """-> (logits fp32 [R, vocab] of the sampling segments' last tokens, layer tap or None)."""
        self.seen.index_fill_(0, batch.reset_slots, False)
        # a flat scatter: indexed assignment (index_put_) checks its indices with a host sync
        flat = batch.token_slots.long() * self.seen.shape[1] + batch.input_ids
        self.seen.view(-1).scatter_(0, flat, True)
        logits, states = self.model(batch.input_ids, batch.meta, self.kv_cache,
                                    logits_indices=batch.logits_indices, tap_layer=self.tap_layer)
        tap = None
        if states is not None:
            tap = LayerTap(self.tap_layer, states, batch.meta.cu_seqlens_q, batch.meta.slot_ids,
                           batch.starts, batch.is_decode, batch.sampled_mask)
        return logits, tap

    def sample(self, logits: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        seen = self.seen.index_select(0, batch.sample_slots)
        return sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.repetition_penalty,
                      batch.uniforms, seen)

    def step(self, segments: Sequence[Segment]) -> StepOutput:
        batch = self.prepare(segments)
        logits, tap = self.forward(batch)
        return StepOutput(self.sample(logits, batch), batch.sampled, tap, batch)

    def rebind_slot(self, slot: int, token_ids: Sequence[int]) -> None:
        """The repetition-penalty history of `slot` becomes exactly `token_ids`."""
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")
        ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        self.seen[slot] = False
        self.seen[slot, ids.to(self.device)] = True
