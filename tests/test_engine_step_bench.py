"""bench/suite/model_engine_step.py (the GPU engine-step benchmark) as a CPU smoke run with the tiny
model: it writes summary.json with every row's fields and its limit computed; and its limits: the
HBM / FLOP floors of known shapes, and a row above its limit flagged. Timing values are not
checked."""
import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from trail.models import preset

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "suite" / "model_engine_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("model_engine_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture
def one_thread():
    """The tiny model's matmuls are far too small for threads; on a busy machine they only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_smoke_run_writes_summary(bench, tmp_path, one_thread):
    bench.main(["--out", str(tmp_path), "--device", "cpu", "--models", "tiny", "--batches", "1,2", "--contexts", "8",
                "--steps", "2", "--warm", "1", "--mixed-batch", "1", "--mixed-chunk", "8", "--prefill", "2x8"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["limits"]["hbm_bytes_per_s"] == 3.35e12 and summary["limits"]["peak_flops"] == 989e12
    rows = summary["summary"]
    assert {(r["kind"], r["loop"]) for r in rows} == {(k, loop) for k in ("decode", "mixed", "prefill")
                                                      for loop in ("serial", "overlapped")}
    assert {r["batch"] for r in rows if r["kind"] == "decode"} == {1, 2}
    for r in rows:
        for key in ("model", "batch", "context", "loop", "step_ms", "host_ms", "gpu_ms", "floor_ms", "pct_of_limit",
                    "limit_ok", "hbm_floor_ms", "hbm_floor_measured_bw_ms", "flops_floor_ms"):
            assert key in r, key
        assert r["model"] == "tiny" and r["gpu_ms"] is None          # no device events on CPU
        assert r["step_ms"] > 0 and r["floor_ms"] > 0
        assert math.isclose(r["pct_of_limit"], 100 * r["floor_ms"] / r["step_ms"])
        assert r["floor_ms"] == max(r["hbm_floor_ms"], r["flops_floor_ms"])
        assert r["limit_ok"] == (r["pct_of_limit"] <= 100)
    full = json.loads((tmp_path / "engine_step.json").read_text())
    assert full["phases"] and "host_schedule_s" in full["phases"][0]["median_phase_ms"]
    assert "decode" in (tmp_path / "engine_step.summary.txt").read_text()


def test_floors_of_known_shapes(bench):
    # Llama-3-8B bf16, batch 1 at context 512: every weight but the untied embedding table (7.50 G
    # params), plus 512 tokens x 128 KiB of KV -> 15.07 GB / 3.35 TB/s = 4.50 ms; HBM-bound
    shape = bench.Shape.of(preset("llama3-8b"), 2)
    assert shape.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    nbytes, flops = bench.step_limits(shape, [(511, 1, True)])
    assert nbytes == pytest.approx(2 * 7.505e9 + 512 * 131072, rel=1e-3)
    lim = bench.limit_fields(shape, [(511, 1, True)], [(511, 1, True)], 10.0, 3.01e12)
    assert lim["hbm_floor_ms"] == pytest.approx(4.50, abs=0.01) and lim["bound"] == "hbm"
    assert lim["pct_of_limit"] == pytest.approx(45.0, abs=0.1)
    assert lim["hbm_floor_measured_bw_ms"] == pytest.approx(4.50 * 3.35 / 3.01, abs=0.01)
    # a prefill of 8 x 512 is FLOP-bound: 2 * 6.98 G matmul params * 4096 + the LM head for 8 rows
    # + causal attention (4 * 32 layers * 4096 q dims * 8 * 512 * 513 / 2 keys)
    nbytes, flops = bench.step_limits(shape, [(0, 512, True)] * 8)
    attn = 4 * 32 * 4096 * 8 * 512 * 513 // 2
    assert flops == 2 * shape.matmul_params * 4096 + 2 * 128256 * 4096 * 8 + attn
    lim = bench.limit_fields(shape, [(0, 512, True)] * 8, [(0, 512, True)] * 8, 100.0, 3.01e12)
    assert lim["bound"] == "flops" and lim["flops_floor_ms"] == pytest.approx(1e3 * flops / 989e12)


def test_row_above_its_limit_is_flagged(bench, caplog):
    shape = bench.Shape.of(preset("smollm2-135m"), 2)
    # a "1.1M tok/s" 8B-like prefill: faster than the FLOP peak allows
    lim = bench.limit_fields(shape, [(0, 512, True)] * 8, [(0, 512, True)] * 8, 0.001, 3.01e12)
    assert not lim["limit_ok"] and lim["pct_of_limit"] > 100
    with caplog.at_level(logging.WARNING):
        bench.flag({"model": "m", "kind": "prefill", "loop": "overlapped", "batch": 8, "context": "0..512",
                    "step_ms": 0.001, **lim})
    assert "measurement error" in caplog.text
