"""Ranking metrics of eval-probe, the recorded-predictions npz and the simulator judge."""
import itertools
import json

import numpy as np
import pytest
import torch

from trail.predictor import ranking as R


def _brute(a, b):
    c = d = ta = tb = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        sa, sb = np.sign(a[j] - a[i]), np.sign(b[j] - b[i])
        if sa * sb > 0:
            c += 1
        elif sa * sb < 0:
            d += 1
        elif sa == 0 and sb != 0:
            ta += 1
        elif sb == 0 and sa != 0:
            tb += 1
    return c, d, ta, tb


def test_kendall_spearman_pairwise_against_brute_force():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=40).astype(float)      # many ties
    b = a + rng.normal(0, 2, size=40).round()
    c, d, ta, tb = _brute(a, b)
    assert R.kendall_tau_b(a, b) == pytest.approx((c - d) / np.sqrt((c + d + ta) * (c + d + tb)))
    # pairs with distinct truth b: concordant + half of the pred ties
    assert R.pairwise_accuracy(a, b) == pytest.approx((c + 0.5 * ta) / (c + d + ta))
    ra = np.argsort(np.argsort(a + 1e-9 * np.arange(40)))   # no ties: plain ranks
    x = np.arange(40.0)
    assert R.spearman(x, x ** 3) == pytest.approx(1.0)
    assert R.spearman(x, -x) == pytest.approx(-1.0)
    assert R.kendall_tau_b(x, -x) == pytest.approx(-1.0)
    assert R.pairwise_accuracy(np.zeros(40), x) == pytest.approx(0.5)
    assert np.isfinite(R.spearman(ra, b))
    # chunking does not change the counts
    assert R._pair_signs(a, b, chunk=7) == R._pair_signs(a, b)


def test_alive_rank_correlation_uses_only_requests_alive_at_g():
    lens = np.array([5, 3, 8, 1])
    cu = np.concatenate([[0], np.cumsum(lens)])
    true = np.concatenate([np.arange(L, 0, -1) for L in lens]).astype(float)
    perfect = R.alive_rank_correlation(true, cu, lens, step=1, min_alive=2)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["kendall_tau_b"] == pytest.approx(1.0)
    assert [r["alive"] for r in perfect["per_g"]] == [4, 3, 3, 2, 2]   # g = 0..4 while >= 2 alive
    rev = R.alive_rank_correlation(-true, cu, lens, step=1, min_alive=2)
    assert rev["spearman"] == pytest.approx(-1.0)
    # a prediction that is right only at g = 0 and constant after: mean over g falls
    flat = true.copy()
    for i in range(len(lens)):
        flat[cu[i] + 1: cu[i + 1]] = 1.0
    part = R.alive_rank_correlation(flat, cu, lens, step=1, min_alive=2)
    assert part["per_g"][0]["spearman"] == pytest.approx(1.0) and part["spearman"] < 0.5


def test_recorded_npz_is_what_the_simulator_reads(tmp_path):
    from trail import sim
    from trail.predictor.recorded import check_recorded, save_recorded
    from trail.predictor.trace import TraceRecord

    recs = [TraceRecord(f"r{i}", "t", "p", [1] * (3 + i), list(range(4 + 2 * i)), "eos") for i in range(5)]
    lens = torch.tensor([r.output_len for r in recs])
    cu = torch.zeros(6, dtype=torch.long)
    cu[1:] = lens.cumsum(0)
    pred = torch.cat([torch.arange(int(L), 0, -1).float() + 0.5 for L in lens])
    path = save_recorded(tmp_path / "rec.npz", recs, cu, pred, lens.float() * 1.5,
                         {"max_new_tokens": 16, "model": "m"})
    assert check_recorded(path)["max_new_tokens"] == 16
    pool = sim.load_recorded(path)
    assert pool.max_new_tokens == 16 and pool.output_len.tolist() == lens.tolist()
    assert pool.prompt_len.tolist() == [3, 4, 5, 6, 7]
    np.testing.assert_allclose(pool.pred, pred.numpy(), rtol=1e-3)
    np.testing.assert_allclose(pool.prompt_pred, lens.numpy() * 1.5)
    with pytest.raises(ValueError, match="cu must delimit"):
        save_recorded(tmp_path / "bad.npz", recs, cu[:-1], pred, lens.float(), {"max_new_tokens": 16})
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        check_recorded(tmp_path / "other.npz")


def test_judge_runs_the_simulator_and_reports_oracle_fractions(tmp_path):
    """Exact predictions recorded as if from a probe: trail then behaves like the oracle, so its
    fraction of the oracle's gain is ~1 wherever the oracle gains."""
    from trail.predictor.recorded import save_recorded
    from trail.predictor.sim_judge import format_judge, judge
    from trail.predictor.trace import TraceRecord

    rng = np.random.default_rng(0)
    lens = np.where(rng.random(120) < 0.1, 256, rng.integers(4, 40, size=120))
    recs = [TraceRecord(f"r{i}", "t", "p", [1] * 20, [5] * int(L), "eos") for i, L in enumerate(lens)]
    cu = torch.zeros(len(lens) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(lens).cumsum(0)
    exact = torch.cat([torch.arange(int(L), 0, -1).float() for L in lens])
    npz = save_recorded(tmp_path / "exact.npz", recs, cu, exact, torch.tensor(lens).float(), {"max_new_tokens": 256})
    res = judge(npz, loads=(1.1,), seeds=(0,), n=1500, progress=False)
    row = res["loads"]["1.1"]
    assert set(row) == {"fcfs", "sjf_prompt", "trail", "oracle"}
    assert row["oracle"]["mean_latency_vs_fcfs"] < 0.9          # the workload rewards length awareness
    assert row["trail"]["oracle_fraction"] > 0.95, row
    assert "oracle frac" in format_judge(res)
    json.dumps(res)


def test_judge_verb(tmp_path, capsys):
    import argparse

    from trail.predictor.cli_verbs import add_subcommands
    from trail.predictor.recorded import save_recorded
    from trail.predictor.trace import TraceRecord

    lens = [5, 40, 7, 200, 12] * 4
    recs = [TraceRecord(f"j{i}", "t", "p", [1] * 10, [3] * L, "eos") for i, L in enumerate(lens)]
    cu = torch.zeros(len(lens) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(lens).cumsum(0)
    pred = torch.cat([torch.arange(L, 0, -1).float() for L in lens])
    npz = save_recorded(tmp_path / "r.npz", recs, cu, pred, torch.tensor(lens).float(), {"max_new_tokens": 256})
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["judge", str(npz), "--loads", "1.0", "--seeds", "1", "-n", "200",
                              "--out", str(tmp_path / "j.json")])
    assert args.func(args) == 0
    assert "| 1 | trail |" in capsys.readouterr().out
    assert json.loads((tmp_path / "j.json").read_text())["loads"]["1"]["trail"]["mean_latency_vs_fcfs"] > 0
