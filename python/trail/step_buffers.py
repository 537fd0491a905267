"""The host side of a step: a `BatchPlan` written into the runner's persistent buffers.

`StepBuffers` is one host staging area (pinned on CUDA) with a fixed numpy view per column and a
device mirror with fixed torch views; a step fills the host views in place and copies them once.
`StepStaging` writes a plan there — padded to a CUDA-graph bucket where one runs it (pad rows: one
token on no KV slot, context 0, the probe's scratch slot, the scratch row of `seen`, greedy) —
and hands back the `StepBatch` views (valid until the next plan is staged). `SlotSampling` holds
the per-slot sampling parameters the staging reads, written once when a request is admitted.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

import trail
from trail.batch import BatchPlan, StepBatch
from trail.models.llama import AttentionMetadata
from trail.sampling import GREEDY, counter_uniforms
from trail_kernels import row_flags

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


class SlotSampling:
    """Per-slot sampling parameters until the slot's next `set` (index max_slots: the pads',
    greedy). A request without a seed gets one drawn here, so its draws do not depend on its
    batch."""

    def __init__(self, max_slots: int, seed: int = 0):
        self._rng = random.Random(seed)
        n = max_slots + 1
        self.temperature = np.zeros(n, np.float64)
        self.top_p = np.ones(n, np.float64)
        self.top_k = np.zeros(n, np.int64)
        self.repetition_penalty = np.ones(n, np.float64)
        self.seed = np.zeros(n, np.uint64)

    def set(self, slot: int, params=None) -> None:
        """The slot's sampling parameters (None: greedy)."""
        p = params or GREEDY
        self.temperature[slot] = p.temperature
        self.top_p[slot] = p.top_p
        self.top_k[slot] = p.top_k
        self.repetition_penalty[slot] = p.repetition_penalty
        self.seed[slot] = p.seed if p.seed is not None else self._rng.getrandbits(63)


class StepStaging:
    """The runner's `StepBuffers` over `kv_cache` (slot `max_slots`: the pads' scratch slot),
    grown when a step does not fit; `on_grow(tokens, rows)` runs first (the runner drops the
    CUDA graphs captured over the old buffers)."""

    def __init__(self, kv_cache, sampling: SlotSampling, max_tokens: int, max_rows: int | None,
                 on_grow: Callable[[int, int], None]):
        self.kv_cache, self.sampling, self.on_grow = kv_cache, sampling, on_grow
        self.device, self.block_size = kv_cache.device, kv_cache.block_size
        self.max_slots = kv_cache.block_tables.shape[0]
        self.buffers = StepBuffers(max_tokens, max_rows or min(self.max_slots, 64), self.device)
        self.arange = np.arange(max(max_tokens, self.buffers.max_rows) + 1, dtype=np.int64)

    def ensure_capacity(self, tokens: int, rows: int) -> None:
        b = self.buffers
        if tokens <= b.max_tokens and rows <= b.max_rows:
            return
        self.on_grow(tokens, rows)
        b.wait_reusable()
        self.buffers = StepBuffers(max(tokens, 2 * b.max_tokens), max(rows, min(2 * b.max_rows, self.max_slots)),
                                   self.device)
        self.arange = np.arange(max(self.buffers.max_tokens, self.buffers.max_rows) + 1, dtype=np.int64)

    def stage(self, plan: BatchPlan, rows: int, tokens: int | None = None) -> tuple[int, np.ndarray, int, int]:
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
        self.ensure_capacity(Tt, rows)
        buf = self.buffers
        buf.wait_reusable()
        c, ar, pad_slot = buf.np, self.arange, self.max_slots
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
        sp = self.sampling
        c["temperature"][:N] = sp.temperature[pslots]
        c["top_p"][:N] = sp.top_p[pslots]
        c["top_k"][:N] = sp.top_k[pslots]
        c["penalty"][:N] = sp.repetition_penalty[pslots]
        new_pos = (starts[sampled] + lens[sampled]).astype(np.uint64)
        c["uniforms"][:n] = np.where(sp.temperature[ss[:n]] > 0, counter_uniforms(sp.seed[ss[:n]], new_pos), 0.5)
        c["uniforms"][n:N] = 0.5
        reset = slots[starts == 0]
        c["reset_slots"][:len(reset)] = reset
        resets = len(reset) if tokens is None else rows
        c["reset_slots"][len(reset):resets] = pad_slot
        buf.upload()
        return Tt, sampled, N, resets

    def views(self, tokens: int, rows: int, samples: int, resets: int, max_seqlen_q: int, max_context_len: int,
              decode_only: bool, slot_mapping: bool) -> StepBatch:
        """The staged step as device views (`sampled` left for the caller to fill)."""
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
