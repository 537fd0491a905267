"""What the probe keeps between decode steps, per request slot: `ProbeState` (the log-posterior
over the bins, the prompt's pooled running sum, the step counts the posterior refers to, the
expected-remaining readout) plus the fused kernel's workspace, sized for its tiles. The engine
owns one; every probe_step reads and updates it in place on the device.
"""
from __future__ import annotations

import math

import torch

from trail_kernels.probe_params import MAX_BINS, ProbeParams, padded_num_bins

MIN_BLOCK_M, MAX_BLOCK_M, MIN_BLOCK_H = 16, 128, 16    # the fused kernel's tile bounds (workspace size)


class ProbeState:
    """Device tensors that persist across steps, by request slot, plus the kernel's workspace.

    Slots 0..max_slots-1 are requests; `scratch_slot` (= max_slots) absorbs padded rows.
      log_post [S, K] fp32            log-posterior over the bins (uniform at start)
      pool_sum [S, d] fp32, pool_count [S] int32     prompt running sum and token count
      post_gen [S] int32              num_generated the posterior refers to
      upd_gen [S] int32               num_generated at the last evidence update
      expected_remaining [S] fp32     the readout (output), written for the slots of each step
    A step may have at most `max_rows` segments. One step at a time per state (the workspace is
    shared by its launches).
    """

    def __init__(self, max_slots: int, num_bins: int, hidden_size: int, *, max_rows: int,
                 probe_hidden: int = 512, device="cpu"):
        if max_slots < 1 or max_rows < 1 or not 1 <= num_bins <= MAX_BINS:
            raise ValueError(f"ProbeState: bad sizes max_slots={max_slots}, max_rows={max_rows}, "
                             f"num_bins={num_bins}")
        n = max_slots + 1
        self.max_slots, self.num_bins, self.hidden_size = max_slots, num_bins, hidden_size
        self.probe_hidden, self.max_rows = probe_hidden, max_rows
        self.scratch_slot = max_slots
        self.device = torch.device(device)
        f32 = dict(device=self.device, dtype=torch.float32)
        i32 = dict(device=self.device, dtype=torch.int32)
        self.log_post = torch.full((n, num_bins), -math.log(num_bins), **f32)
        self.pool_sum = torch.zeros(n, hidden_size, **f32)
        self.pool_count = torch.zeros(n, **i32)
        self.post_gen = torch.zeros(n, **i32)
        self.upd_gen = torch.zeros(n, **i32)
        self.expected_remaining = torch.zeros(n, **f32)
        self.device = self.log_post.device     # 'cuda' -> 'cuda:0', as tensors report it
        rows_pad = -(-max_rows // MAX_BLOCK_M) * MAX_BLOCK_M
        self.partials = torch.zeros(-(-probe_hidden // MIN_BLOCK_H), rows_pad, padded_num_bins(num_bins), **f32)
        self.tile_counters = torch.zeros(-(-max_rows // MIN_BLOCK_M), **i32)

    @classmethod
    def for_params(cls, params: ProbeParams, max_slots: int, max_rows: int, device=None) -> "ProbeState":
        return cls(max_slots, params.num_bins, params.hidden_size, max_rows=max_rows,
                   probe_hidden=params.probe_hidden, device=params.device if device is None else device)

    @property
    def num_slots(self) -> int:
        return self.max_slots + 1

    def clone(self) -> "ProbeState":
        other = object.__new__(ProbeState)
        other.__dict__.update({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                               for k, v in self.__dict__.items()})
        return other
