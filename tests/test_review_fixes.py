"""Regression tests for defects found in review: each failed before its fix."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trail.generate import generate_with_predictions
from trail.models import random_model
from trail.predictor.embed import DenseFeatures
from trail.predictor.filter_adapter import run_filter
from trail_kernels.probe_params import ProbeParams


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny", seed=5, std=0.2)


class _BlockingHostCopies(TorchDispatchMode):
    """Records `copy_` calls whose source is a tensor built from host data (`torch.tensor(...)`)
    and that are not non_blocking: on CUDA each is a cudaMemcpy + stream synchronize."""

    def __init__(self):
        super().__init__()
        self.fresh, self.blocking = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.lift_fresh.default:
            self.fresh.add(id(out))
        elif func is torch.ops.aten.copy_.default and id(args[1]) in self.fresh:
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            self.blocking += not non_blocking
        return out


def test_generate_decode_steps_copy_no_host_tensor_blockingly(tiny):
    """generate.py: the per-step `num_generated[:k] = torch.tensor(...)` was a second sync per
    step on CUDA (beyond the one token read the module promises)."""
    probe = ProbeParams.random(tiny.config.hidden_size, 32, 10, max_len=20)
    gen = generate_with_predictions(tiny, [[1, 2, 3], [4, 5], [6]], probe, 1, 5)
    first = next(gen)
    records = [first]
    with _BlockingHostCopies() as mode:
        records.extend(gen)
    assert mode.blocking == 0
    # and the counts fed to the filter are still right: the readout is capped at max_new - fed
    for rec in records:
        for g, pred in zip(rec.generated, rec.predicted_remaining):
            assert 0.0 <= pred <= 5 - (g - 1) + 1e-4
    assert len(records) == 5 and all(records[-1].finished)


def _dense(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    feats = torch.randn(int(cu[-1]), 8, generator=g).half()
    return DenseFeatures([str(i) for i in range(len(lens))], 1, feats, cu,
                         torch.tensor(lens, dtype=torch.int32), torch.zeros(len(lens), dtype=torch.bool))


def _with_empty(dense, where):
    """The same requests plus one with no stored positions, inserted at index `where`."""
    n = len(dense.ids)
    cu = torch.cat([dense.cu[:where + 1], dense.cu[where:]])
    lens = torch.cat([dense.total_len[:where], torch.zeros(1, dtype=torch.int32), dense.total_len[where:]])
    return DenseFeatures(dense.ids[:where] + ["empty"] + dense.ids[where:], dense.layer, dense.feats, cu, lens,
                         torch.zeros(n + 1, dtype=torch.bool))


@pytest.mark.parametrize("where", [0, 1, 2])
def test_run_filter_tolerates_a_request_without_positions(where):
    """filter_adapter.run_filter: the prompt step indexed rows by cu[:-1], so a request with
    L = 0 aliased the next request's first row (or ran past the end: IndexError)."""
    params = ProbeParams.random(8, 16, 4, max_len=12)
    dense = _dense([3, 4])
    want = run_filter(params, dense, 10)
    got = run_filter(params, _with_empty(dense, where), 10)
    assert torch.equal(got, want)
    logp = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    keep = [i for i in range(3) if i != where]
    want = run_filter(params, dense, 10, init_log_post=logp[keep])
    assert torch.equal(run_filter(params, _with_empty(dense, where), 10, init_log_post=logp), want)


@pytest.mark.parametrize("argv", [["demo", "--num-requests", "0"], ["demo", "--max-new-tokens", "0"],
                                  ["demo", "--max-batch", "-3"]])
def test_demo_rejects_non_positive_counts_at_parse_time(argv, capsys):
    """cli.py: counts are checked at parse time, before the model loads."""
    from trail.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "must be a positive integer" in capsys.readouterr().err
