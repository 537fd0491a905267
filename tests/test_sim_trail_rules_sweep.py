"""The trail rules sweep's machinery (bench/sim_trail_rules_sweep.py) on a tiny grid: the shape of
its output, variant naming, and that its default-trail row is a direct simulate() of trail."""
from __future__ import annotations

import math

import numpy as np
import pytest

sweep_mod = pytest.importorskip("bench.sim_trail_rules_sweep")
from bench.common import SHIPPED_PROBE_RECORDED, held_out_pool, run_engine_config, workload_indices  # noqa: E402
from bench.sim_vs_real import sim_trace  # noqa: E402
from trail import sim  # noqa: E402

if not SHIPPED_PROBE_RECORDED.is_file():
    pytest.skip("the shipped probe's recorded predictions are not here", allow_module_level=True)


def test_variant_names_round_trip():
    assert sweep_mod.variant_name({"c": 0.8}) == "trail"          # the default is no variant
    assert sweep_mod.variant_name({"margin": 64.0, "c": 0.5}) == "trail[c=0.5,margin=64]"
    assert sweep_mod.parse_variant("trail[c=0.5,margin=64,max_preemptions=1]") == {"c": 0.5, "margin": 64.0,
                                                                                   "max_preemptions": 1}
    oat = sweep_mod.oat_variants({"c": [0.0, 0.8], "max_preemptions": [1, 4]})
    assert set(oat) == {"trail[c=0]", "trail[max_preemptions=1]"}
    joint = sweep_mod.joint_variants({"c": [0.5, 0.8], "margin": [32.0, 64.0]})
    assert set(joint) == {"trail[c=0.5]", "trail[margin=64]", "trail[c=0.5,margin=64]"}
    assert joint["trail[c=0.5,margin=64]"] == {"c": 0.5, "margin": 64.0}


def test_tiny_sweep_shape_and_baseline_row():
    full = sweep_mod.build_table("none", None, ["trail[c=0]"])
    assert list(full) == ["fcfs", "sjf_prompt", "sjf_prompt_memrules", "oracle", "trail", "trail[c=0]"]
    table = {k: full[k] for k in ("fcfs", "sjf_prompt", "trail", "trail[c=0]")}
    sat = {"ample": 23.108}
    regimes, loads, seeds, n = ["ample"], ["1.0", "burst16"], [0, 1], 24
    results = sweep_mod.sweep(regimes, loads, seeds, n, sat, table, workers=1, progress=False)
    assert len(results) == len(regimes) * len(loads) * len(seeds)
    assert [r["cell"]["n"] for r in results] == [24, 24, 16, 16]
    rows = sweep_mod.aggregate(results)
    assert len(rows) == len(loads) * len(table)
    assert {(r["load"], r["name"]) for r in rows} == {(l, k) for l in loads for k in table}
    for r in rows:
        assert r["seeds"] == 2
        if r["name"] == "fcfs":
            assert r["mean_vs_fcfs"] == pytest.approx(1.0)
        if r["name"] == "sjf_prompt":
            assert r["minus_sjf"] == 0.0
        assert math.isfinite(r["mean_vs_fcfs"]) and math.isfinite(r["p99_vs_fcfs"])
    assert "| ample | 1.0 | trail |" in sweep_mod.markdown_table(rows, list(table))
    assert {s["name"] for s in sweep_mod.score(rows)} == set(table)

    # the baseline row is trail with its defaults, simulated directly on the same requests
    pool = held_out_pool(max_prompt=512, max_output=512, recorded=SHIPPED_PROBE_RECORDED)
    idx, arr, _ = workload_indices(len(pool["ids"]), n, 1.0 * sat["ample"], 1)
    eng = run_engine_config("ample", pool, {"max_batch": 48, "kv_requests": 24, "host_blocks": 128, "num_requests": n},
                            "trail", {})
    res = sim.simulate(sim_trace(pool, idx, arr), eng, sim.llama3_8b_kv_spec(),
                       sim.StepTimeModel.from_json(sweep_mod.STEP_MODEL))
    m = res.metrics()
    got = next(r for r in results if r["cell"]["load"] == "1.0" and r["cell"]["seed"] == 1)["rows"]["trail"]
    assert got["mean"] == m["mean_latency"] and got["p99"] == m["p99_latency"]
    assert got["preempt"] == m["preemptions_total"]
    assert np.isclose(got["ttft"], m["mean_ttft"])


def test_boolean_options_parse_in_variant_names():
    from bench import sim_trail_rules_sweep as sweep

    opts = sweep.parse_variant("trail[resume_preempted_first=true,aging_per_step=0.6]")
    assert opts == {"resume_preempted_first": True, "aging_per_step": 0.6}
    assert sweep.parse_variant("trail[resume_preempted_first=false]") == {"resume_preempted_first": False}
    import pytest

    with pytest.raises(ValueError):
        sweep.parse_variant("trail[resume_preempted_first=maybe]")
