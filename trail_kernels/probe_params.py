"""A length probe's weights and its filter's constants: `ProbeParams` (the MLP in nn.Linear layout,
the bins and their prior) and what is derived from them once, off the hot path: the per-step
move probabilities between bins and the log tables of the transition matrix's powers
(`log_transition_pows`, which the kernels and the reference read to predict any number of steps
at the same cost). Loaded by trail.predictor.probe_file, used by every probe_step; the method is
in trail_kernels/probe.py's docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

RULES = ("bayes", "trail")
POW_BITS = 16                      # predict steps are clamped to 2**POW_BITS - 1 per row
MAX_BINS = 32


def padded_num_bins(num_bins: int) -> int:
    """The bin axis as the kernels tile it (KP): a power of two, at least 16."""
    return max(16, 1 << (num_bins - 1).bit_length())


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
        self.log_transition_pows = _log_transition_power_table(self.move_prob, padded_num_bins(k)).to(dev)

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
        widths[-1] = values[-1] - lower + 1          # geometric tail with mean v - e (trail_kernels/probe.py)
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
