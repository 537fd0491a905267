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

Two kernels: `_probe_pool_kernel` (prefill chunks only; skipped when the step has none) and
`_probe_fused_kernel` (MLP + filter + readout). A decode-only step (`has_prefill=False`) is ONE
launch. The fused kernel splits the hidden units over programs; partial logits go to a workspace
in `ProbeState` and the last program of a row tile (an atomic arrival counter, which it resets)
sums them in a fixed order, so results are deterministic and the workspace needs no clearing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from trail_kernels.dispatch import interpreter_on, triton_available, use_triton

from trail_kernels.row_flags import ALL as _KNOWN_FLAGS
from trail_kernels.row_flags import FIRST_CHUNK, LAST_CHUNK, PREFILL, RECOMPUTE, SAMPLE  # noqa: F401

RULES = ("bayes", "trail")
POW_BITS = 16                      # predict steps are clamped to 2**POW_BITS - 1 per row
MAX_BINS = 32
MIN_BLOCK_M, MAX_BLOCK_M, MIN_BLOCK_H = 16, 128, 16


def _bins_pad(num_bins: int) -> int:
    return max(16, 1 << (num_bins - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Probe weights and filter parameters
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ProbeParams:
    """A probe and its filter settings, in `torch.nn.Linear` layout, on one device.

    fc1_weight [h, d], fc1_bias [h], fc2_weight [K, h], fc2_bias [K]; bin_edges [K + 1] (strictly
    increasing from >= 0; the last may be +inf), bin_values [K] (mean remaining length per bin),
    log_prior [K] (log of the training label prior pi; finite); these three are kept as float64 on
    the CPU, their device copies are `values` and `log_prior_used`. `update_every` defaults to 1 for
    rule 'bayes' and 8 for rule 'trail'. The weights keep their dtype (on GPU, give fc1/fc2 the
    states' dtype, e.g. via `.to(device, torch.bfloat16)`, for the tensor-core path); everything
    else is held in fp32 and derived once here, never on the hot path.
    """

    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    bin_edges: torch.Tensor
    bin_values: torch.Tensor
    log_prior: torch.Tensor
    alpha: float = 1.0
    eps: float = 1e-6
    rule: str = "bayes"
    update_every: int | None = None
    # Derived in __post_init__:
    move_prob: torch.Tensor = field(init=False)          # float64 cpu [K]: P(bin k -> k-1) per step
    log_transition_pows: torch.Tensor = field(init=False)  # fp32 [POW_BITS, KP, KP]: log (T^(2^j))^T
    values: torch.Tensor = field(init=False)             # fp32 [K] on the device: bin_values
    log_prior_used: torch.Tensor = field(init=False)     # fp32 [K] on the device: log pi, zeros for 'trail'
    alpha_used: float = field(init=False)

    def __post_init__(self):
        w1, b1, w2, b2 = self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias
        for name, t in (("fc1_weight", w1), ("fc1_bias", b1), ("fc2_weight", w2), ("fc2_bias", b2),
                        ("bin_edges", self.bin_edges), ("bin_values", self.bin_values),
                        ("log_prior", self.log_prior)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"ProbeParams.{name} must be a floating-point tensor")
        if w1.dim() != 2 or w2.dim() != 2:
            raise ValueError(f"ProbeParams: fc1_weight {tuple(w1.shape)} and fc2_weight "
                             f"{tuple(w2.shape)} must be 2-D ([h, d] and [K, h])")
        h, d = w1.shape
        k = w2.shape[0]
        if w2.shape[1] != h or b1.shape != (h,) or b2.shape != (k,):
            raise ValueError(f"ProbeParams: shapes disagree: fc1_weight {tuple(w1.shape)}, fc1_bias "
                             f"{tuple(b1.shape)}, fc2_weight {tuple(w2.shape)}, fc2_bias {tuple(b2.shape)}")
        if not 1 <= k <= MAX_BINS:
            raise ValueError(f"ProbeParams: {k} bins; supported 1..{MAX_BINS}")
        if self.bin_edges.shape != (k + 1,) or self.bin_values.shape != (k,) or self.log_prior.shape != (k,):
            raise ValueError(f"ProbeParams: with K={k} bins, bin_edges must be [{k + 1}], bin_values and "
                             f"log_prior [{k}]; got {tuple(self.bin_edges.shape)}, "
                             f"{tuple(self.bin_values.shape)}, {tuple(self.log_prior.shape)}")
        devices = {t.device for t in (w1, b1, w2, b2)}
        if len(devices) != 1:
            raise ValueError(f"ProbeParams: weights on several devices: {devices}")
        if self.rule not in RULES:
            raise ValueError(f"ProbeParams.rule={self.rule!r} is not one of {RULES}")
        if self.update_every is None:
            self.update_every = 1 if self.rule == "bayes" else 8
        if int(self.update_every) != self.update_every or self.update_every < 1:
            raise ValueError(f"ProbeParams.update_every must be an integer >= 1, got {self.update_every}")
        self.update_every = int(self.update_every)
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"ProbeParams.alpha must be finite and > 0, got {self.alpha}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"ProbeParams.eps must be finite and >= 0, got {self.eps}")

        edges = self.bin_edges.detach().double().cpu()
        values = self.bin_values.detach().double().cpu()
        log_prior = self.log_prior.detach().double().cpu()
        if not torch.isfinite(edges[:-1]).all() or edges[0] < 0 or edges[-1] != edges[-1]:
            raise ValueError(f"ProbeParams.bin_edges must be finite and >= 0 (the last may be +inf): {edges.tolist()}")
        if not (edges[1:] > edges[:-1]).all():
            raise ValueError(f"ProbeParams.bin_edges must increase strictly: {edges.tolist()}")
        if not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"ProbeParams.bin_values must be finite and >= 0: {values.tolist()}")
        if not torch.isfinite(log_prior).all():
            raise ValueError("ProbeParams.log_prior must be finite (clamp empty bins of pi before the log): "
                             f"{log_prior.tolist()}")
        self.move_prob = _move_probabilities(edges, values)

        dev = w1.device
        self.fc1_weight, self.fc2_weight = w1.contiguous(), w2.contiguous()
        self.fc1_bias = b1.detach().to(dev, torch.float32).contiguous()
        self.fc2_bias = b2.detach().to(dev, torch.float32).contiguous()
        self.bin_edges, self.bin_values, self.log_prior = edges, values, log_prior   # float64, cpu
        self.values = values.to(dev, torch.float32)
        trail_rule = self.rule == "trail"
        self.log_prior_used = (torch.zeros_like if trail_rule else torch.clone)(log_prior).to(dev, torch.float32)
        self.alpha_used = 1.0 if trail_rule else float(self.alpha)
        self.log_transition_pows = _log_transition_power_table(self.move_prob, _bins_pad(k)).to(dev)

    @property
    def num_bins(self) -> int:
        return self.fc2_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.fc1_weight.shape[1]

    @property
    def probe_hidden(self) -> int:
        return self.fc1_weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.fc1_weight.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ProbeParams":
        """A copy on `device`, fc1/fc2 weights cast to `dtype` (biases and filter data stay fp32)."""
        device = self.device if device is None else torch.device(device)
        cast = (lambda t: t.to(device, dtype)) if dtype is not None else (lambda t: t.to(device))
        return ProbeParams(cast(self.fc1_weight), self.fc1_bias.to(device), cast(self.fc2_weight),
                           self.fc2_bias.to(device), self.bin_edges, self.bin_values, self.log_prior, alpha=self.alpha, eps=self.eps, rule=self.rule,
                           update_every=self.update_every)

    @staticmethod
    def random(hidden_size: int, probe_hidden: int = 512, num_bins: int = 10, *, max_len: int = 512,
               open_ended: bool = False, generator: torch.Generator | None = None, scale: float = 1.0,
               **kwargs) -> "ProbeParams":
        """Random weights (nn.Linear-like init) and TRAIL's equal-width bins over [0, max_len), on
        CPU in fp32; for tests and benchmarks. `open_ended` makes the last bin [edge, inf)."""
        g = generator
        w1 = (torch.rand(probe_hidden, hidden_size, generator=g) * 2 - 1) * scale / math.sqrt(hidden_size)
        b1 = (torch.rand(probe_hidden, generator=g) * 2 - 1) * scale / math.sqrt(hidden_size)
        w2 = (torch.rand(num_bins, probe_hidden, generator=g) * 2 - 1) * scale / math.sqrt(probe_hidden)
        b2 = (torch.rand(num_bins, generator=g) * 2 - 1) * scale / math.sqrt(probe_hidden)
        edges = torch.linspace(0, max_len, num_bins + 1, dtype=torch.float64)
        values = (edges[:-1] + edges[1:] - 1) / 2
        if open_ended:
            edges[-1] = math.inf
            values[-1] = edges[-2] + 3 * (max_len / num_bins)
        prior = torch.rand(num_bins, generator=g, dtype=torch.float64) + 0.2
        return ProbeParams(w1, b1, w2, b2, edges, values, (prior / prior.sum()).log(), **kwargs)


def _move_probabilities(edges: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """P(mass in bin k moves to bin k-1 in one step) = 1 / width_k; 0 for bin 0 (float64)."""
    widths = edges[1:] - edges[:-1]
    if math.isinf(edges[-1].item()):
        lower = edges[-2].item()
        if values[-1] < lower:
            raise ValueError(f"ProbeParams: the open-ended last bin starts at {lower} but its mean value "
                             f"is {values[-1].item()}")
        widths[-1] = values[-1] - lower + 1          # geometric tail with mean v - e (module docstring)
    if (widths[1:] < 1).any():
        raise ValueError(f"ProbeParams: bins wider than 0 and narrower than one token cannot be "
                         f"crossed at one token per step: widths {widths.tolist()}")
    move = 1.0 / widths
    move[0] = 0.0
    return move


def transition_matrix(move_prob: torch.Tensor) -> torch.Tensor:
    """One decode step as a column-stochastic matrix: p_next = T @ p (float64)."""
    k = move_prob.numel()
    t = torch.diag(1.0 - move_prob.double())
    if k > 1:
        t += torch.diag(move_prob.double()[1:], diagonal=1)
    return t


def _log_transition_power_table(move_prob: torch.Tensor, kp: int) -> torch.Tensor:
    """log (T^(2^j))^T for j < POW_BITS, padded with -inf to [POW_BITS, kp, kp], fp32.

    Entry [j, a, b] is the log-probability of moving from bin a to bin b in 2^j steps. Squared in
    log space (float64), so long-range entries such as (1 - 1/w)^(2^15) keep their exponent."""
    k = move_prob.numel()
    table = torch.full((POW_BITS, kp, kp), -math.inf, dtype=torch.float64)
    log_power = transition_matrix(move_prob).T.log()
    for j in range(POW_BITS):
        table[j, :k, :k] = log_power
        log_power = torch.logsumexp(log_power[:, :, None] + log_power[None, :, :], dim=1)
    return table.float()


def log_predict(log_p: torch.Tensor, log_pows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """log of (T^steps p) per row, in log space: rows [n, K], steps [n] (< 2^POW_BITS)."""
    k = log_p.shape[-1]
    for j in range(POW_BITS):
        moved = torch.logsumexp(log_p[:, :, None] + log_pows[j, :k, :k][None], dim=1)
        log_p = torch.where((((steps >> j) & 1) != 0)[:, None], moved, log_p)
    return log_p


# ---------------------------------------------------------------------------------------------
# Per-slot state
# ---------------------------------------------------------------------------------------------
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
        self.partials = torch.zeros(-(-probe_hidden // MIN_BLOCK_H), rows_pad, _bins_pad(num_bins), **f32)
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


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def _check_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state):
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


def _log_normalise_rows(lp: torch.Tensor) -> torch.Tensor:
    """Rows minus their logsumexp, shifted first so that huge offsets (-1e30) do not absorb it."""
    z = lp - lp.amax(-1, keepdim=True)
    return z - torch.log(torch.exp(z).sum(-1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# Reference (plain torch, no host sync on GPU when validate=False)
# ---------------------------------------------------------------------------------------------
def probe_reference(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens,
                    params: ProbeParams, state: ProbeState, *, has_prefill: bool = True,
                    validate: bool | None = None) -> torch.Tensor:
    """The same function as the kernels, unfused, in fp32. Updates `state` in place and returns
    `state.expected_remaining`. `validate` (default: on CPU only) runs `validate_step` first."""
    _check_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state)
    if validate is None:
        validate = not states.is_cuda
    if validate:
        validate_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, state)
    n = slot_ids.numel()
    if n == 0:
        return state.expected_remaining
    dev, k = states.device, params.num_bins
    slots = slot_ids.long()
    in_range = (slots >= 0) & (slots < state.num_slots)
    sl = torch.where(in_range, slots, torch.full_like(slots, state.scratch_slot))
    fl = flags.long()
    is_pf = (fl & PREFILL) != 0
    first, last, rec = (fl & FIRST_CHUNK) != 0, (fl & LAST_CHUNK) != 0, (fl & RECOMPUTE) != 0
    cu = cu_seqlens.long()

    if has_prefill:
        pool = is_pf & ~rec & in_range
        tok = torch.arange(states.shape[0], device=dev)
        seg = torch.searchsorted(cu[1:], tok, right=True)
        tok_ok = (seg < n) & (tok >= cu[0])
        seg = seg.clamp(max=n - 1)
        weight = (tok_ok & pool[seg]).float()
        chunk = torch.zeros(n, states.shape[1], device=dev).index_add_(0, seg, states.float() * weight[:, None])
        count = (cu[1:] - cu[:-1]).int()
        old_sum, old_cnt = state.pool_sum[sl], state.pool_count[sl]
        new_sum = torch.where(first[:, None], chunk, old_sum + chunk)
        new_cnt = torch.where(first, count, old_cnt + count)
        state.pool_sum[sl] = torch.where(pool[:, None], new_sum, old_sum)
        state.pool_count[sl] = torch.where(pool, new_cnt, old_cnt)

    active = in_range & ~rec & (~is_pf | last)
    is_init = active & is_pf
    is_dec = active & ~is_pf
    last_tok = (cu[1:] - 1).clamp(0, max(states.shape[0] - 1, 0))
    x = states[last_tok].float()
    if has_prefill:
        mean = state.pool_sum[sl] / state.pool_count[sl].clamp(min=1)[:, None].float()
        x = torch.where(is_init[:, None], mean, x)
    hidden = torch.relu(x @ params.fc1_weight.float().T + params.fc1_bias)
    logq = torch.log_softmax(hidden @ params.fc2_weight.float().T + params.fc2_bias, dim=-1)

    gen = num_generated.long()
    lp_old = state.log_post[sl]
    steps = torch.where(is_dec, (gen - state.post_gen[sl]).clamp(0, 2 ** POW_BITS - 1), 0)
    lp_pred = log_predict(lp_old, params.log_transition_pows, steps)
    # evidence from a non-finite state (NaN / inf in the layer output) is no evidence: a decode row
    # skips the update, a prompt step starts from the prior
    q_ok = ~(torch.isnan(logq) | torch.isposinf(logq)).any(-1)
    do_upd = is_dec & q_ok & ((gen - state.upd_gen[sl]) >= params.update_every)
    lp = torch.where(do_upd[:, None], lp_pred + params.alpha_used * (logq - params.log_prior_used), lp_pred)
    init_lp = torch.where(q_ok[:, None], logq, params.log_prior_used.expand_as(logq))
    lp = torch.where(is_init[:, None], init_lp, lp)
    lp = _log_normalise_rows(lp)
    if params.eps > 0:
        floored = torch.logaddexp(lp, torch.full_like(lp, math.log(params.eps / k))) - math.log1p(params.eps)
        lp = _log_normalise_rows(torch.where((do_upd | is_init)[:, None], floored, lp))
    cap = (max_new_tokens.long() - gen).clamp(min=0).float()
    expected = (lp.exp() * torch.minimum(params.values[None, :], cap[:, None])).sum(-1)

    state.log_post[sl] = torch.where(active[:, None], lp, lp_old)
    state.post_gen[sl] = torch.where(active, num_generated, state.post_gen[sl])
    state.upd_gen[sl] = torch.where(do_upd | is_init, num_generated, state.upd_gen[sl])
    state.expected_remaining[sl] = torch.where(active, expected, state.expected_remaining[sl])
    return state.expected_remaining


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_pool_kernel(states_ptr, state_stride, cu_ptr, slot_ptr, flags_ptr, pool_sum_ptr,
                           pool_cnt_ptr, num_slots, d,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        seg = tl.program_id(0)
        dblk = tl.program_id(1)
        fl = tl.load(flags_ptr + seg)
        slot = tl.load(slot_ptr + seg)
        pooled = ((fl & 1) != 0) & ((fl & 8) == 0) & (slot >= 0) & (slot < num_slots)
        if pooled:
            start = tl.load(cu_ptr + seg)
            end = tl.load(cu_ptr + seg + 1)
            cols = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
            cmask = cols < d
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            t0 = start
            while t0 < end:  # a while loop: the interpreter cannot range() over loaded scalars
                toks = t0 + tl.arange(0, BLOCK_T)
                x = tl.load(states_ptr + toks.to(tl.int64)[:, None] * state_stride + cols[None, :],
                            mask=(toks < end)[:, None] & cmask[None, :], other=0.0)
                acc += tl.sum(x.to(tl.float32), axis=0)
                t0 += BLOCK_T
            first = (fl & 2) != 0
            row = pool_sum_ptr + slot.to(tl.int64) * d + cols
            old = tl.load(row, mask=cmask, other=0.0)
            tl.store(row, tl.where(first, 0.0, old) + acc, mask=cmask)
            if dblk == 0:
                old_cnt = tl.load(pool_cnt_ptr + slot)
                old_cnt = tl.where(first, 0, old_cnt)
                tl.store(pool_cnt_ptr + slot, old_cnt + (end - start))

    @triton.jit
    def _row_meta(rows, n_rows, slot_ptr, flags_ptr, num_slots):
        """Per-row slot (int64, 0 where invalid) and the masks: active, prompt-init, decode."""
        rmask = rows < n_rows
        slot = tl.load(slot_ptr + rows, mask=rmask, other=-1)
        in_range = (slot >= 0) & (slot < num_slots)
        fl = tl.load(flags_ptr + rows, mask=rmask, other=0)
        is_pf = (fl & 1) != 0
        active = rmask & in_range & ((fl & 8) == 0) & ((~is_pf) | ((fl & 4) != 0))
        return tl.where(in_range, slot, 0).to(tl.int64), active, active & is_pf, active & (~is_pf)

    @triton.jit
    def _log_normalise(lp):
        z = lp - tl.max(lp, axis=1)[:, None]
        return z - tl.log(tl.sum(tl.exp(z), axis=1))[:, None]

    @triton.jit
    def _filter_rows(rows, n_rows, slot_ptr, flags_ptr, gen_ptr, max_new_ptr, b2_ptr, lpows_ptr,
                     values_ptr, logpi_ptr, log_post_ptr, post_gen_ptr, upd_gen_ptr, out_ptr,
                     partial_ptr, partial_stride, num_slots, alpha, log_floor, eps_log1p, update_every,
                     NH: tl.constexpr, FILTER_M: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     FLOOR: tl.constexpr, POWS: tl.constexpr):
        """Sum the partial logits of `rows`, then predict / update / floor / read out, in log space."""
        slot, active, is_init, is_dec = _row_meta(rows, n_rows, slot_ptr, flags_ptr, num_slots)
        rmask = rows < n_rows
        ks = tl.arange(0, KP)
        kmask = ks < K
        logits = tl.zeros([FILTER_M, KP], dtype=tl.float32)
        for j in range(0, NH):
            logits += tl.load(partial_ptr + j * partial_stride + rows[:, None] * KP + ks[None, :],
                              mask=rmask[:, None], other=0.0, cache_modifier=".cg")
        logits += tl.load(b2_ptr + ks, mask=kmask, other=0.0)[None, :]
        logq = _log_normalise(tl.where(kmask[None, :], logits, float("-inf")))

        # predict s steps: lp <- log (T^s p), s in binary over log (T^(2^j)) tables (logsumexp)
        gen = tl.load(gen_ptr + rows, mask=rmask, other=0)
        lp = tl.load(log_post_ptr + slot[:, None] * K + ks[None, :], mask=active[:, None] & kmask[None, :],
                     other=0.0)
        lp = tl.where(kmask[None, :], lp, float("-inf"))
        post_gen = tl.load(post_gen_ptr + slot, mask=active, other=0)
        steps = tl.where(is_dec, tl.minimum(tl.maximum(gen - post_gen, 0), (1 << POWS) - 1), 0)
        most = tl.max(steps, axis=0)
        j = 0
        while (most >> j) > 0:    # a while loop: unrolled ifs over 3-D tiles break Triton's layout pass
            la = tl.load(lpows_ptr + j * KP * KP + ks[:, None] * KP + ks[None, :])
            t = lp[:, :, None] + la[None, :, :]
            tm = tl.max(t, axis=1)
            tm = tl.where(tm == float("-inf"), 0.0, tm)
            moved = tl.log(tl.sum(tl.exp(t - tm[:, None, :]), axis=1)) + tm
            lp = tl.where((((steps >> j) & 1) != 0)[:, None], moved, lp)
            j += 1

        # update with the probe's evidence, renormalise, floor
        # evidence from a non-finite state (NaN / inf in the layer output) is no evidence
        bad_q = ((logq != logq) | (logq == float("inf"))) & kmask[None, :]
        q_ok = tl.sum(bad_q.to(tl.int32), axis=1) == 0
        upd_gen = tl.load(upd_gen_ptr + slot, mask=active, other=0)
        do_upd = is_dec & q_ok & ((gen - upd_gen) >= update_every)
        logpi = tl.load(logpi_ptr + ks, mask=kmask, other=0.0)
        lp = tl.where(do_upd[:, None], lp + alpha * (logq - logpi[None, :]), lp)
        init_lp = tl.where(q_ok[:, None], logq, tl.where(kmask[None, :], logpi[None, :], float("-inf")))
        lp = _log_normalise(tl.where(is_init[:, None], init_lp, lp))
        if FLOOR:
            mf = tl.maximum(lp, log_floor)
            floored = mf + tl.log(tl.exp(lp - mf) + tl.exp(log_floor - mf)) - eps_log1p
            floored = tl.where(kmask[None, :], floored, float("-inf"))
            lp = _log_normalise(tl.where((do_upd | is_init)[:, None], floored, lp))

        # readout and the slot's new state
        max_new = tl.load(max_new_ptr + rows, mask=rmask, other=0)
        cap = tl.maximum(max_new - gen, 0).to(tl.float32)
        vals = tl.load(values_ptr + ks, mask=kmask, other=0.0)
        expected = tl.sum(tl.exp(lp) * tl.minimum(vals[None, :], cap[:, None]), axis=1)
        tl.store(log_post_ptr + slot[:, None] * K + ks[None, :], lp, mask=active[:, None] & kmask[None, :])
        tl.store(post_gen_ptr + slot, gen, mask=active)
        tl.store(upd_gen_ptr + slot, gen, mask=do_upd | is_init)
        tl.store(out_ptr + slot, expected, mask=active)

    @triton.jit
    def _probe_fused_kernel(
            states_ptr, state_stride, cu_ptr, slot_ptr, flags_ptr, gen_ptr, max_new_ptr,
            w1_ptr, b1_ptr, w2_ptr, b2_ptr, lpows_ptr, values_ptr, logpi_ptr,
            log_post_ptr, pool_sum_ptr, pool_cnt_ptr, post_gen_ptr, upd_gen_ptr, out_ptr,
            partial_ptr, counter_ptr,
            n_rows, num_slots, partial_stride, alpha, log_floor, eps_log1p, update_every,
            d: tl.constexpr, h: tl.constexpr, K: tl.constexpr, FLOOR: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FILTER_M: tl.constexpr,
            KP: tl.constexpr, DOT_MODE: tl.constexpr, HAS_PREFILL: tl.constexpr, POWS: tl.constexpr):
        tile = tl.program_id(0)
        hblk = tl.program_id(1)
        NH: tl.constexpr = (h + BLOCK_H - 1) // BLOCK_H
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        slot, active, is_init, is_dec = _row_meta(rows, n_rows, slot_ptr, flags_ptr, num_slots)
        tok = (tl.load(cu_ptr + rows + 1, mask=rmask, other=1) - 1).to(tl.int64)

        # hidden[:, hblk] = relu(x @ W1[hblk]^T + b1), x = newest state (decode) or prompt mean
        hs = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = hs < h
        if HAS_PREFILL:
            cnt = tl.load(pool_cnt_ptr + slot, mask=is_init, other=1)
            inv_cnt = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            x = tl.load(states_ptr + tok[:, None] * state_stride + cols[None, :],
                        mask=is_dec[:, None] & cmask[None, :], other=0.0)
            w = tl.load(w1_ptr + hs.to(tl.int64)[:, None] * d + cols[None, :],
                        mask=hmask[:, None] & cmask[None, :], other=0.0)
            if DOT_MODE == 1:      # states and weights in one 16-bit type, decode rows only
                acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
            else:
                xf = x.to(tl.float32)
                if HAS_PREFILL:
                    xp = tl.load(pool_sum_ptr + slot[:, None] * d + cols[None, :],
                                 mask=is_init[:, None] & cmask[None, :], other=0.0)
                    xf += xp * inv_cnt[:, None]
                if DOT_MODE == 2:  # fp32 rows into 16-bit dots: x = hi + mid + lo, ~fp32 precision
                    hi = xf.to(w.dtype)
                    rest = xf - hi.to(tl.float32)
                    mid = rest.to(w.dtype)
                    lo = (rest - mid.to(tl.float32)).to(w.dtype)
                    acc = tl.dot(hi, tl.trans(w), acc)
                    acc = tl.dot(mid, tl.trans(w), acc)
                    acc = tl.dot(lo, tl.trans(w), acc)
                else:
                    acc = tl.dot(xf, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        b1 = tl.load(b1_ptr + hs, mask=hmask, other=0.0)
        hidden = tl.maximum(acc + b1[None, :], 0.0)
        ks = tl.arange(0, KP)
        w2 = tl.load(w2_ptr + ks[:, None] * h + hs[None, :], mask=(ks < K)[:, None] & hmask[None, :],
                     other=0.0).to(tl.float32)
        part = tl.dot(hidden, tl.trans(w2), input_precision="ieee")
        tl.store(partial_ptr + hblk * partial_stride + rows[:, None] * KP + ks[None, :], part,
                 mask=rmask[:, None])

        # The last program of this row tile to arrive sums the partial logits (fixed order) and
        # runs the filter, FILTER_M rows at a time; it resets the counter for the next launch.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1)
        if arrived == NH - 1:
            tl.debug_barrier()
            tl.store(counter_ptr + tile, 0)
            for r0 in range(0, BLOCK_M, FILTER_M):
                sub = tile * BLOCK_M + r0 + tl.arange(0, FILTER_M)
                _filter_rows(sub, n_rows, slot_ptr, flags_ptr, gen_ptr, max_new_ptr, b2_ptr, lpows_ptr,
                             values_ptr, logpi_ptr, log_post_ptr, post_gen_ptr, upd_gen_ptr, out_ptr,
                             partial_ptr, partial_stride, num_slots, alpha, log_floor, eps_log1p,
                             update_every, NH=NH, FILTER_M=FILTER_M, K=K, KP=KP, FLOOR=FLOOR, POWS=POWS)


def pick_config(n_rows: int, d: int, h: int, fp32_operands: bool = False) -> dict:
    """Tile sizes for the fused kernel (a heuristic; bench/suite/kernels_probe.py sweeps others).
    fp32 operands (fp32 weights or states) take twice the shared memory per tile: BLOCK_D halves."""
    if interpreter_on():
        return dict(BLOCK_M=16, BLOCK_H=min(32, max(16, 1 << (h - 1).bit_length())),
                    BLOCK_D=min(64, max(16, 1 << (d - 1).bit_length())), num_warps=4, num_stages=1)
    if n_rows <= 16:
        bm, bh = 16, 16
    elif n_rows <= 64:
        bm, bh = 32, 32
    elif n_rows <= 256:
        bm, bh = 64, 32
    else:
        bm, bh = 64, 64
    return dict(BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=64 if fp32_operands else 128, num_warps=4, num_stages=3)


def _probe_triton(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state,
                  has_prefill, config):
    n, d = slot_ids.numel(), states.shape[1]
    if n == 0:
        return state.expected_remaining
    h, k = params.probe_hidden, params.num_bins
    w1 = params.fc1_weight
    low_precision = w1.dtype in (torch.bfloat16, torch.float16) and states.dtype == w1.dtype
    cfg = dict(pick_config(n, d, h, fp32_operands=not low_precision))
    cfg.update(config or {})
    bm, bh = cfg["BLOCK_M"], cfg["BLOCK_H"]
    if bm % MIN_BLOCK_M or bm > MAX_BLOCK_M or bh < MIN_BLOCK_H:
        raise ValueError(f"probe: BLOCK_M must be a multiple of {MIN_BLOCK_M} up to {MAX_BLOCK_M} and "
                         f"BLOCK_H >= {MIN_BLOCK_H}, got {cfg}")
    if has_prefill:
        block_d_pool = 128 if not interpreter_on() else 64
        _probe_pool_kernel[(n, triton.cdiv(d, block_d_pool))](
            states, states.stride(0), cu_seqlens, slot_ids, flags, state.pool_sum, state.pool_count,
            state.num_slots, d, BLOCK_T=16, BLOCK_D=block_d_pool, num_warps=4)
    dot_mode = 0 if interpreter_on() or not low_precision else (2 if has_prefill else 1)
    kp = _bins_pad(k)
    eps = params.eps
    _probe_fused_kernel[(triton.cdiv(n, bm), triton.cdiv(h, bh))](
        states, states.stride(0), cu_seqlens, slot_ids, flags, num_generated, max_new_tokens,
        w1, params.fc1_bias, params.fc2_weight, params.fc2_bias, params.log_transition_pows,
        params.values, params.log_prior_used,
        state.log_post, state.pool_sum, state.pool_count, state.post_gen, state.upd_gen,
        state.expected_remaining, state.partials, state.tile_counters,
        n, state.num_slots, state.partials.stride(0), params.alpha_used,
        math.log(eps / k) if eps > 0 else 0.0, math.log1p(eps), params.update_every,
        d=d, h=h, K=k, FLOOR=eps > 0, BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=cfg["BLOCK_D"], FILTER_M=MIN_BLOCK_M, KP=kp,
        DOT_MODE=dot_mode,
        HAS_PREFILL=bool(has_prefill), POWS=POW_BITS,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return state.expected_remaining


def probe_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens,
               params: ProbeParams, state: ProbeState, *, has_prefill: bool = True,
               impl: str | None = None, config: dict | None = None) -> torch.Tensor:
    """Run the probe and the filter for one step, in place on `state`; returns
    `state.expected_remaining` (indexed by slot). `has_prefill=False` promises that no row has
    the PREFILL flag: the pooling pass is skipped and the step is one launch (CUDA-graph case).
    Inputs are only shape-checked here; `validate_step` checks values (it syncs)."""
    _check_step(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params, state)
    if use_triton(states, params.fc1_weight, state.log_post, impl=impl):
        return _probe_triton(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params,
                             state, has_prefill, config)
    return probe_reference(states, cu_seqlens, slot_ids, flags, num_generated, max_new_tokens, params,
                           state, has_prefill=has_prefill)
