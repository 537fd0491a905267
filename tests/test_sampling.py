"""The sampler: transformers' semantics for repetition penalty / temperature / top-k / top-p,
greedy rows, draws that follow the filtered distribution, and counter-based randomness that does
not depend on the batch."""
import math

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from trail.sampling import (SampleParams, apply_repetition_penalty, counter_uniform, sample,
                            sampling_logits)

ROWS = [  # temperature, top_k, top_p
    (1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 50, 1.0), (0.5, 20, 0.8), (1.0, 1, 0.5), (2.0, 300, 0.3),
    (0.9, 1000, 0.99),
]


def _params(rows):
    t = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    k = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    p = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    return t, k, p


def test_filters_equal_transformers_warpers(seeded):
    logits = torch.randn(len(ROWS), 1000, generator=seeded) * 3
    t, k, p = _params(ROWS)
    ours = sampling_logits(logits, t, k, p)
    for i, (temp, top_k, top_p) in enumerate(ROWS):
        ref = TemperatureLogitsWarper(temp)(None, logits[i:i + 1].clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref[0])), f"row {i}: kept sets differ"
        kept = ~torch.isinf(ref[0])
        torch.testing.assert_close(ours[i][kept], ref[0][kept], rtol=1e-6, atol=0)


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    ours = sampling_logits(logits, torch.ones(1), torch.tensor([2]), torch.ones(1))
    ref = TopKLogitsWarper(2)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert (~torch.isinf(ours)).sum() == 3


def test_repetition_penalty_equals_transformers(seeded):
    logits = torch.randn(3, 200, generator=seeded)
    history = torch.randint(0, 200, (3, 30), generator=seeded)
    seen = torch.zeros(3, 200, dtype=torch.bool).scatter_(1, history, True)
    pen = torch.tensor([1.1, 1.0, 1.7])
    ours = apply_repetition_penalty(logits, seen, pen)
    for i in range(3):
        ref = RepetitionPenaltyLogitsProcessor(float(pen[i]))(history[i:i + 1], logits[i:i + 1].clone())
        assert torch.equal(ours[i], ref[0])


def test_greedy_rows_take_the_penalised_argmax(seeded):
    logits = torch.randn(4, 100, generator=seeded)
    seen = torch.zeros(4, 100, dtype=torch.bool)
    top = logits.argmax(-1)
    seen[torch.arange(4), top] = True
    zeros = torch.zeros(4)
    out = sample(logits, zeros, torch.full((4,), 5), torch.full((4,), 0.5), torch.full((4,), 1.0),
                 torch.rand(4, dtype=torch.float64), seen)
    assert torch.equal(out, top)                     # penalty 1: no change
    pen = torch.full((4,), 50.0)
    out = sample(logits, zeros, torch.zeros(4, dtype=torch.long), torch.ones(4), pen,
                 torch.rand(4, dtype=torch.float64), seen)
    assert torch.equal(out, apply_repetition_penalty(logits, seen, pen).argmax(-1))
    assert not torch.equal(out, top)


def _draws(logits_row, temp, top_k, top_p, n, seed=0):
    rows = logits_row.expand(n, -1)
    u = torch.tensor([counter_uniform(seed, c) for c in range(n)], dtype=torch.float64)
    return sample(rows, torch.full((n,), temp), torch.full((n,), top_k), torch.full((n,), top_p),
                  torch.ones(n), u)


@pytest.mark.parametrize("temp,top_k,top_p", [(1.0, 0, 1.0), (0.8, 6, 1.0), (1.5, 0, 0.7)])
def test_draws_follow_the_filtered_distribution(seeded, temp, top_k, top_p):
    vocab, n = 12, 20000
    logits = torch.randn(1, vocab, generator=seeded) * 1.5
    probs = torch.softmax(sampling_logits(logits, torch.tensor([temp]), torch.tensor([top_k]),
                                          torch.tensor([top_p])), -1)[0].double()
    counts = torch.bincount(_draws(logits, temp, top_k, top_p, n), minlength=vocab).double()
    assert counts[probs == 0].sum() == 0, "drew a filtered token"
    # chi-square over the kept tokens; 99.99% quantile for <= 11 dof is < 40
    kept = probs > 0
    chi2 = ((counts[kept] - n * probs[kept]) ** 2 / (n * probs[kept])).sum()
    assert chi2 < 40, f"chi2={chi2:.1f}"


def test_counter_uniform_is_uniform_and_seeded():
    u = torch.tensor([counter_uniform(123, c) for c in range(20000)])
    assert 0 < u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200
    assert counter_uniform(1, 5) == counter_uniform(1, 5) != counter_uniform(2, 5) != counter_uniform(1, 6)


def test_rows_do_not_depend_on_batch_composition(seeded):
    logits = torch.randn(6, 500, generator=seeded)
    t, k, p = _params(ROWS[:6])
    u = torch.tensor([counter_uniform(s, 17) for s in range(6)], dtype=torch.float64)
    full = sample(logits, t, k, p, torch.ones(6), u)
    perm = torch.tensor([4, 1, 5, 0])
    part = sample(logits[perm], t[perm], k[perm], p[perm], torch.ones(4), u[perm])
    assert torch.equal(part, full[perm])


def test_params_are_validated():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                dict(top_k=1.5), dict(repetition_penalty=0.0), dict(seed=-3), dict(temperature=math.nan)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SampleParams(**bad)


# ---- the sort-free sampler against the sorted definition -------------------------------------
from trail.sampling import candidate_filter, sample_reference  # noqa: E402


def test_candidate_filter_keeps_the_reference_set(seeded):
    logits = torch.randn(len(ROWS), 1000, generator=seeded) * 3
    t, k, p = _params(ROWS)
    ref = ~torch.isinf(sampling_logits(logits, t, k, p))
    idx, _, keep = candidate_filter(logits / t[:, None], k, p, max_candidates=1000)
    ours = torch.zeros_like(ref).scatter(1, idx, keep)
    assert torch.equal(ours, ref)
    # with fewer candidates than the vocabulary: the same sets wherever the nucleus fits
    idx, _, keep = candidate_filter(logits / t[:, None], k, p, max_candidates=400)
    ours = torch.zeros_like(ref).scatter(1, idx, keep)
    fits = ref.sum(-1) < 400
    assert fits.sum() >= 5 and torch.equal(ours[fits], ref[fits])


@pytest.mark.parametrize("temp,top_k,top_p", [(1.0, 0, 1.0), (0.8, 6, 1.0), (1.5, 0, 0.7), (1.0, 4, 0.8)])
def test_fast_and_reference_samplers_draw_the_same_distribution(seeded, temp, top_k, top_p):
    vocab, n = 12, 20000
    logits = (torch.randn(1, vocab, generator=seeded) * 1.5).expand(n, -1)
    u = torch.tensor([counter_uniform(7, c) for c in range(n)], dtype=torch.float64)
    args = (torch.full((n,), temp), torch.full((n,), top_k), torch.full((n,), top_p), torch.ones(n), u)
    fast = torch.bincount(sample(logits, *args, max_candidates=8), minlength=vocab).double()
    ref = torch.bincount(sample_reference(logits, *args), minlength=vocab).double()
    assert torch.equal(fast == 0, ref == 0)                     # the same support
    kept = ref > 0                                             # two-sample chi-square, <= 11 dof
    chi2 = ((fast[kept] - ref[kept]) ** 2 / (fast[kept] + ref[kept])).sum()
    assert chi2 < 40, f"chi2={chi2:.1f}"


def test_fast_sampler_never_sorts_and_handles_non_finite_rows(seeded, monkeypatch):
    logits = torch.randn(3, 5000, generator=seeded)
    logits[2] = float("nan")                                   # a padded row's logits (greedy)
    def no_sort(*a, **k):
        raise AssertionError("full sort")
    monkeypatch.setattr(torch, "sort", no_sort)
    out = sample(logits, torch.tensor([1.0, 0.7, 0.0]), torch.tensor([0, 50, 0]), torch.tensor([1.0, 0.9, 1.0]),
                 torch.ones(3), torch.tensor([0.3, 0.999999, 0.5], dtype=torch.float64))
    assert out.shape == (3,) and int(out[:2].min()) >= 0 and int(out[:2].max()) < 5000
