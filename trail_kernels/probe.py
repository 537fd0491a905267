"""The length probe and its Bayes filter, by request slot, in one launch per decode step.

Role in the data flow: the model runner hands over the layer-L states of a step; this module pools
prefill chunks into a per-slot running mean, runs the probe MLP (`Linear(d, h) -> ReLU ->
Linear(h, K)`) on each request's input of the step, folds the probe's bin distribution into the
request's log-posterior (DESIGN.md "The method": predict, update, floor, renormalise) and writes
the expected remaining length per slot. Everything stays on the device: no host sync, no
allocation on the decode path, fixed grid per batch size, so the decode launch lives in a CUDA graph.

A step is a batch of *segments*, one per request: segment i owns the states
`states[cu_seqlens[i]:cu_seqlens[i+1]]`, the request slot `slot_ids[i]` and the int32 flags (trail_kernels/row_flags.py;
SAMPLE is ignored here)

    0                       decode row: the segment's last token is the newest token's state
    PREFILL | [FIRST_CHUNK] | [LAST_CHUNK]
                            a prompt chunk: its tokens are added to the slot's fp32 running sum
                            (reset by FIRST_CHUNK); LAST_CHUNK applies the probe to the mean
    ... | RECOMPUTE         a resumed-without-KV request: no pooling, no update, no output; the
                            slot's posterior and prompt mean survive untouched

and two per-segment counts: `num_generated[i]` (output tokens of the request fed to the model up
to and including this segment: 0 for a prompt, n when the newest token is the n-th generated one)
and `max_new_tokens[i]`. Padded rows (CUDA-graph buckets) are decode rows on
`ProbeState.scratch_slot`; rows whose slot is out of range are skipped by the kernel.

The filter per slot (log space, fp32), with q = softmax(probe logits):
  prompt (LAST_CHUNK)  log p = log q, then the floor. q is p(bin | prompt mean) under the training
                       prior pi, i.e. pi * (q / pi): the first observation is a posterior already
                       and is not tempered (alpha corrects the *repetition* of correlated evidence).
  decode row           predict s = num_generated - (num_generated at the posterior) steps: mass in
                       bin k moves to bin k-1 with probability 1 / width_k per step (bin 0 keeps
                       it), applied as T^s with T^(2^j) tables (any s up to 2^16 - 1 at the same
                       cost); then, when num_generated - (num_generated at the last update) >=
                       update_every: log p += alpha * (log q - log pi), renormalise (logsumexp),
                       floor. Between updates (TRAIL's every-8-steps rule) the predict still runs,
                       so the readout follows every generated token.
  floor                p <- (p + eps / K) / (1 + eps), only after an update or the prompt step.
  bad numbers          a row whose probe output is NaN or +inf (a non-finite hidden state) brings
                       no evidence: a decode row only predicts, a prompt step starts from pi.
                       One bad row never poisons its slot for later steps.
  readout              expected_remaining[slot] = sum_k p_k * min(value_k, cap),
                       cap = max(max_new_tokens - num_generated, 0).
  rule 'trail'         TRAIL's plain product: log p += log q (no pi, no tempering), every 8 steps.

Width of the open-ended last bin [e, inf) with mean value v: the remaining length beyond e is
taken as geometric (the maximum-entropy law on {0, 1, ...} with mean v - e, and memoryless, so the
tail keeps its shape under the filter), whose chance of leaving the bin in one step is
1 / (v - e + 1): the effective width is v - e + 1.

The pieces: `ProbeParams` (trail_kernels/probe_params.py), `ProbeState` (probe_state.py), the
input checks (probe_validation.py), the torch reference (probe_reference.py) and the Triton
kernels (probe_triton.py). This module is the entry point, `probe_step`, which picks between the
last two.
"""
from __future__ import annotations

import torch

from trail_kernels.dispatch import use_triton
from trail_kernels.probe_params import ProbeParams
from trail_kernels.probe_reference import probe_reference
from trail_kernels.probe_state import ProbeState
from trail_kernels.probe_triton import probe_triton
from trail_kernels.probe_validation import check_step

__all__ = ["probe_step", "ProbeParams", "ProbeState"]   # the last two also from here for the engine


def probe_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens,
               params: ProbeParams, state: ProbeState, *, has_prefill: bool = True,
               impl: str | None = None, config: dict | None = None) -> torch.Tensor:
    """Run the probe and the filter for one step, in place on `state`; returns
    `state.expected_remaining` (indexed by slot). `has_prefill=False` promises that no row has
    the PREFILL flag: the pooling pass is skipped and the step is one launch (CUDA-graph case).
    Inputs are only shape-checked here; `validate_step` checks values (it syncs)."""
    check_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state)
    if use_triton(states, params.fc1_weight, state.log_post, impl=impl):
        return probe_triton(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params,
                            state, has_prefill, config)
    return probe_reference(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params,
                           state, has_prefill=has_prefill)
