"""Next-token sampling on the device, one row per request, each with its own parameters.

Pipeline per row, as transformers' `generate` orders it: repetition penalty (over every token the
request has fed to the model: prompt + generated) -> temperature -> top-k -> top-p -> draw.
`temperature <= 0` means greedy (argmax after the penalty). `top_k = 0` and `top_p = 1` disable
those filters.

`sample` avoids a full-vocabulary sort: rows without top-k / top-p draw from the full softmax by
inverse CDF in vocabulary order; filtered rows take their `max_candidates` (default
`MAX_CANDIDATES`) largest logits with `torch.topk` and apply top-k, then top-p, inside them. The
distribution equals `sample_reference` (the sorted definition) whenever top_k <= max_candidates
and the top-p nucleus holds at most max_candidates tokens; a wider nucleus is truncated to the
candidates (renormalised), which callers that know a row's top_k avoid by using the reference.
Both are graph-safe: no host reads, shapes fixed by [R, V].

Randomness is counter-based: a row's draw is an inverse-CDF lookup of one uniform
`counter_uniform(seed, position)` computed on the host from the request's seed and the position
of the token being sampled, so a request's samples do not depend on which other requests share
its batch. Nothing here reads device memory from the host.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
MAX_CANDIDATES = 1024


@dataclass(frozen=True)
class SampleParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        validate_params(self)


# Bounds of the values that reach the device: the runner stages temperature, top_p and the
# repetition penalty as float32 (trail.step_buffers) and computes logits * penalty / temperature
# there. float32 holds normal numbers in [1.2e-38, 3.4e38]; a value outside it is 0 or inf on the
# device (temperature=1e-45 gave NaN probabilities, top_p=1e-300 became 0 and stalled the batch).
# [1e-6, 1e6] keeps a value, its reciprocal and their product with any real logit (|x| << 1e26)
# finite and normal: temperature 1e-6 already scales a logit gap of 1e-5 to 10 (greedy for every
# purpose; 0 means greedy exactly), and a top_p below 1e-6 is below the resolution of a float32
# cumulative probability (~6e-8 relative), so it would keep the top token only, as 1e-6 does.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6
MIN_TOP_P = 1e-6
MIN_PENALTY, MAX_PENALTY = 1e-6, 1e6
MAX_TOP_K = 2**31 - 1            # an int64 column, but any k past the vocabulary means "off"


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def validate_params(p, where: str | None = None) -> None:
    """Checks any object with SampleParams' attributes (temperature, top_p, top_k,
    repetition_penalty, seed); raises ValueError naming the bad field, its value and the allowed
    range. Types are strict (no bool for a number, no float for an integer) and the float ranges
    are the ones that stay finite and normal in float32 on the device (see MIN_TEMPERATURE)."""
    who = f"{where if where is not None else type(p).__name__}: "

    def bad(name, want):
        value = getattr(p, name)
        raise ValueError(f"{who}{name} must be {want}, got {value!r} ({type(value).__name__})")

    t = p.temperature
    if not (_is_real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
        bad("temperature", f"0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (sampling; "
                           f"float32 on the device, where a smaller one overflows logits / temperature)")
    if not (_is_real(p.top_p) and MIN_TOP_P <= p.top_p <= 1):
        bad("top_p", f"a number in [{MIN_TOP_P:g}, 1] (1 = off; float32 on the device, where a smaller one "
                     f"rounds to 0)")
    if not (_is_int(p.top_k) and 0 <= p.top_k <= MAX_TOP_K):
        bad("top_k", f"an integer in [0, {MAX_TOP_K}] (0 = off)")
    r = p.repetition_penalty
    if not (_is_real(r) and MIN_PENALTY <= r <= MAX_PENALTY):
        bad("repetition_penalty", f"a number in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (1 = off; float32 on the "
                                  f"device, where it and its reciprocal must stay finite)")
    if p.seed is not None and not (_is_int(p.seed) and 0 <= p.seed < 2**63):
        bad("seed", "None or an integer in [0, 2**63)")


GREEDY = SampleParams()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def counter_uniform(seed: int, counter: int) -> float:
    """A uniform in (0, 1), a pure function of (seed, counter)."""
    h = _splitmix64(_splitmix64(seed & _MASK64) ^ (counter & _MASK64))
    return ((h >> 11) + 0.5) / float(1 << 53)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """`counter_uniform` over arrays (uint64 seeds and counters): float64, the same values."""
    with np.errstate(over="ignore"):
        h = _splitmix64_np(_splitmix64_np(np.asarray(seeds, np.uint64)) ^ np.asarray(counters, np.uint64))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' rule on the tokens in `seen` [R, V] bool: score < 0 -> score * p, else score / p."""
    pen = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)


def _sorted_filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Sort rows descending; keep = top-k (ties with the k-th value kept) then top-p, as transformers
    does it; the kept entries are a prefix of each sorted row."""
    vocab = scaled.shape[-1]
    vals, idx = torch.sort(scaled, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = vals.gather(1, (k - 1)[:, None])
    keep = vals >= kth
    probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs          # probability mass ranked above each token
    top_p = top_p[:, None].to(probs.dtype)
    keep &= (before < top_p) | (top_p >= 1.0)
    return vals, idx, keep


def sampling_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
    """Logits in vocab order after temperature / top-k / top-p, -inf where filtered (what
    transformers' warpers return; used by tests and for log-probs)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    vals, idx, keep = _sorted_filter(logits / t, top_k, top_p)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(1, idx, vals.masked_fill(~keep, float("-inf")))


def sample_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     repetition_penalty: torch.Tensor, uniforms: torch.Tensor,
                     seen: torch.Tensor | None = None) -> torch.Tensor:
    """The definition (a full sort per row): logits fp32 [R, V] -> next token ids int64 [R]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    greedy = torch.argmax(logits, dim=-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    vals, idx, keep = _sorted_filter(logits / t, top_k, top_p)
    probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True)
    pos = torch.minimum(pos, keep.sum(-1, keepdim=True) - 1)   # u * total rounding up to total
    drawn = idx.gather(1, pos).squeeze(1)
    return torch.where(temperature > 0, drawn, greedy)


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of each row of non-negative `weights` [R, N] at `uniforms` [R]: the first index
    whose cumulative weight exceeds u * total (the target is kept strictly below the total, so a
    zero-weight entry is never drawn)."""
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    # clamped: a non-finite row (a padded row's NaN logits) must not index past the row
    return torch.searchsorted(cdf, target, right=True).clamp_(max=weights.shape[-1] - 1)


def candidate_filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     max_candidates: int = MAX_CANDIDATES):
    """Top-k then top-p over each row's `max_candidates` largest entries (no full sort).
    -> (candidate indices [R, C] in descending order, their probabilities under the top-k
    distribution [R, C], keep [R, C]); the kept entries are a prefix of each row."""
    vocab = scaled.shape[-1]
    kc = min(max_candidates, vocab)
    vals, idx = torch.topk(scaled, kc, dim=-1, largest=True, sorted=True)
    k = torch.where(top_k > 0, top_k.clamp(max=kc), torch.full_like(top_k, kc))
    kth = vals.gather(1, (k - 1)[:, None])
    keep = vals >= kth                                    # ties with the k-th value kept, as transformers
    # normaliser: the kept candidates under top-k; the whole vocabulary without it
    lse_k = torch.logsumexp(vals.masked_fill(~keep, float("-inf")), dim=-1, keepdim=True)
    lse = torch.where((top_k > 0)[:, None] & (top_k[:, None] < vocab), lse_k,
                      torch.logsumexp(scaled, dim=-1, keepdim=True))
    probs = torch.exp(vals - lse).masked_fill(~keep, 0.0)
    before = torch.cumsum(probs, dim=-1) - probs          # mass ranked above each candidate
    top_p = top_p[:, None].to(probs.dtype)
    keep &= (before < top_p) | (top_p >= 1.0)
    return idx, probs, keep


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           repetition_penalty: torch.Tensor, uniforms: torch.Tensor,
           seen: torch.Tensor | None = None, *, max_candidates: int = MAX_CANDIDATES) -> torch.Tensor:
    """logits fp32 [R, V] -> next token ids int64 [R]; every parameter tensor is per row [R].
    The distribution of `sample_reference` without its sort (module docstring: when they agree)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    greedy = torch.argmax(logits, dim=-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    scaled = logits / t
    # rows without filters: the full softmax, inverse CDF in vocabulary order
    probs = torch.exp(scaled - torch.logsumexp(scaled, dim=-1, keepdim=True))
    full = _draw(probs, uniforms).squeeze(1)
    # filtered rows: top-k / top-p among the candidates
    idx, cprobs, keep = candidate_filter(scaled, top_k, top_p, max_candidates)
    drawn = idx.gather(1, _draw(cprobs.masked_fill(~keep, 0.0), uniforms)).squeeze(1)
    unfiltered = ((top_k == 0) | (top_k >= logits.shape[-1])) & (top_p >= 1.0)
    return torch.where(temperature > 0, torch.where(unfiltered, full, drawn), greedy)
