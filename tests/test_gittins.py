"""trail.gittins: the Gittins key over bin posteriors against a float64 brute force, its point-mass
and ordering properties, and the simulator's `gittins` predictions mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trail.gittins import expected_remaining, gittins_key, gittins_key_np

VALUES = [22.92, 75.03, 127.11, 178.50, 229.23, 280.35, 332.08, 383.30, 434.23, 494.82]   # shipped probe's


def brute(p: np.ndarray, v: np.ndarray) -> float:
    """float64, one row: max over a dense grid of D (and the support points) of P(R <= D) /
    E[min(R, D)] for R = v_k w.p. p_k; returns 1 / max."""
    p = p.astype(np.float64) / p.sum()
    grid = np.union1d(np.linspace(0.0, 600.0, 3001), v)
    best = 0.0
    for d in grid:
        f = p[v <= d].sum()
        e = (p * np.minimum(v, d)).sum()
        if f > 0:
            best = max(best, f / e if e > 0 else np.inf)
    return 1.0 / best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = 40, len(VALUES)
    # fresh random posteriors, never zeros: Dirichlet of mixed concentration (peaked and flat rows)
    post = rng.dirichlet(np.full(k, 0.3), size=n) * 0.98 + rng.dirichlet(np.ones(k), size=n) * 0.02
    cap = rng.integers(1, 513, size=n).astype(np.float64)
    shift = rng.integers(0, 3, size=n).astype(np.float64)
    got = gittins_key(torch.from_numpy(post), VALUES, cap=torch.from_numpy(cap), shift=torch.from_numpy(shift),
                      dtype=torch.float64).numpy()
    v = np.asarray(VALUES)
    want = np.array([brute(post[i], np.maximum(np.minimum(v, cap[i]) - shift[i], 0.0)) for i in range(n)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    got32 = gittins_key(torch.from_numpy(post.astype(np.float16)), VALUES, cap=cap, shift=shift).numpy()
    np.testing.assert_allclose(got32, want, rtol=2e-3, atol=1e-3)       # float16 posteriors, float32 math
    mean = expected_remaining(post, VALUES, cap=cap, shift=shift, dtype=torch.float64).numpy()
    assert (got <= mean + 1e-9).all()                                    # D = max support: E[R] / 1


def test_point_mass_key_is_its_length():
    post = np.eye(len(VALUES))
    np.testing.assert_allclose(gittins_key(post, VALUES, dtype=torch.float64).numpy(), VALUES, rtol=1e-12)
    # capped: the mass at 494.8 with 100 tokens allowed is R = 100
    assert gittins_key(post[-1:], VALUES, cap=100.0, dtype=torch.float64).item() == pytest.approx(100.0)
    np.testing.assert_allclose(gittins_key(post, VALUES, shift=1.0, dtype=torch.float64).numpy(),
                               np.asarray(VALUES) - 1, rtol=1e-12)


def test_short_mass_ranks_first_despite_larger_mean():
    k = len(VALUES)
    a = np.full(k, 1e-4)
    a[0], a[-1] = 0.3, 0.7 - 1e-4 * (k - 2)      # 30% finishes within ~23 tokens, else ~495: mean ~353
    b = np.full(k, 1e-4)
    b[5] = 1 - 1e-4 * (k - 1)                     # surely ~280 tokens
    post = np.stack([a, b])
    mean = expected_remaining(post, VALUES).numpy()
    key = gittins_key(post, VALUES).numpy()
    assert mean[0] > mean[1]                      # the mean serves b first
    assert key[0] < key[1]                        # the Gittins key serves a first
    assert key[0] == pytest.approx(76.7, abs=1.0) and key[1] == pytest.approx(280.3, abs=0.5)


def test_edge_cases():
    assert gittins_key(np.zeros((0, 10)), VALUES).shape == (0,)
    with pytest.raises(ValueError):
        gittins_key(np.ones((2, 10)), VALUES[::-1])
    with pytest.raises(ValueError):
        gittins_key(np.ones((2, 9)), VALUES)
    with pytest.raises(ValueError):
        gittins_key(np.ones(10), VALUES)
    rng = np.random.default_rng(5)
    post = rng.dirichlet(np.ones(10), size=1000).astype(np.float32)
    cap = rng.integers(1, 513, size=1000)
    np.testing.assert_allclose(gittins_key_np(post, VALUES, cap=cap, shift=1.0, chunk=128),
                               gittins_key(post, VALUES, cap=cap, shift=1.0).numpy(), rtol=1e-6)


def _tiny_pool_with_posteriors():
    from trail.sim_workload import LengthPool

    rng = np.random.default_rng(3)
    L = rng.integers(5, 60, size=12)
    cu = np.zeros(len(L) + 1, np.int64)
    cu[1:] = np.cumsum(L)
    post = rng.dirichlet(np.ones(len(VALUES)), size=int(cu[-1])).astype(np.float16)
    pool = LengthPool(rng.integers(10, 100, size=len(L)), L, L * 1.1, cu, np.zeros(int(cu[-1]), np.float32), 512)
    return pool, post


def test_sim_gittins_mode():
    from trail import sim
    from trail.sim_workload import attach_posteriors

    pool, post = _tiny_pool_with_posteriors()
    with pytest.raises(ValueError, match="posteriors"):
        sim.make_trace(pool, np.zeros(5), "gittins")
    attach_posteriors(pool, post, VALUES)
    g = np.concatenate([np.arange(x) for x in pool.output_len])
    cap = 512 - g
    np.testing.assert_allclose(pool.pred, expected_remaining(post, VALUES, cap=cap).numpy(), rtol=1e-3, atol=1e-2)
    # the key fed after a token is the posterior's key of R - 1, plus 1 (simulate subtracts it)
    np.testing.assert_allclose(pool.gittins, gittins_key(post, VALUES, cap=cap, shift=1.0).numpy() + 1, rtol=1e-5)
    tr = sim.make_trace(pool, np.linspace(0, 1, 30), "gittins", seed=1)
    tm = sim.make_trace(pool, np.linspace(0, 1, 30), "recorded", seed=1)
    assert tr.predictions == "gittins" and np.array_equal(tr.output_len, tm.output_len)
    np.testing.assert_array_equal(tr.prompt_pred, tm.prompt_pred)           # admission: the prompt predictor
    assert (tr.pred <= tm.pred + 1 + 1e-3).all() and not np.allclose(tr.pred, tm.pred)
    eng = sim.regime_engine("ample", pool, policy="trail", max_batch=4)
    res = sim.simulate(tr, eng, sim.llama3_8b_kv_spec(), sim.default_step_model())
    assert np.isfinite(res.finish).all()


def test_load_recorded_with_posteriors_subset(tmp_path):
    """A posteriors file of some of the recorded requests: the pool keeps those, in the recorded
    order, and bench/sim_gittins.py's committed-prediction pool lines up with it."""
    import json

    from bench.common import SHIPPED_PROBE_RECORDED
    from bench.sim_gittins import pools
    from trail import sim

    d = np.load(SHIPPED_PROBE_RECORDED)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(d["ids"]), size=25, replace=False))[::-1]     # stored in another order
    L = d["output_len"][pick]
    cu = np.zeros(len(pick) + 1, np.int64)
    cu[1:] = np.cumsum(L)
    post = rng.dirichlet(np.ones(len(VALUES)), size=int(cu[-1])).astype(np.float16)
    path = tmp_path / "post.npz"
    np.savez_compressed(path, ids=d["ids"][pick], cu=cu, output_len=L, post=post,
                        pred=np.zeros(int(cu[-1]), np.float16),
                        meta=np.array(json.dumps({"bin_values": VALUES, "max_new_tokens": 512})))
    ps = pools(str(SHIPPED_PROBE_RECORDED), str(path))
    p, gpu = ps["post"], ps["gpu"]
    order = np.sort(pick)
    assert len(p) == 25 and np.array_equal(p.output_len, d["output_len"][order])
    np.testing.assert_array_equal(p.prompt_pred, d["prompt_pred"][order])
    first = pick.tolist().index(order[0])                  # the first kept request's rows in the file
    np.testing.assert_allclose(p.pred[: L[first]], expected_remaining(
        post[cu[first]: cu[first + 1]], VALUES, cap=512 - np.arange(L[first])).numpy(), rtol=1e-3, atol=1e-2)
    dcu = d["cu"]
    np.testing.assert_array_equal(gpu.pred[: L[first]], d["pred"][dcu[order[0]]: dcu[order[0] + 1]].astype(np.float32))
    assert gpu.gittins is None and np.array_equal(gpu.cu, p.cu)
    init = ps["post_init"].gittins                          # the c window's first read is the mean
    np.testing.assert_array_equal(init[p.cu[:-1]], p.pred[p.cu[:-1]])
    rest = np.ones(len(init), bool)
    rest[p.cu[:-1]] = False
    np.testing.assert_array_equal(init[rest], p.gittins[rest])
    with pytest.raises(ValueError, match="gittins"):
        sim.make_trace(gpu, np.zeros(4), "gittins")
