"""bench/serve_summary.py on a tiny CPU serving run (bench/serve.py with --solo, fcfs_repeat and a
prediction control): every cell and policy summarized with its interval, noise floor, SLO share
and the simulator's prediction from a step fit made from the run's own telemetry
(bench/sim_fit_engine.py --serve); the README block is filled from it; the grid's sections parse."""
import json

import numpy as np

import bench.serve as serve
from bench import serve_summary, sim_fit_engine
from bench.suite import serve_grid

TINY = ["--model", "random:tiny", "--device", "cpu", "--max-batch", "3", "--kv-requests", "24",
        "--host-blocks", "8", "--max-output", "20", "--max-prompt", "64", "--warmup", "1"]


def test_summary_of_a_tiny_run(tmp_path):
    run = tmp_path / "run"
    assert serve.main(["--out", str(run), "--num-requests", "8", "--loads", "burst", "--regimes", "ample",
                       "--seeds", "0,1", "--saturation", "ample=5", "--recorded-predictions", "--solo", "4",
                       "--policies", "fcfs,trail_prefill,trail,oracle,fcfs_repeat", *TINY]) == 0
    (fit_path,) = sim_fit_engine.main(["--serve", str(run), "--out-dir", str(tmp_path)])
    fit = json.loads(fit_path.read_text())
    assert fit_path.name == "step_fit_serve_tiny.json" and fit["steps"] > 0 and fit["model"]["base_s"] > 0
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{serve_summary.HEADLINE_START}\nold\n{serve_summary.HEADLINE_END}\nrest\n")
    out = tmp_path / "summary"
    assert serve_summary.main([str(run), "--out", str(out), "--step-fit", str(fit_path), "--readme", str(readme)]) == 0
    s = json.loads((out / "summary.json").read_text())
    rows = {r["policy"]: r for r in s["cells"]}
    assert set(rows) == {"fcfs", "trail_prefill", "trail", "oracle", "fcfs_repeat"}
    assert rows["fcfs"]["latency_ratio_to_fcfs"] == 1.0 and rows["trail"]["seeds"] == [0, 1]
    lo, hi = rows["trail"]["latency_ratio_ci95"]
    assert lo <= hi and lo > 0
    assert all(x is not None for x in rows["fcfs"]["noise_floor_log_ratio"])
    assert all(0.0 <= r["slo_attainment"] <= 1.0 for r in rows.values())
    assert all(np.isfinite(r["sim_mean_error"]) and r["sim_mean_latency_s"] > 0 for r in rows.values())
    assert "trail / fcfs" in s["headline"] and len(s["checks"]) == 4
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text and s["headline"] in text
    assert (out / "summary.md").is_file() and (out / "latency_vs_load.png").is_file()
    assert (out / "latency_cdf.png").is_file() and (out / "time_between_tokens.png").is_file()


def test_two_stage_interval_covers_seeds_and_requests():
    rng = np.random.default_rng(0)
    b = [rng.uniform(1, 2, 200) for _ in range(3)]
    same = serve_summary.two_stage_interval(b, b)
    assert same == (1.0, 1.0)
    shifted = [x * f for x, f in zip(b, (0.8, 0.9, 1.0))]      # seeds that disagree widen the interval
    lo, hi = serve_summary.two_stage_interval(shifted, b)
    assert lo < 0.85 < 0.95 < hi


def test_grid_sections_are_bounded_and_parse(capsys):
    assert serve_grid.main(["--out", "unused", "--list"]) == 0
    assert "total" in capsys.readouterr().out
    assert all(m <= 9.5 for m, _ in serve_grid.SECTIONS.values())
    assert sum(m for name, (m, _) in serve_grid.SECTIONS.items() if name.startswith("8b")) <= 45


def test_capacity_relative_to_fcfs_across_sections():
    def run(policies):
        return {"model": "random:x", "device": "d", "capacity": {"regime": "ample", "solo_fit": None, "policies": {
            name: {"capacity": cap, "capacity_x_saturation": cap / 10, "converged": True, "monotone": True,
                   "evaluations": [{}] * 5} for name, cap in policies.items()}}}

    rows = serve_summary.capacity_rows([run({"fcfs": 8.0, "sjf_prompt": 9.0}), run({"trail": 10.0, "oracle": 12.0})])
    got = {r["policy"]: r["x_fcfs"] for r in rows}
    assert got == {"fcfs": 1.0, "sjf_prompt": 1.125, "trail": 1.25, "oracle": 1.5}
