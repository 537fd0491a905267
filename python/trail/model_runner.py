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
written by numpy into the runner's persistent `StepBuffers` (a pinned staging area with fixed
column views) and copied to their device mirror once per step; the slot mapping is computed on
the device; nothing in `forward` or `sample` reads device memory back, so the engine's one sync is
its own read of `next_tokens`. A `StepBatch` holds views of those buffers: it is valid until the
next `prepare_plan`.

CUDA graphs (`capture_graphs`, never on CPU): decode-only steps run as one graph per batch bucket,
steps with prefill work as one graph per token bucket of `mixed_rows` rows (slot mapping ->
forward -> layer tap -> the attached probe -> sampler, greedy and sampling variants). A step is
padded to its bucket: pad rows have one token on no KV slot (slot mapping -1), context 0
(attention reads nothing), the probe's scratch slot, the scratch row of `seen` and greedy
parameters; a mixed graph's last pad row also holds the spare tokens. Larger steps run eager.

Repetition penalty needs every token a request has fed to the model; the runner keeps a
`[max_slots, vocab]` bool mask on the device, set as tokens pass through `forward` and cleared when
a slot starts over (a row starting at position 0: a new request or a recompute, which re-feeds
prompt + generated tokens). Requests never move between slots.
"""
from __future__ import annotations

import bisect
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

import trail
from trail.models.llama import AttentionMetadata, LlamaModel
from trail.sampling import (GREEDY, MAX_CANDIDATES, apply_repetition_penalty, counter_uniforms, sample,
                            sample_reference, validate_params)
from trail_kernels import row_flags
from trail_kernels.probe import probe_step

logger = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"


def _no_mark(phase: str, device: bool = False) -> None:
    pass


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
    token_ids [sum num_tokens] concatenated in row order (-1 in a decode row: the slot's last
    sampled token, read on the device: the engine's overlapped loop has not seen it on the host
    yet). num_generated / max_new_tokens are the
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
    """Device tensors of one step (fixed views into the runner's device mirror, valid until the
    next `prepare_plan`) and the host-side bounds."""
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
    probe_slots: torch.Tensor | None = None    # int32 [S], the probe's slot per row (pads: scratch)
    exact_sampler: bool = False  # host: a row's top_k exceeds MAX_CANDIDATES (sorted sampler)
    graph: tuple[str, int, bool] | None = None  # (kind, bucket, greedy) when a captured graph runs the step
    num_real_rows: int = 0       # rows of the plan (the rest are padding)


@dataclass
class StepOutput:
    next_tokens: torch.Tensor    # int64 [R]
    sampled: list[int]
    tap: LayerTap | None
    batch: StepBatch
    expected: torch.Tensor | None = None   # the probe's expected remaining by slot (None: no probe)


DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def graph_batch_sizes(max_batch: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The decode batch sizes captured as CUDA graphs: `sizes` (default DEFAULT_GRAPH_SIZES) below
    `max_batch`, plus `max_batch` itself, so every decode batch has a bucket."""
    base = DEFAULT_GRAPH_SIZES if sizes is None else sizes
    return sorted({int(b) for b in base if 1 <= b < max_batch} | {max_batch})


MAX_MIXED_GRAPH_TOKENS = 8192


def mixed_token_sizes(max_tokens: int, rows: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The token buckets of the mixed-step graphs (`rows` rows each): `sizes`, or a ladder from
    just above `rows` growing by ~1.25x (multiples of 16, so a step pads by at most ~25%) up to
    min(max_tokens, MAX_MIXED_GRAPH_TOKENS) + rows (a step of up to `max_tokens` tokens plus one
    token per pad row). Larger steps run eager."""
    if sizes is not None:
        return sorted({int(t) for t in sizes})
    top = min(max_tokens, MAX_MIXED_GRAPH_TOKENS) + rows
    out, t = [], -(-(rows + 16) // 16) * 16
    while t < top:
        out.append(t)
        t = max(t + 16, round(t * 1.25 / 16) * 16)
    return out + [top]


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest size >= n in sorted `sizes` (None: above all of them)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


# (name, numpy dtype, per token / per row / per row + 1)
_COLUMNS = (
    ("input_ids", np.int64, "T"), ("positions", np.int64, "T"),
    ("token_slots", np.int32, "T"),
    ("cu", np.int32, "R1"), ("ctx", np.int32, "R"), ("attn_slots", np.int32, "R"), ("probe_slots", np.int32, "R"),
    ("starts", np.int32, "R"), ("flags", np.int32, "R"), ("num_gen", np.int32, "R"), ("max_new", np.int32, "R"),
    ("is_decode", np.uint8, "R"), ("sampled_mask", np.uint8, "R"),
    ("logits_idx", np.int64, "R"), ("sample_slots", np.int64, "R"), ("top_k", np.int64, "R"),
    ("reset_slots", np.int64, "R"),
    ("temperature", np.float32, "R"), ("top_p", np.float32, "R"), ("penalty", np.float32, "R"),
    ("uniforms", np.float64, "R"),
)
_TORCH = {np.int64: torch.int64, np.int32: torch.int32, np.uint8: torch.bool, np.float32: torch.float32,
          np.float64: torch.float64}


class StepBuffers:
    """The runner's persistent step buffers: one host staging area (pinned on CUDA) with a fixed
    numpy view per column, one device mirror with the same layout and fixed torch views, sized for
    `max_tokens` tokens and `max_rows` rows. A step fills the host views in place and copies the
    mirror's bytes once; on CPU the mirror is the staging area itself (no copy)."""

    ALIGN = 64

    def __init__(self, max_tokens: int, max_rows: int, device: torch.device):
        self.max_tokens, self.max_rows, self.device = max_tokens, max_rows, device
        n = {"T": max_tokens, "R": max_rows, "R1": max_rows + 1}
        layout, off = {}, 0
        for name, dt, kind in _COLUMNS:
            size = np.dtype(dt).itemsize * n[kind]
            layout[name] = (off, dt, n[kind])
            off += -(-size // self.ALIGN) * self.ALIGN
        self.nbytes = off
        cuda = device.type == "cuda"
        self.host = torch.zeros(off, dtype=torch.uint8, pin_memory=cuda)
        self.dev = torch.zeros(off, dtype=torch.uint8, device=device) if cuda else self.host
        raw = self.host.numpy()
        self.np: dict[str, np.ndarray] = {}
        self.t: dict[str, torch.Tensor] = {}
        for name, (o, dt, count) in layout.items():
            size = np.dtype(dt).itemsize * count
            self.np[name] = raw[o:o + size].view(dt)
            self.t[name] = self.dev[o:o + size].view(_TORCH[dt])
        self._copied = torch.cuda.Event() if cuda else None
        self._pending = False

    def wait_reusable(self) -> None:
        """Before the host views are rewritten: the last copy out of them must be done. In the
        engine it always is (the step's sync comes after it); only back-to-back prepares wait."""
        if self._pending and not self._copied.query():
            self._copied.synchronize()
        self._pending = False

    def upload(self) -> None:
        if self._copied is None:
            return
        self.dev.copy_(self.host, non_blocking=True)
        self._copied.record()
        self._pending = True


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache, tap_layer: int | None = None, seed: int = 0, *,
                 max_tokens: int = 256, max_rows: int | None = None):
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
        # row max_slots is a scratch row for padded rows (CUDA-graph buckets)
        self.seen = torch.zeros(self.max_slots + 1, cfg.vocab_size, dtype=torch.bool, device=self.device)
        # each slot's last sampled token (row max_slots: pads), the input of its next decode
        self.last_tokens = torch.zeros(self.max_slots + 1, dtype=torch.int64, device=self.device)
        self._rng = random.Random(seed)
        # per-slot sampling parameters, written at admission (set_sampling); index max_slots = pads
        n = self.max_slots + 1
        self.temperature = np.zeros(n, np.float64)
        self.top_p = np.ones(n, np.float64)
        self.top_k = np.zeros(n, np.int64)
        self.repetition_penalty = np.ones(n, np.float64)
        self.seed = np.zeros(n, np.uint64)
        self.buffers = StepBuffers(max_tokens, max_rows or min(self.max_slots, 64), self.device)
        self._arange = np.arange(max(max_tokens, self.buffers.max_rows) + 1, dtype=np.int64)
        model.rope().ensure(self.max_context)      # RoPE table sized once, for every position
        # CUDA graphs (capture_graphs); the probe they run
        self.probe = self.probe_state = None
        self.graph_sizes: list[int] = []            # decode graphs: batch buckets
        self.mixed_token_sizes: list[int] = []      # mixed graphs: token buckets, of mixed_rows rows
        self.mixed_rows = 0
        self._graphs: dict[tuple[str, int, bool], tuple] = {}
        self._graph_batches: dict[tuple[str, int], StepBatch] = {}

    def attach_probe(self, params, state) -> None:
        """The length probe (ProbeParams, ProbeState) that every step runs after the forward, in
        a captured graph or eagerly (`execute`)."""
        if self._graphs:
            raise RuntimeError("attach the probe before capturing graphs")
        self.probe, self.probe_state = params, state

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

    # ---- host side: the step's batch in the persistent buffers --------------------------------
    def _ensure_capacity(self, tokens: int, rows: int) -> None:
        b = self.buffers
        if tokens <= b.max_tokens and rows <= b.max_rows:
            return
        if self._graphs:
            logger.warning("a step of %d tokens / %d rows exceeds the step buffers (%d / %d): CUDA graphs dropped, "
                           "steps run eager", tokens, rows, b.max_tokens, b.max_rows)
            self._graphs.clear()
            self._graph_batches.clear()
            self.graph_sizes, self.mixed_token_sizes, self.mixed_rows = [], [], 0
        b.wait_reusable()
        self.buffers = StepBuffers(max(tokens, 2 * b.max_tokens), max(rows, min(2 * b.max_rows, self.max_slots)),
                                   self.device)
        self._arange = np.arange(max(self.buffers.max_tokens, self.buffers.max_rows) + 1, dtype=np.int64)

    def _stage(self, plan: BatchPlan, rows: int, tokens: int | None = None) -> tuple[int, np.ndarray, int, int]:
        """Fills the host views with `plan` padded to `rows` rows (each pad: one token on no KV
        slot, context 0, the probe's scratch slot, the scratch `seen` row, greedy) and copies them
        to the device. `tokens` (a mixed-step graph's static shape): pad to exactly that many
        tokens (the extra ones go to the last pad row), and give every row a sampling entry and a
        reset entry (pads: the scratch slot). -> (tokens incl. pads, sampling rows of the plan,
        sampling entries, reset entries)."""
        S = plan.num_rows
        P = rows - S
        lens, starts, slots, flags = plan.num_tokens, plan.starts, plan.slots, plan.flags
        cu = np.zeros(S + 1, np.int64)
        np.cumsum(lens, out=cu[1:])
        T = int(cu[-1])
        Tt = T + P if tokens is None else tokens
        if Tt < T + P or (Tt > T + P and P == 0):
            raise ValueError(f"cannot pad {S} rows / {T} tokens to {rows} rows / {Tt} tokens")
        self._ensure_capacity(Tt, rows)
        buf = self.buffers
        buf.wait_reusable()
        c, ar, pad_slot = buf.np, self._arange, self.max_slots
        token_slots = np.repeat(slots, lens)
        c["input_ids"][:T] = plan.token_ids
        c["input_ids"][T:Tt] = 0
        c["positions"][:T] = np.repeat(starts - cu[:-1], lens) + ar[:T]
        c["positions"][T:Tt] = 0
        c["token_slots"][:T] = token_slots
        c["token_slots"][T:Tt] = -1
        c["cu"][:S + 1] = cu
        c["cu"][S + 1:rows + 1] = T + ar[1:P + 1]
        c["cu"][rows] = Tt
        for name, real, pad in (("ctx", starts + lens, 0), ("attn_slots", slots, 0), ("probe_slots", slots, pad_slot),
                                ("starts", starts, 0), ("flags", flags, row_flags.SAMPLE),
                                ("num_gen", 0 if plan.num_generated is None else plan.num_generated, 0),
                                ("max_new", 0 if plan.max_new_tokens is None else plan.max_new_tokens, 0),
                                ("is_decode", (flags & row_flags.PREFILL) == 0, 1),
                                ("sampled_mask", (flags & row_flags.SAMPLE) != 0, 1)):
            c[name][:S] = real
            c[name][S:rows] = pad
        # sampling entries: the plan's sampling rows, in row order, then the pads (a mixed graph:
        # one entry per row, the rest on the first pad token)
        sampled = np.flatnonzero(flags & row_flags.SAMPLE)
        n = len(sampled)
        N = n + P if tokens is None else rows
        c["logits_idx"][:n] = cu[1:][sampled] - 1
        c["logits_idx"][n:N] = T + np.minimum(ar[:N - n], P - 1)
        ss = c["sample_slots"]
        ss[:n] = slots[sampled]
        ss[n:N] = pad_slot
        pslots = ss[:N]
        c["temperature"][:N] = self.temperature[pslots]
        c["top_p"][:N] = self.top_p[pslots]
        c["top_k"][:N] = self.top_k[pslots]
        c["penalty"][:N] = self.repetition_penalty[pslots]
        new_pos = (starts[sampled] + lens[sampled]).astype(np.uint64)
        c["uniforms"][:n] = np.where(self.temperature[ss[:n]] > 0, counter_uniforms(self.seed[ss[:n]], new_pos), 0.5)
        c["uniforms"][n:N] = 0.5
        reset = slots[starts == 0]
        c["reset_slots"][:len(reset)] = reset
        resets = len(reset) if tokens is None else rows
        c["reset_slots"][len(reset):resets] = pad_slot
        buf.upload()
        return Tt, sampled, N, resets

    def _views(self, tokens: int, rows: int, samples: int, resets: int, max_seqlen_q: int, max_context_len: int,
               decode_only: bool, slot_mapping: bool) -> StepBatch:
        t = self.buffers.t
        positions, token_slots = t["positions"][:tokens], t["token_slots"][:tokens]
        block_tables = self.kv_cache.block_tables
        meta = AttentionMetadata(
            positions=positions,
            slot_mapping=(trail.ops.slot_mapping(block_tables, token_slots, positions, self.block_size)
                          if slot_mapping else None),
            block_tables=block_tables, slot_ids=t["attn_slots"][:rows], cu_seqlens_q=t["cu"][:rows + 1],
            context_lens=t["ctx"][:rows], max_seqlen_q=max_seqlen_q, max_context_len=max_context_len,
            decode_only=decode_only)
        return StepBatch(
            input_ids=t["input_ids"][:tokens], meta=meta, token_slots=token_slots, starts=t["starts"][:rows],
            is_decode=t["is_decode"][:rows], sampled_mask=t["sampled_mask"][:rows], flags=t["flags"][:rows],
            logits_indices=t["logits_idx"][:samples], sample_slots=t["sample_slots"][:samples],
            temperature=t["temperature"][:samples], top_k=t["top_k"][:samples], top_p=t["top_p"][:samples],
            repetition_penalty=t["penalty"][:samples], uniforms=t["uniforms"][:samples],
            reset_slots=t["reset_slots"][:resets], num_generated=t["num_gen"][:rows], max_new_tokens=t["max_new"][:rows],
            sampled=[], num_tokens=tokens, probe_slots=t["probe_slots"][:rows])

    def graph_eligible(self, plan: BatchPlan) -> bool:
        """A decode-only step that a captured graph can run: every row one token, SAMPLE only (no
        prefill, no recompute), a cached context, and a bucket large enough."""
        return (bool(self.graph_sizes) and plan.num_rows <= self.graph_sizes[-1]
                and len(plan.token_ids) == plan.num_rows and bool((plan.flags == row_flags.SAMPLE).all())
                and int(plan.starts.min()) > 0)

    def _graph_for(self, plan: BatchPlan, greedy: bool) -> tuple | None:
        """The captured graph that runs `plan`: ('decode', rows bucket, greedy) for a decode-only
        step, ('mixed', tokens bucket, greedy) for any other step that fits (mixed graphs have
        `mixed_rows` rows: the plan's, then pads, the last pad holding the spare tokens)."""
        if self.graph_eligible(plan):
            return ("decode", bucket_for(plan.num_rows, self.graph_sizes), greedy)
        if self.mixed_token_sizes and plan.num_rows < self.mixed_rows:
            need = len(plan.token_ids) + self.mixed_rows - plan.num_rows
            bucket = bucket_for(need, self.mixed_token_sizes)
            if bucket is not None:
                return ("mixed", bucket, greedy)
        return None

    def prepare_plan(self, plan: BatchPlan, pad_to: int | None = None, pad_tokens_to: int | None = None) -> StepBatch:
        """Commits the block tables, checks the plan's blocks are mapped, and stages the batch in
        the persistent buffers (one host-to-device copy). A step with a captured graph is padded
        to its bucket (`batch.graph` set); `pad_to` / `pad_tokens_to` pad an eager step the same
        way (tests: rows, and tokens as a mixed graph pads them)."""
        self.kv_cache.commit_block_tables()
        self._check_mapped(plan)
        S = plan.num_rows
        sample_slots = plan.slots[(plan.flags & row_flags.SAMPLE) != 0]
        all_greedy = bool((self.temperature[sample_slots] <= 0).all())
        exact = not all_greedy and bool((self.top_k[sample_slots] > MAX_CANDIDATES).any())
        graph = None
        if pad_to is None and pad_tokens_to is None and not exact:
            graph = self._graph_for(plan, all_greedy)
        if graph is not None:
            kind, size, _ = graph
            rows, tokens = (size, None) if kind == "decode" else (self.mixed_rows, size)
            _, sampled, _, _ = self._stage(plan, rows, tokens)
            return replace(self._graph_batches[kind, size], sampled=sampled.tolist(), all_greedy=all_greedy,
                           graph=graph, num_real_rows=S)
        rows = S if pad_to is None else pad_to
        if rows < S:
            raise ValueError(f"pad_to={pad_to} is below the plan's {S} rows")
        tokens, sampled, samples, resets = self._stage(plan, rows, pad_tokens_to)
        lens, ends = plan.num_tokens, plan.starts + plan.num_tokens
        batch = self._views(tokens, rows, samples, resets, max(int(lens.max()), tokens - len(plan.token_ids)),
                            int(ends.max()), bool((lens == 1).all()) and tokens == rows, slot_mapping=True)
        batch.sampled, batch.all_greedy, batch.exact_sampler, batch.num_real_rows = sampled.tolist(), all_greedy, exact, S
        return batch

    # ---- CUDA graphs --------------------------------------------------------------------------
    def capture_graphs(self, decode_sizes: Sequence[int], mixed_token_sizes: Sequence[int] = (),
                       mixed_rows: int | None = None) -> int:
        """Captures CUDA graphs over the persistent buffers, each with every row a pad (nothing
        real is touched): per batch size in `decode_sizes`, the decode step; per token count in
        `mixed_token_sizes`, a step of `mixed_rows` rows (default: the step buffers' rows) of any
        kind (prefill chunks, recomputes and decodes: varlen attention, the probe's pooling pass).
        Each graph runs slot mapping, forward with the layer tap, the attached probe and sampling,
        in a greedy and a sampling variant. Attention is captured at the static bound
        `max_context` (grids then never change). On CPU nothing is captured. Returns the number
        of graphs."""
        if self.device.type != "cuda":
            logger.info("CUDA graphs: not on CPU (every step runs eager)")
            return 0
        sizes = sorted({int(b) for b in decode_sizes})
        tsizes = sorted({int(t) for t in mixed_token_sizes})
        if (sizes and sizes[0] < 1) or not (sizes or tsizes):
            raise ValueError(f"graph batch sizes must be >= 1, got {sizes}")
        mrows = int(mixed_rows or self.buffers.max_rows) if tsizes else 0
        if tsizes and tsizes[0] <= mrows:
            raise ValueError(f"mixed graph token sizes must exceed mixed_rows={mrows}, got {tsizes}")
        max_rows = max(sizes[-1] if sizes else 0, mrows)
        if self.probe_state is not None and max_rows > self.probe_state.max_rows:
            raise ValueError(f"graph rows {max_rows} exceed the probe state's max_rows {self.probe_state.max_rows}")
        self._graphs.clear()
        self._graph_batches.clear()
        self.graph_sizes, self.mixed_token_sizes, self.mixed_rows = [], [], 0
        self._ensure_capacity(max(sizes[-1] if sizes else 0, tsizes[-1] if tsizes else 0), max_rows)
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        empty = BatchPlan(*(np.zeros(0, np.int64) for _ in range(5)))
        graphs, batches = {}, {}
        # largest first: the pool's blocks get reused by the smaller ones
        todo = [("mixed", t) for t in reversed(tsizes)] + [("decode", b) for b in reversed(sizes)]
        for i, (kind, size) in enumerate(todo):
            if kind == "decode":
                self._stage(empty, size)
                batch = self._views(size, size, size, 0, 1, self.max_context, True, slot_mapping=False)
            else:
                self._stage(empty, mrows, size)
                batch = self._views(size, mrows, mrows, mrows, size, self.max_context, False, slot_mapping=False)
            batches[kind, size] = batch
            for greedy in (True, False):
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):            # warm-up: Triton compiles, workspaces settle
                    self._graph_body(batch, greedy, kind == "mixed")
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._graph_body(batch, greedy, kind == "mixed")
                graphs[kind, size, greedy] = (graph, out)
            logger.info("CUDA graphs: captured %s %s %d (%d/%d, %.1f s)", kind, "tokens" if kind == "mixed" else "batch",
                        size, i + 1, len(todo), time.perf_counter() - t0)
        torch.cuda.synchronize(self.device)
        self._graphs, self._graph_batches = graphs, batches
        self.graph_sizes, self.mixed_token_sizes, self.mixed_rows = sizes, tsizes, mrows
        return len(graphs)

    def _graph_body(self, batch: StepBatch, greedy: bool, has_prefill: bool):
        """What a graph runs: slot mapping (on the device), forward + tap, probe, sampling."""
        slot_mapping = trail.ops.slot_mapping(self.kv_cache.block_tables, batch.token_slots, batch.meta.positions,
                                              self.block_size)
        batch = replace(batch, meta=replace(batch.meta, slot_mapping=slot_mapping))
        logits, tap = self.forward(batch)
        expected = None
        if self.probe is not None and tap is not None:
            expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                                  tap.max_new_tokens, self.probe, self.probe_state, has_prefill=has_prefill)
        return self._sample(logits, batch, greedy, exact=False), expected, tap

    def replay(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor | None, LayerTap | None]:
        """Runs a staged graph step: -> (next tokens [sampling rows] int64, the probe's
        expected_remaining by slot or None, the tap (padded to the bucket))."""
        graph, (tokens, expected, tap) = self._graphs[batch.graph]
        graph.replay()
        return tokens[:len(batch.sampled)], expected, tap

    def prepare(self, segments: Sequence[Segment]) -> StepBatch:
        return self.prepare_plan(self.plan_from_segments(segments))

    # ---- device side -----------------------------------------------------------------------
    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, LayerTap | None]:
        """-> (logits fp32 [R, vocab] of the sampling rows' last tokens, layer tap or None)."""
        # a token id of -1 is the slot's last sampled token, read here on the device
        slots = batch.token_slots.long()
        ids = torch.where(batch.input_ids >= 0, batch.input_ids, self.last_tokens.index_select(0, slots.clamp(min=0)))
        self.seen.index_fill_(0, batch.reset_slots, False)
        # a flat scatter: indexed assignment (index_put_) checks its indices with a host sync
        self.seen.view(-1).scatter_(0, torch.where(slots >= 0, slots, self.max_slots) * self.config.vocab_size + ids,
                                    True)
        logits, states = self.model(ids, batch.meta, self.kv_cache,
                                    logits_indices=batch.logits_indices, tap_layer=self.tap_layer)
        tap = None
        if states is not None:
            tap = LayerTap(self.tap_layer, states, batch.meta.cu_seqlens_q, batch.probe_slots,
                           batch.starts, batch.is_decode, batch.sampled_mask, batch.flags,
                           batch.num_generated, batch.max_new_tokens)
        return logits, tap

    def sample(self, logits: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Next tokens of the sampling rows (pads included when the batch is padded)."""
        return self._sample(logits, batch, batch.all_greedy, batch.exact_sampler)

    def _sample(self, logits: torch.Tensor, batch: StepBatch, greedy: bool, exact: bool) -> torch.Tensor:
        """Next tokens of the sampling entries, also kept by slot in `last_tokens` (the next
        decode's input)."""
        seen = self.seen.index_select(0, batch.sample_slots)
        if greedy:                # argmax only when no row samples
            tokens = torch.argmax(apply_repetition_penalty(logits.float(), seen, batch.repetition_penalty), dim=-1)
        else:
            fn = sample_reference if exact else sample    # exact: a row's top_k exceeds the candidates
            tokens = fn(logits, batch.temperature, batch.top_k, batch.top_p, batch.repetition_penalty, batch.uniforms,
                        seen)
        self.last_tokens.index_copy_(0, batch.sample_slots, tokens)
        return tokens

    def execute(self, plan: BatchPlan, clock=None) -> StepOutput:
        """The whole step on the device: stage -> forward with the layer tap -> the attached probe
        -> sample; one replay where a captured graph fits, else eagerly. Nothing syncs. `clock`:
        an optional phase clock (`mark(phase, device)`), marked after each phase."""
        mark = clock.mark if clock is not None else _no_mark
        batch = self.prepare_plan(plan)
        mark("prepare", True)
        if batch.graph is not None:
            tokens, expected, tap = self.replay(batch)
            mark("forward", True)
            return StepOutput(tokens, batch.sampled, tap, batch, expected)
        logits, tap = self.forward(batch)
        mark("forward", True)
        expected = None
        if self.probe is not None and tap is not None:
            expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                                  tap.max_new_tokens, self.probe, self.probe_state,
                                  has_prefill=bool((plan.flags & row_flags.PREFILL).any()))
        mark("probe", True)
        tokens = self.sample(logits, batch)[:len(batch.sampled)]
        mark("sample", True)
        return StepOutput(tokens, batch.sampled, tap, batch, expected)

    def step(self, segments: Sequence[Segment]) -> StepOutput:
        return self.execute(self.plan_from_segments(segments))
