"""Right-censored labels: outputs that hit max_new_tokens are trained on "at least what was seen",
not on the cap. Each test would fail if censoring were ignored."""
import math

import pytest
import torch

from trail.predictor import bins as B
from trail.predictor.embed import SampledFeatures
from trail.predictor.train_probe import (TrainConfig, censored_nll, model_prior, split_mask, train_layer_probe,
                                         train_mlp)


def test_censored_nll_is_the_tail_mass():
    torch.manual_seed(0)
    logits = torch.randn(5, 6)
    y = torch.tensor([0, 2, 5, 3, 1])
    cens = torch.tensor([False, True, True, False, True])
    p = torch.softmax(logits, -1)
    want = []
    for i in range(5):
        want.append(-math.log(float(p[i, y[i]:].sum())) if cens[i] else -math.log(float(p[i, y[i]])))
    assert float(censored_nll(logits, y, cens)) == pytest.approx(sum(want) / 5, rel=1e-5)
    assert float(censored_nll(logits, y, None)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    # a censored row at bin 0 carries no information: its loss is 0
    assert float(censored_nll(logits[:1], torch.tensor([0]), torch.tensor([True]))) == pytest.approx(0, abs=1e-6)


def test_censoring_moves_the_optimum_of_a_marginal():
    """One constant feature: half the rows are observed in bin 8, half censored at bin 2 (the
    truth is >= bin 2). The censored MLE puts (almost) all mass on bin 8; treating the censored
    rows as observed splits it 50/50 between bins 2 and 8."""
    n = 400
    x = torch.ones(n, 3)
    y = torch.tensor([8, 2] * (n // 2))
    cens = torch.tensor([False, True] * (n // 2))
    vals = [float(k) for k in range(10)]
    cfg = TrainConfig(hidden=16, epochs=60, patience=60, lr=3e-2, batch_size=100)
    empty = torch.zeros(0, 3)
    args = (x, y, empty, torch.zeros(0), torch.zeros(0), vals, 10, cfg)
    with_c, _ = train_mlp(*args, censored=cens)
    without, _ = train_mlp(*args, censored=None)
    with torch.no_grad():
        pc, pu = torch.softmax(with_c(x[:1]), -1)[0], torch.softmax(without(x[:1]), -1)[0]
    assert pc[8] > 0.9, pc
    assert abs(float(pu[8]) - 0.5) < 0.1 and abs(float(pu[2]) - 0.5) < 0.1, pu
    pi = model_prior(with_c, x)
    assert len(pi) == 10 and abs(sum(pi) - 1) < 1e-9 and min(pi) > 0 and pi[8] > 0.9


def _looping_feats(n=300, max_new=64, num_decode=8, seed=0):
    """Requests of two kinds, told apart by feature 0: 'loops' (+1) always hit the cap, 'short'
    (-1) end after 6-10 tokens. No feature says how far a request has got."""
    gen = torch.Generator().manual_seed(seed)
    ids = [f"req{i}" for i in range(n)]
    loops = torch.rand(n, generator=gen) < 0.5
    lens = torch.where(loops, torch.full((n,), max_new), torch.randint(6, 11, (n,), generator=gen))
    s = 1 + num_decode
    g = torch.full((n, s), -1, dtype=torch.int32)
    for i in range(n):
        pos = torch.randperm(int(lens[i]) - 1, generator=gen)[:num_decode] + 1
        g[i, 0] = 0
        g[i, 1: 1 + len(pos)] = pos.sort().values.int()
    feats = torch.randn(1, n, s, 4, generator=gen) * 0.1
    feats[0, :, :, 0] = torch.where(loops, 1.0, -1.0)[:, None]
    return SampledFeatures(ids, [0], feats.half(), g, lens.int(), loops.clone(), {"num_decode": num_decode})


def test_censored_probe_reads_out_the_cap_for_looping_requests():
    """Training on the seen remaining length of capped requests teaches 'about half way' for a
    loop; the censored probe learns 'more than is left' and its capped readout is then exact."""
    feats = _looping_feats()
    edges = B.default_edges(8, 64)
    cfg = TrainConfig(hidden=32, epochs=40, patience=40, lr=3e-3, batch_size=128)
    _, with_c = train_layer_probe(feats, 0, edges, cfg, "m", 64, censor=True)
    _, without = train_layer_probe(feats, 0, edges, cfg, "m", 64, censor=False)
    assert with_c.training["censored_rows"] > 0
    assert with_c.validation["mae_samples"] < 5.0, with_c.validation
    assert without.validation["mae_samples"] > 2 * with_c.validation["mae_samples"], (with_c.validation,
                                                                                       without.validation)
    # pi is the classifier's marginal: the top bin carries the loops' mass (about half the rows)
    assert with_c.pi[-1] > 0.3 and without.pi[-1] < with_c.pi[-1]


def test_prompt_predictor_trains_with_censored_totals():
    from trail.predictor.train_prompt import train_prompt_predictor
    from trail.predictor.trace import TraceRecord

    recs = []
    for i in range(200):
        loop = i % 2 == 0
        n_out = 32 if loop else 4
        recs.append(TraceRecord(f"p{i}", "t", "x", [1, 2], list(range(n_out)), "length" if loop else "eos"))
    x = torch.tensor([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(200)])
    mlp, spec = train_prompt_predictor("prompt_boe", recs, x, B.default_edges(4, 32),
                                       TrainConfig(hidden=16, epochs=30, patience=30, lr=1e-2, batch_size=50),
                                       "m", 32)
    train = split_mask([r.id for r in recs], "train")
    assert spec.training["censored_requests"] == int(train[::2].sum()) > 0
    with torch.no_grad():
        p = torch.softmax(mlp(x[:2]), -1)
    assert p[0, -1] > 0.9 and p[1, 0] > 0.9
