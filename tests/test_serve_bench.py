"""bench/serve.py end to end on a tiny random model (CPU, seconds): the kv regime with a burst,
every request served under each policy, the JSON / table / plot written."""
import importlib.util
import json
from pathlib import Path


def test_serve_benchmark_runs_a_cell(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_bench", path)
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    rc = serve.main(["--out", str(tmp_path), "--model", "random:tiny", "--device", "cpu", "--num-requests", "6",
                     "--loads", "burst", "--regimes", "kv", "--policies", "fcfs,trail,oracle", "--max-batch", "3",
                     "--kv-requests", "24", "--host-blocks", "8", "--max-output", "20"])
    assert rc == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    (cell,) = result["cells"]
    assert set(cell["policies"]) == {"fcfs", "trail", "oracle"}
    assert cell["policies"]["fcfs"]["latency_ratio_to_fcfs"] == 1.0
    assert result["saturation_req_s_kv"] > 0
    assert "kv" in (tmp_path / "serve.summary.txt").read_text()
