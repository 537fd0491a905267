"""Input checks of a probe step: `check_step` (shapes, dtypes, devices; no device reads, so it runs
on the hot path before every launch) and `validate_step` (the values: offsets, flags, slots;
syncs, so for tests and the CPU path). Called by probe_step and probe_reference.
"""
from __future__ import annotations

import torch

from trail_kernels.row_flags import ALL as _KNOWN_FLAGS
from trail_kernels.row_flags import FIRST_CHUNK, LAST_CHUNK, PREFILL


def check_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state):
    """Shapes, dtypes and devices only: no device reads, so safe on the hot path."""
    if states.dim() != 2 or not states.is_floating_point() or states.stride(-1) != 1:
        raise ValueError(f"probe: states must be a float [num_tokens, d] tensor with contiguous rows, "
                         f"got {tuple(states.shape)} {states.dtype} strides {states.stride()}")
    n = slot_ids.numel()
    for name, t, size in (("cu_seqlens", cu_seqlens, n + 1), ("slot_ids", slot_ids, n), ("flags", flags, n),
                          ("num_generated", num_generated, n), ("max_new_tokens", max_new_tokens, n)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.numel() != size or not t.is_contiguous():
            raise ValueError(f"probe: {name} must be a contiguous int32 [{size}] tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
        if t.device != states.device:
            raise ValueError(f"probe: {name} is on {t.device} but states on {states.device}")
    if params.device != states.device or state.device != states.device:
        raise ValueError(f"probe: states on {states.device}, params on {params.device}, state on {state.device}")
    d = states.shape[1]
    if d != params.hidden_size or d != state.hidden_size:
        raise ValueError(f"probe: states have d={d}, params d={params.hidden_size}, state d={state.hidden_size}")
    if params.num_bins != state.num_bins or params.probe_hidden > state.probe_hidden:
        raise ValueError(f"probe: params (K={params.num_bins}, h={params.probe_hidden}) do not fit the state "
                         f"(K={state.num_bins}, h={state.probe_hidden})")
    if n > state.max_rows:
        raise ValueError(f"probe: {n} segments but the state was sized for max_rows={state.max_rows}")


def validate_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, state) -> None:
    """Value checks that read the tensors (a host sync on GPU: for tests and the CPU path)."""
    cu, slots, fl = cu_seqlens.cpu().long(), slot_ids.cpu().long(), flags.cpu().long()
    if cu.numel() and (cu[0] != 0 or (cu[1:] < cu[:-1]).any() or cu[-1] > states.shape[0]):
        raise ValueError(f"probe: cu_seqlens must start at 0, not decrease and end <= num_tokens "
                         f"({states.shape[0]}): {cu.tolist()}")
    if ((fl & ~_KNOWN_FLAGS) != 0).any():
        raise ValueError(f"probe: unknown flag bits in {fl.tolist()}")
    if (((fl & PREFILL) == 0) & ((fl & (FIRST_CHUNK | LAST_CHUNK)) != 0)).any():
        raise ValueError("probe: FIRST_CHUNK / LAST_CHUNK set on a decode row (PREFILL missing)")
    lengths = cu[1:] - cu[:-1]
    if (lengths < 1).any():
        raise ValueError(f"probe: empty segments in cu_seqlens {cu.tolist()}")
    if ((slots < 0) | (slots >= state.num_slots)).any():
        raise ValueError(f"probe: slot ids outside [0, {state.num_slots}): {slots.tolist()}")
    real = slots[slots != state.scratch_slot]
    if real.unique().numel() != real.numel():
        raise ValueError(f"probe: a request slot appears twice in one step: {slots.tolist()}")
    if (num_generated.cpu() < 0).any() or (max_new_tokens.cpu() < 0).any():
        raise ValueError("probe: num_generated and max_new_tokens must be >= 0")
