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


def test_interleaved_policies_serve_every_request_on_their_own_clocks():
    """compare.run_interleaved (trail demo's runner): every policy serves every request once,
    latencies are on each engine's own clock (never above its busy time)."""
    import torch

    from trail.compare import ReplayRequest, compare, run_interleaved
    from trail.engine import LLMEngine
    from trail.engine_config import EngineConfig
    from trail.models import random_model
    from trail.request import SamplingParams
    from trail_kernels.probe import ProbeParams

    model = random_model("tiny", seed=1)
    probe = ProbeParams.random(model.config.hidden_size, 32, 8, max_len=64, generator=torch.Generator().manual_seed(0))

    def make(policy, clock):
        return LLMEngine(model, None, EngineConfig(policy=policy, max_batch=2, max_model_len=128,
                                                   prefill_tokens_per_s=1e4),
                         probe=probe, probe_layer=1, eos_token_ids=[], clock=clock)

    reqs = [ReplayRequest(list(range(3 + i, 10 + i)), n, 0.01 * i) for i, n in enumerate([12, 3, 8, 2, 6])]
    runs = run_interleaved(make, ["fcfs", "trail", "oracle"], reqs, SamplingParams(max_new_tokens=32))
    for run in runs.values():
        assert run["tokens"] == sum(r.output_len for r in reqs)
        assert (run["latency"] > 0).all() and run["latency"].max() <= run["makespan_s"] + 0.05
    assert set(compare(runs)["policies"]) == {"fcfs", "trail", "oracle"}
