"""The serving judge's metrics (trail.compare): time between tokens and stalls from each request's
token times, the noise floor from an fcfs run repeated, and what the interval covers."""
import math

import numpy as np
import pytest

from trail.compare import INTERVAL_COVERS, compare, summarize, token_gaps


def test_token_gaps_pool_every_gap_and_keep_each_request_s_longest():
    tbt, stall = token_gaps([[1.0, 1.5, 3.5, 3.75], [2.0], [], [0.0, 0.25]])
    assert tbt.tolist() == [0.5, 2.0, 0.25, 0.25]
    assert stall.tolist() == [2.0, 0.0, 0.0, 0.25]


def _run(latency, tbt=None, stall=None, **extra):
    latency = np.asarray(latency, float)
    run = {"latency": latency, "ttft": latency / 4, "throughput_tok_s": 100.0, "preemptions": 0,
           "telemetry": {"swap": 0, "recomputed_tokens": 0, "online_prediction_mae": math.nan}}
    if tbt is not None:
        run.update(tbt=np.asarray(tbt, float), stall=np.asarray(stall, float))
    return {**run, **extra}


def test_summarize_reports_tail_latency_ttft_and_time_between_tokens():
    lat = np.arange(1, 101, dtype=float)
    s = summarize(_run(lat, tbt=np.linspace(0.01, 1.0, 100), stall=[0.5, 1.5]))
    assert s["p90_latency_s"] == pytest.approx(np.percentile(lat, 90))
    assert s["p99_ttft_s"] == pytest.approx(np.percentile(lat / 4, 99))
    assert s["tbt_p50_s"] == pytest.approx(0.505) and s["tbt_p99_s"] == pytest.approx(np.percentile(np.linspace(0.01, 1.0, 100), 99))
    assert s["stall_mean_s"] == pytest.approx(1.0)
    assert "tbt_p99_s" not in summarize(_run(lat))         # no token times: no TBT figures


def test_noise_floor_from_fcfs_repeated_decides_what_lies_beyond_it():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, 200)
    runs = {"fcfs": _run(base), "fcfs_repeat": _run(base * 1.04), "close": _run(base * 0.97),
            "far": _run(base * 0.80)}
    cmp = compare(runs)
    assert cmp["noise_floor_log_ratio"] == pytest.approx(math.log(1.04))
    assert cmp["policies"]["close"]["beyond_noise_floor"] is False
    assert cmp["policies"]["far"]["beyond_noise_floor"] is True
    assert "beyond_noise_floor" not in cmp["policies"]["fcfs_repeat"]
    assert cmp["interval_covers"] == INTERVAL_COVERS and "request sampling only" in INTERVAL_COVERS
    assert compare({"fcfs": _run(base), "far": _run(base * 0.8)})["noise_floor_log_ratio"] is None


def test_tbt_ratio_to_fcfs():
    lat = np.ones(10)
    runs = {"fcfs": _run(lat, tbt=np.full(50, 0.02), stall=np.full(10, 0.02)),
            "trail": _run(lat, tbt=np.r_[np.full(49, 0.02), 0.2], stall=np.full(10, 0.2))}
    s = compare(runs)["policies"]["trail"]
    assert s["tbt_p99_ratio_to_fcfs"] == pytest.approx(np.percentile(np.r_[np.full(49, 0.02), 0.2], 99) / 0.02)
