"""The length probe as a standalone API for other engines: load a probe file, hand it the layer-L
hidden states your forward pass produced, get each request's predicted remaining output length.

    probe = trail.Probe.load(path_or_shipped_dir / "probe", device="cuda", dtype=torch.bfloat16)
    state = probe.new_state(max_slots=256, max_rows=64)          # caller-owned posterior buffers
    probe.observe_prompt(state, prompt_states, cu_seqlens, slot_ids, max_new_tokens)   # after prefill
    remaining = probe.update(state, decode_states, slot_ids, num_generated, max_new_tokens)  # each step

Slots are yours: any integer in [0, max_slots) that names one live request; a new request in a
slot starts over at its prompt. Everything runs on the device without a host sync (the fused
kernel of `trail_kernels.probe` on CUDA, its torch reference on CPU); the returned tensor is
`state.expected_remaining`, indexed by slot, read it whenever your loop syncs anyway.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from trail_kernels import row_flags
from trail_kernels.probe import probe_step
from trail_kernels.probe_params import ProbeParams
from trail_kernels.probe_state import ProbeState


@dataclass(eq=False)
class Probe:
    """A loaded layer probe: its kernel parameters and what it was trained for."""
    params: ProbeParams
    layer: int               # read the output of decoder layer `layer` (0-based, before the final norm)
    max_new_tokens: int      # the output cap of its training data
    model: str               # the model it was trained on

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, expect_d: int | None = None) -> "Probe":
        """A probe file (`NAME`, `NAME.json` or `NAME.safetensors`, as `trail train-probe`
        writes). `dtype` casts the MLP weights (use your hidden states' dtype on CUDA)."""
        from trail.predictor.probe_file import load_probe_params

        params, spec = load_probe_params(path, expect_d=expect_d)
        return cls(params.to(device, dtype), spec.layer, spec.max_new_tokens, spec.model)

    @property
    def hidden_size(self) -> int:
        return self.params.hidden_size

    def new_state(self, max_slots: int, max_rows: int) -> ProbeState:
        """Per-slot posterior buffers (+ one scratch slot for padded rows), on the probe's device."""
        return ProbeState.for_params(self.params, max_slots=max_slots, max_rows=max_rows)

    def observe_prompt(self, state: ProbeState, states: torch.Tensor, cu_seqlens: torch.Tensor,
                       slot_ids: torch.Tensor, max_new_tokens: torch.Tensor) -> torch.Tensor:
        """Whole prompts: `states` [T, d] are the layer-L states of the prompts' tokens packed,
        request i owning rows cu_seqlens[i]:cu_seqlens[i+1]. Sets each slot's posterior from the
        prompt mean. Returns the expected remaining length by slot."""
        n = slot_ids.numel()
        flags = torch.full((n,), row_flags.PREFILL | row_flags.FIRST_CHUNK | row_flags.LAST_CHUNK,
                           dtype=torch.int32, device=states.device)
        zeros = torch.zeros(n, dtype=torch.int32, device=states.device)
        return probe_step(states, _i32(cu_seqlens), _i32(slot_ids), flags, zeros, _i32(max_new_tokens),
                          self.params, state, has_prefill=True)

    def update(self, state: ProbeState, states: torch.Tensor, slot_ids: torch.Tensor,
               num_generated: torch.Tensor, max_new_tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: `states` [B, d] are the layer-L states of each request's newest token
        (its `num_generated[i]`-th output token). Predict + Bayes update + readout, in place.
        Returns the expected remaining length by slot (capped at max_new_tokens - num_generated)."""
        n = slot_ids.numel()
        cu = torch.arange(n + 1, dtype=torch.int32, device=states.device)
        flags = torch.zeros(n, dtype=torch.int32, device=states.device)
        return probe_step(states, cu, _i32(slot_ids), flags, _i32(num_generated), _i32(max_new_tokens),
                          self.params, state, has_prefill=False)


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()
