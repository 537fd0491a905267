"""One engine step on the model: a batch plan in (numpy columns), next tokens and the layer-L tap
out.

The batch contract (shared with the scheduler's plan and the probe kernel): `BatchPlan` holds one
row per request of the step, as numpy columns — slot, row flags (`trail_kernels.row_flags`), start
(tokens of the slot already in the cache), number of tokens — and the step's token ids
concatenated. Rows with the SAMPLE flag draw a next token (in row order); their sampling
parameters are per slot, written once when a request is admitted (`set_sampling`), never per
step. No per-request Python objects are touched on this path.

    runner = ModelRunner(model, kv_cache, tap_layer=L)
    runner.set_sampling(slot, params)               # at admission
    out = runner.execute(plan)                      # commits the block tables itself
    out.next_tokens   int64 [R] on the device, one per SAMPLE row (out.sampled: their row indices)
    out.tap           LayerTap(states [T, d], cu_seqlens int32 [S+1], slot_ids int32 [S], ...)

`step(segments)` is the same path for callers that think in `Segment`s (tests, teacher forcing).

The runner commits the KV block tables before the forward and checks, on the host, that every
row's positions are mapped (a forgotten allocation would otherwise read block 0). The batch is
built on the host and copied to the device once per step; nothing in `forward` or `sample` reads
device memory back, so the engine's one sync is its own read of `next_tokens`.

Repetition penalty needs every token a request has fed to the model; the runner keeps a
`[max_slots, vocab]` bool mask on the device, set as tokens pass through `forward` and cleared when
a slot starts over (a row starting at position 0: a new request or a recompute, which re-feeds
prompt + generated tokens). Requests never move between slots.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import trail
from trail.models.llama import AttentionMetadata, LlamaModel
from trail.sampling import GREEDY, apply_repetition_penalty, counter_uniforms, sample, validate_params
from trail_kernels import row_flags

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
class BatchPlan:
    """One step's rows as numpy columns (int64): slots (distinct), flags, starts, num_tokens, and
    token_ids [sum num_tokens] concatenated in row order. num_generated / max_new_tokens are the
    probe's per-row counts (trail_kernels.probe), carried to the device in the same copy."""
    slots: np.ndarray
    flags: np.ndarray
    starts: np.ndarray
    num_tokens: np.ndarray
    token_ids: np.ndarray
    num_generated: np.ndarray | None = None
    max_new_tokens: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.slots)


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
    flags: torch.Tensor | None = None   # int32 [S], row flags
    num_generated: torch.Tensor | None = None    # int32 [S], the probe's per-row counts
    max_new_tokens: torch.Tensor | None = None   # int32 [S]


@dataclass
class StepBatch:
    """Device tensors of one step (views into one copied buffer) and the host-side bounds."""
    input_ids: torch.Tensor
    meta: AttentionMetadata
    token_slots: torch.Tensor
    starts: torch.Tensor
    is_decode: torch.Tensor
    sampled_mask: torch.Tensor
    flags: torch.Tensor
    logits_indices: torch.Tensor
    sample_slots: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    uniforms: torch.Tensor
    reset_slots: torch.Tensor
    num_generated: torch.Tensor
    max_new_tokens: torch.Tensor
    sampled: list[int]           # host: indices of the rows that sample
    num_tokens: int
    all_greedy: bool = False     # host: every sampling row is greedy (argmax, no sort)


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
        # per-slot sampling parameters, written at admission (set_sampling)
        n = self.max_slots
        self.temperature = np.zeros(n, np.float64)
        self.top_p = np.ones(n, np.float64)
        self.top_k = np.zeros(n, np.int64)
        self.repetition_penalty = np.ones(n, np.float64)
        self.seed = np.zeros(n, np.uint64)

    # ---- per-slot sampling parameters ---------------------------------------------------------
    def set_sampling(self, slot: int, params=None) -> None:
        """The slot's sampling parameters until the next call (None: greedy). A request without
        a seed gets one drawn here, so its draws do not depend on its batch."""
        p = params or GREEDY
        self.temperature[slot] = p.temperature
        self.top_p[slot] = p.top_p
        self.top_k[slot] = p.top_k
        self.repetition_penalty[slot] = p.repetition_penalty
        self.seed[slot] = p.seed if p.seed is not None else self._rng.getrandbits(63)

    # ---- host side ------------------------------------------------------------------------
    def plan_from_segments(self, segments: Sequence[Segment]) -> BatchPlan:
        """Checks `segments` (nothing changes on a bad one) and turns them into a BatchPlan,
        setting each sampling segment's slot parameters."""
        if not segments:
            raise ValueError("a step needs at least one segment")
        slots = set()
        for i, s in enumerate(segments):
            n = len(s.token_ids)
            if s.slot in slots:
                raise ValueError(f"segment {i}: slot {s.slot} appears twice in one step")
            slots.add(s.slot)
            if s.kind not in (PREFILL, DECODE):
                raise ValueError(f"segment {i}: kind {s.kind!r} is not 'prefill' or 'decode'")
            if n == 0 or (s.kind == DECODE and n != 1):
                raise ValueError(f"segment {i}: {n} tokens (a decode has 1, a prefill at least 1)")
            if s.sample and s.params is not None:
                validate_params(s.params)
        flags = []
        for s in segments:
            if s.kind == DECODE:
                flags.append(row_flags.SAMPLE)
            else:
                flags.append(row_flags.PREFILL | (row_flags.FIRST_CHUNK if s.start == 0 else 0)
                             | ((row_flags.LAST_CHUNK | row_flags.SAMPLE) if s.sample else 0))
        plan = BatchPlan(np.array([s.slot for s in segments], np.int64), np.array(flags, np.int64),
                         np.array([s.start for s in segments], np.int64),
                         np.array([len(s.token_ids) for s in segments], np.int64),
                         np.concatenate([np.asarray(s.token_ids, dtype=np.int64) for s in segments]))
        self.check_plan(plan)
        for s in segments:
            if s.sample:
                self.set_sampling(s.slot, s.params)
        return plan

    def check_plan(self, plan: BatchPlan) -> None:
        """Shapes, ranges and block mappings (host state only: no device reads)."""
        S = plan.num_rows
        if S == 0:
            raise ValueError("a step needs at least one row")
        for name in ("flags", "starts", "num_tokens"):
            if len(getattr(plan, name)) != S:
                raise ValueError(f"BatchPlan.{name} has {len(getattr(plan, name))} rows, slots {S}")
        if plan.slots.min() < 0 or plan.slots.max() >= self.max_slots:
            raise ValueError(f"slots must lie in [0, {self.max_slots}), got {plan.slots.tolist()}")
        if len(np.unique(plan.slots)) != S:
            raise ValueError(f"a slot appears twice in one step: {plan.slots.tolist()}")
        if plan.num_tokens.min() < 1 or plan.starts.min() < 0:
            raise ValueError("every row needs >= 1 token and a start >= 0")
        if int(plan.num_tokens.sum()) != len(plan.token_ids):
            raise ValueError(f"{len(plan.token_ids)} token ids for rows of {int(plan.num_tokens.sum())} tokens")
        ends = plan.starts + plan.num_tokens
        if ends.max() > self.max_context:
            raise ValueError(f"positions up to {int(ends.max())} exceed a slot's capacity {self.max_context}")
        window = self.config.sliding_window
        if window is not None and ends.max() > window:
            raise NotImplementedError(f"context {int(ends.max())} exceeds the sliding window {window}, "
                                      "which is not implemented")
        ids = plan.token_ids
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")

    def _check_mapped(self, plan: BatchPlan) -> None:
        need = -(-(plan.starts + plan.num_tokens) // self.block_size)
        short = np.flatnonzero(self.kv_cache.mapped_blocks(plan.slots) < need)
        if short.size:
            i = int(short[0])
            raise RuntimeError(f"slot {int(plan.slots[i])}: positions up to {int(plan.starts[i] + plan.num_tokens[i])} "
                               f"need {int(need[i])} KV blocks but {int(self.kv_cache.mapped_blocks(plan.slots[i:i + 1])[0])} "
                               f"are mapped (allocate before the step)")

    def prepare_plan(self, plan: BatchPlan) -> StepBatch:
        """Commits the block tables, checks the plan's blocks are mapped, and copies the batch to
        the device in one packed buffer."""
        self.kv_cache.commit_block_tables()
        self._check_mapped(plan)
        S = plan.num_rows
        lens, starts, slots, flags = plan.num_tokens, plan.starts, plan.slots, plan.flags
        cu = np.zeros(S + 1, np.int64)
        np.cumsum(lens, out=cu[1:])
        T = int(cu[-1])
        positions = np.repeat(starts - cu[:-1], lens) + np.arange(T)
        sampled = np.flatnonzero(flags & row_flags.SAMPLE)
        sample_slots = slots[sampled]
        new_pos = starts[sampled] + lens[sampled]
        temperature = self.temperature[sample_slots]
        uniforms = np.where(temperature > 0, counter_uniforms(self.seed[sample_slots], new_pos.astype(np.uint64)), 0.5)
        is_decode = (flags & row_flags.PREFILL) == 0
        sampled_mask = np.zeros(S, np.int64)
        sampled_mask[sampled] = 1

        ints = [plan.token_ids, positions, np.repeat(slots, lens), cu, starts + lens, slots, starts,
                is_decode.astype(np.int64), sampled_mask, flags, cu[1:][sampled] - 1, sample_slots,
                self.top_k[sample_slots], slots[starts == 0],
                np.zeros(S, np.int64) if plan.num_generated is None else plan.num_generated,
                np.zeros(S, np.int64) if plan.max_new_tokens is None else plan.max_new_tokens]
        floats = [temperature, self.top_p[sample_slots], self.repetition_penalty[sample_slots], uniforms]
        parts = ints + [np.ascontiguousarray(f, dtype=np.float64).view(np.int64) for f in floats]
        host = torch.from_numpy(np.concatenate(parts))
        if self._pin:
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        views, off = [], 0
        for p in parts:
            views.append(dev[off:off + len(p)])
            off += len(p)
        (input_ids, positions_d, token_slots, cu_d, ctx_d, slots_d, starts_d, dec_d, smask_d, flags_d,
         logits_idx, sample_slots_d, top_k, reset_slots, num_gen_d, max_new_d) = views[:len(ints)]
        temperature_d, top_p, penalty, uniforms_d = (v.view(torch.float64) for v in views[len(ints):])
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
            is_decode=dec_d.bool(), sampled_mask=smask_d.bool(), flags=flags_d.to(torch.int32),
            logits_indices=logits_idx, sample_slots=sample_slots_d, temperature=temperature_d.float(),
            top_k=top_k, top_p=top_p.float(), repetition_penalty=penalty.float(), uniforms=uniforms_d,
            reset_slots=reset_slots, num_generated=num_gen_d.to(torch.int32), max_new_tokens=max_new_d.to(torch.int32),
            sampled=sampled.tolist(), num_tokens=T, all_greedy=bool((temperature <= 0).all()))

    def prepare(self, segments: Sequence[Segment]) -> StepBatch:
        return self.prepare_plan(self.plan_from_segments(segments))

    # ---- device side -----------------------------------------------------------------------
    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, LayerTap | None]:
        """-> (logits fp32 [R, vocab] of the sampling rows' last tokens, layer tap or None)."""
        self.seen.index_fill_(0, batch.reset_slots, False)
        # a flat scatter: indexed assignment (index_put_) checks its indices with a host sync
        flat = batch.token_slots.long() * self.seen.shape[1] + batch.input_ids
        self.seen.view(-1).scatter_(0, flat, True)
        logits, states = self.model(batch.input_ids, batch.meta, self.kv_cache,
                                    logits_indices=batch.logits_indices, tap_layer=self.tap_layer)
        tap = None
        if states is not None:
            tap = LayerTap(self.tap_layer, states, batch.meta.cu_seqlens_q, batch.meta.slot_ids,
                           batch.starts, batch.is_decode, batch.sampled_mask, batch.flags,
                           batch.num_generated, batch.max_new_tokens)
        return logits, tap

    def sample(self, logits: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        seen = self.seen.index_select(0, batch.sample_slots)
        if batch.all_greedy:      # no full-vocabulary sort when no row samples
            return torch.argmax(apply_repetition_penalty(logits.float(), seen, batch.repetition_penalty), dim=-1)
        return sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.repetition_penalty,
                      batch.uniforms, seen)

    def execute(self, plan: BatchPlan) -> StepOutput:
        batch = self.prepare_plan(plan)
        logits, tap = self.forward(batch)
        return StepOutput(self.sample(logits, batch), batch.sampled, tap, batch)

    def step(self, segments: Sequence[Segment]) -> StepOutput:
        return self.execute(self.plan_from_segments(segments))
