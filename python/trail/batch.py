"""The step's batch contract, data only. `BatchPlan` is what the scheduler's plan hands the runner
(shared with the probe kernel): one row per request of the step, as numpy columns — slot, row
flags (`trail_kernels.row_flags`), start (tokens of the slot already in the cache), number of
tokens — and the step's token ids concatenated. `StepBatch` is that plan staged on the device
(`step_buffers`), `LayerTap` the layer-L states the forward hands the probe, `StepOutput` what
`ModelRunner.execute` returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trail.models.llama import AttentionMetadata


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
