"""bench/serve.py end to end on a tiny random model (CPU, seconds): a burst cell in the kv regime
under each policy, the saturation search, sections + merge, the recorded-predictions mode; and
bench/sim_vs_real.py on the run it wrote (step model fitted from its telemetry)."""
import json

import numpy as np
import pytest

import bench.serve as serve
import bench.sim_vs_real as svr
from bench import common


TINY = ["--model", "random:tiny", "--device", "cpu", "--max-batch", "3", "--kv-requests", "24",
        "--host-blocks", "8", "--max-output", "20", "--max-prompt", "64", "--warmup", "1", "--policies", "fcfs,trail,oracle"]


def test_serve_benchmark_runs_a_cell(tmp_path):
    rc = serve.main(["--out", str(tmp_path), "--num-requests", "6", "--loads", "burst", "--regimes", "kv",
                     "--seeds", "0", "--saturation", "kv=5", *TINY])
    assert rc == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    (cell,) = result["cells"]
    assert set(cell["policies"]) == {"fcfs", "trail", "oracle"}
    assert cell["policies"]["fcfs"]["latency_ratio_to_fcfs"] == 1.0
    assert len(cell["request_ids"]) == 6 and len(cell["policies"]["trail"]["latency_s"]) == 6
    assert result["saturation_req_s_kv"] == 5 and result["predictions"] == "probe"
    steps = np.load(tmp_path / "serve_steps.npz")
    assert "steps/kv/burst/0/trail" in steps.files and steps["steps/kv/burst/0/trail"].shape[1] == len(steps["fields"])
    assert "kv" in (tmp_path / "serve.summary.txt").read_text()


def test_workload_reuses_prompts_beyond_the_pool():
    idx, arr, reused = common.workload_indices(10, 25, 2.0, 3)
    assert reused == 15 and len(idx) == 25 and np.bincount(idx, minlength=10).max() == 3
    assert sorted(idx[:10].tolist()) == list(range(10)) and (np.diff(arr) > 0).all()
    small, _, r0 = common.workload_indices(10, 4, None, 3)   # n <= pool: the first runs' draw
    assert r0 == 0 and small.tolist() == np.random.default_rng(3).permutation(10)[:4].tolist()


def test_saturation_search_brackets_the_knee():
    knee = 7.3
    found = serve.saturation_search(lambda r: {"growth": 0.0 if r <= knee else 2.0}, start=3.0, bisect=3)
    assert found["rate"] <= knee and found["bracket"][1] > knee and found["rate"] > knee / 1.3
    assert common.queue_growth(np.arange(8.0), np.array([0, 0, 1, 1, 1, 1, 3, 3.0]), np.full(8, 5.0)) > 0


def test_sections_search_merge_and_recorded_mode(tmp_path):
    common = ["--num-requests", "5", "--loads", "1.0,burst", "--regimes", "ample", "--seeds", "0", "--sat-requests", "6",
              "--sat-start", "20", "--recorded-predictions", *TINY]
    assert serve.main(["--out", str(tmp_path / "s1"), "--section", "1/2", "--sat-max-probes", "2", *common]) == 0
    # section 2 takes section 1's saturation rate from its JSON
    assert serve.main(["--out", str(tmp_path / "s2"), "--section", "2/2", "--saturation",
                       str(tmp_path / "s1" / "serve.json"), *common]) == 0
    parts = [json.loads((tmp_path / f"s{i}" / "serve.json").read_text()) for i in (1, 2)]
    assert [c["load"] for p in parts for c in p["cells"]] == ["1.0", "burst"]
    assert parts[0]["predictions"].startswith("recorded") and parts[0]["saturation"]["ample"]["probes"]
    assert serve.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "serve.json").read_text())
    assert len(merged["cells"]) == 2 and {c["source"] for c in merged["cells"]} == {str(tmp_path / "s1"), str(tmp_path / "s2")}
    text = (tmp_path / "m" / "serve.summary.txt").read_text()
    assert "recorded" in text and "trail" in text
    assert (tmp_path / "m" / "serve_ample.png").is_file()

    # the simulator's prediction of the same run, its step model fitted from the run's telemetry
    assert svr.main([str(tmp_path / "s1"), "--out", str(tmp_path / "svr")]) == 0
    (res,) = json.loads((tmp_path / "svr" / "sim_vs_real.json").read_text())
    assert {r["policy"] for r in res["rows"]} == {"fcfs", "trail", "oracle"}
    assert all(r["sim_mean_s"] > 0 for r in res["rows"]) and "fit to" in res["step_model"]["source"]


def test_fit_step_model_recovers_two_classes():
    from trail.telemetry import STEP_FIELDS

    rng = np.random.default_rng(0)
    f = {n: i for i, n in enumerate(STEP_FIELDS)}
    rows = np.zeros((400, len(STEP_FIELDS)))
    rows[:, f["rows"]] = rng.integers(1, 48, 400)
    mixed = rng.random(400) < 0.3
    rows[mixed, f["prefill_tokens"]] = rng.integers(10, 400, mixed.sum())
    rows[:, f["decode_rows"]] = rows[:, f["rows"]] - mixed
    wall = 0.003 + 1e-5 * rows[:, f["decode_rows"]] + mixed * (0.02 + 2e-6 * rows[:, f["prefill_tokens"]])
    rows[:, f["sync_wait_s"]] = wall
    rows[:, f["t"]] = np.concatenate([[0.0], np.cumsum(wall)[:-1]])   # back to back: no gap
    m = svr.fit_step_model(rows)
    assert m.base_s == pytest.approx(0.003, rel=0.05) and m.mixed_base_s == pytest.approx(0.02, rel=0.1)
    assert m.per_prefill_token_s == pytest.approx(2e-6, rel=0.1)
    assert m.step_time(10, 0, 0) < m.step_time(9, 100, 0, prefill_rows=1)


def test_interleaved_policies_serve_every_request_on_their_own_clocks():
    """compare.run_interleaved (trail demo's runner): every policy serves every request once,
    latencies are on each engine's own clock (never above its busy time)."""
    import torch

    from trail.compare import ReplayRequest, compare, run_interleaved
    from trail.engine import LLMEngine
    from trail.engine_config import EngineConfig
    from trail.models import random_model
    from trail.request import SamplingParams
    from trail_kernels.probe_params import ProbeParams

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


def test_sim_two_class_step_model_by_hand():
    """A step with a prefill row costs base + mixed_base (+ per prefill token); decode-only steps
    cost base; the step log counts them; the single-class model (mixed_* = 0) is unchanged."""
    import torch

    from trail import sim
    from trail.engine_config import EngineConfig
    from trail.kv_cache_spec import KVCacheSpec

    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, block_size=4)
    eng = EngineConfig(policy="fcfs", max_batch=1, max_slots=8, max_tokens_per_step=64, max_model_len=32,
                       block_size=4, num_gpu_blocks=64, num_host_blocks=0)
    L = np.array([3, 2])
    cu = np.array([0, 3, 5])
    tr = sim.SimTrace(np.zeros(2), np.full(2, 4), L, np.full(2, 16), L.astype(float), cu,
                      np.array([3, 2, 1, 2, 1], np.float32), "exact")
    two = sim.StepTimeModel(base_s=1.0, per_decode_s=0.0, per_prefill_token_s=0.25, per_ctx_token_s=0.0,
                            mixed_base_s=2.0)
    res = sim.simulate(tr, eng, spec, two, record_steps=True)
    # request 0: prefill (1 + 2 + 4 * 0.25 = 4 s) then 2 decodes; request 1: prefill (4 s) then 1 decode
    assert res.finish.tolist() == [6.0, 11.0] and res.first_token.tolist() == [4.0, 10.0]
    summ = res.step_summary()
    assert summ["mixed_steps"] == 2 and summ["decode_steps"] == 3 and summ["mixed_time_share"] == pytest.approx(8 / 11)
    w = res.waiting()       # request 1 waits 6 s for request 0, then spends 5 s in the batch
    assert res.in_batch_s.tolist() == [6.0, 5.0] and w["not_in_batch_s"] == pytest.approx(3.0)
    one = sim.StepTimeModel(base_s=1.0, per_decode_s=0.0, per_prefill_token_s=0.0, per_ctx_token_s=0.0)
    assert sim.simulate(tr, eng, spec, one).finish.tolist() == [3.0, 5.0]


def test_serving_pools_are_held_out_from_the_shipped_probe():
    """The shipped probe's training + validation ids (probe.json, hashed) exclude every request of
    the pool `--trace <its trace's test split> --splits test` serves, which its recorded predictions
    cover, and the default pool's requests are val or test there (the split is a hash of the id, so
    it is the same in both traces)."""
    from trail.predictor import bins as B
    from trail.predictor.probe_file import load_spec, shipped_probe_dir

    seen = B.decode_id_set(load_spec(shipped_probe_dir("SmolLM2-135M-Instruct") / "probe").training["seen_ids"])
    pool = common.held_out_requests(512, common.SHIPPED_PROBE_TRACE, ["test"])
    assert len(pool) == 984 and not any(B.id_hash32(rid) in seen for rid, _, _ in pool)
    recorded, prompt_pred, label = common.load_recorded(common.SHIPPED_PROBE_RECORDED)
    assert all(rid in recorded and rid in prompt_pred for rid, _, _ in pool) and "layer" in label
    default = common.held_out_requests(512)
    assert len(default) == 367 and {B.split_of(rid) for rid, _, _ in default} == {"val", "test"}
    with pytest.raises(SystemExit, match="choose among train, val, test"):
        serve.main(["--out", "/tmp/unused", "--splits", "test,holdout", *TINY])


def test_abba_order_brackets_the_cell_with_fcfs_and_its_repeat():
    pols = ["fcfs", "sjf_prompt", "trail", "oracle", "fcfs_repeat"]
    assert serve.run_order(pols, 0, "abba") == pols
    assert serve.run_order(pols, 1, "abba") == pols[::-1]
    assert serve.run_order(["trail", "fcfs_repeat", "fcfs"], 2, "abba") == ["fcfs", "trail", "fcfs_repeat"]
    assert serve.run_order(pols, 1, "rotate") == pols[1:] + pols[:1]


def test_prefill_only_control_counts_the_first_prediction_down():
    assert common.prefill_only([5.0, 9.0, 1.0, 7.0, 7.0, 7.0, 7.0]).tolist() == [5, 4, 3, 2, 1, 0, 0]
    assert common.VARIANTS["trail_prefill"][0] == "trail" and common.PREDICTION_CONTROLS["trail_prefill"] == "prefill"


def test_solo_runs_and_capacity_search_on_the_engine(tmp_path):
    """--solo measures requests alone and --capacity bisects each policy's rate at the SLO on the
    same requests; the prefill-only control runs fed its reduced predictions (recorded mode)."""
    rc = serve.main(["--out", str(tmp_path), "--num-requests", "6", "--loads", "burst", "--regimes", "ample",
                     "--seeds", "0", "--saturation", "ample=5", "--recorded-predictions", "--solo", "4",
                     "--capacity", "fcfs,trail", "--capacity-requests", "8", "--capacity-max-evals", "3",
                     *TINY[:-1], "fcfs,trail_prefill,trail,fcfs_repeat"])
    assert rc == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    solo = result["solo"]
    assert len(solo["latency_s"]) == 4 and all(l > 0 for l in solo["latency_s"])
    assert len(set(solo["output_len"])) > 1            # spread over output lengths
    cap = result["capacity"]
    assert set(cap["policies"]) == {"fcfs", "trail"} and cap["solo_fit"]["n"] == 4
    for found in cap["policies"].values():
        assert 1 <= len(found["evaluations"]) <= 3
        assert all(0.0 <= e["attainment"] <= 1.0 for e in found["evaluations"])
    (cell,) = result["cells"]
    assert cell["policy_order"] == ["fcfs", "trail_prefill", "trail", "fcfs_repeat"]
    assert cell["noise_floor_log_ratio"] is not None
