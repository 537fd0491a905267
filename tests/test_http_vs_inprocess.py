"""bench/http_vs_inprocess.py runs end to end (a tiny burst): both modes serve the same requests
with the same lengths, and the table's ratio is computed from the runs it reports."""
import pytest

pytest.importorskip("aiohttp")

from bench import http_vs_inprocess  # noqa: E402


def test_http_and_in_process_serve_the_same_burst(tmp_path):
    result = http_vs_inprocess.main(["--burst", "4", "--max-tokens", "6", "--max-batch", "4", "--out", str(tmp_path)])
    mean = result["mean"]
    assert result["http_over_in_process"]["mean_latency"] == pytest.approx(
        mean["http"]["mean_latency_s"] / mean["in_process"]["mean_latency_s"])
    assert len(result["runs"]["http"]) == len(result["runs"]["in_process"]) == 2
    assert (tmp_path / "http_vs_inprocess.json").is_file()
