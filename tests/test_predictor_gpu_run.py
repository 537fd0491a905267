"""bench/predictor_gpu_run.py end to end on CPU with a tiny set (8 prompts x 16 tokens, 2 layers,
tiny grids): every phase runs, the results are packed as the GPU run packs them, and a second run
with the same work folder resumes the trace and still packs when the budget is spent."""
import json
import tarfile
from pathlib import Path

import bench.predictor_gpu_run as mod
from trail.predictor import bins as B
from trail.predictor import prompts as P

# 8 short prompts cut from tests/data/prompts_sharegpt_alpaca.jsonl.gz (the first that _tiny_prompts
# picks there; tests/data/README.md)
SAMPLE = Path(__file__).resolve().parent / "data" / "prompts_sample.jsonl"


def _tiny_prompts(path):
    """Per source two train, one val and one test prompt (short texts) from the sample."""
    allp = P.read_prompt_file(SAMPLE)
    want = {(s, k): n for s in ("sharegpt", "alpaca") for k, n in (("train", 2), ("val", 1), ("test", 1))}
    out = []
    for p in allp:
        key = (p.source, B.split_of(p.id))
        if want.get(key, 0) > 0 and len(p.text) < 160:
            want[key] -= 1
            out.append(p)
    assert not any(want.values())
    P.write_prompt_file(path, out)
    return out


def test_gpu_run_script_on_cpu(smollm2_dir, tmp_path):
    _tiny_prompts(tmp_path / "p.jsonl.gz")
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--out", str(out), "--work", str(work), "--prompts", str(tmp_path / "p.jsonl.gz"), "--num", "4",
              "--num-alpaca", "4", "--max-new-tokens", "16", "--batch-size", "4", "--device", "cpu"]
    rc = mod.main(common + ["--layers", "3,7", "--epochs", "2", "--widths", "16,32", "--lrs", "1e-3", "--ft-epochs", "1",
                            "--train-batch", "64", "--judge-n", "60", "--judge-seeds", "0", "--budget-s", "400",
                            "--reserve-s", "100", "--skip", "cross_alpaca_only,eval_shipped"])
    S = json.loads((out / "predictor_run.json").read_text())
    assert rc == 0 and not S["errors"] and S["skipped"] == {"cross_alpaca_only": "--skip"}, (S["errors"], S["skipped"])
    assert S["collect"]["new_requests"] == 8 and S["collect"]["backend"] == "trail.model_runner"
    assert S["collect"]["output_tokens_per_s"] > 0 and S["prompts"] == {"sharegpt": 4, "alpaca": 4}
    assert set(S["train"]["sweep"]) == {"3", "7"}          # JSON keys
    assert len(S["train"]["config_search"]) == 2 and "boe_ft" in S["finetune"]
    for name in ("new_on_test", "new_on_test_sharegpt", "new_on_test_alpaca",
                 "sharegpt_only_on_test_alpaca", "sharegpt_only_on_all_alpaca"):
        assert name in S["eval"], name
    assert "alpaca_only_on_test_sharegpt" not in S["eval"] and "shipped_on_test" not in S["eval"]
    assert "baseline_boe_ft_mae" in S["eval"]["new_on_test"]
    assert set(S["judge"]) == {"new"}
    files = sorted(x.name for x in out.iterdir())
    assert files == ["predictor_results.tar.gz", "predictor_run.json", "predictor_tables.md", "trace.jsonl.gz"]
    with tarfile.open(out / "predictor_results.tar.gz") as tar:
        names = set(tar.getnames())
    for want in ("probes/probe.json", "probes/probe.safetensors", "probes/prompt_boe.json", "recorded_test_new.npz",
                 "eval/new_on_test/eval.json", "probes_sharegpt_only/probe.json"):
        assert want in names, want
    assert "trace.jsonl" not in names
    spec = json.loads((work / "probes" / "probe.json").read_text())
    assert spec["training"]["labels"] == "censored at the cap" and spec["training"]["seen_ids"]
    assert "Collection" in (out / "predictor_tables.md").read_text()

    # the cross-dataset phases from that work folder, as a second GPU runs them beside the main run
    cross_out = tmp_path / "cross_out"
    rc = mod.main(["--out", str(cross_out), "--work", str(tmp_path / "cross_work"), "--cross-from", str(work),
                   "--cross-layer", "7", "--cross-width", "16", "--epochs", "2", "--train-batch", "64",
                   "--device", "cpu", "--budget-s", "400", "--skip", "cross_sharegpt_only"])
    C = json.loads((cross_out / "predictor_run.json").read_text())
    assert rc == 0 and not C["errors"], C["errors"]
    assert C["cross"] == {"layer": 7, "hidden": 16, "lr": 1e-3, "requests": 8}
    assert {"alpaca_only_on_test_sharegpt", "alpaca_only_on_test_alpaca", "shipped_on_test"} <= set(C["eval"])
    with tarfile.open(cross_out / "predictor_results.tar.gz") as tar:
        assert "recorded_test_shipped.npz" in tar.getnames()
    assert sorted(x.name for x in cross_out.iterdir()) == ["predictor_results.tar.gz", "predictor_run.json",
                                                           "predictor_tables.md"]
    assert json.loads((tmp_path / "cross_work" / "probes_alpaca_only" / "probe.json").read_text())["layer"] == 7

    # a second run on the same work folder: nothing left to collect, the budget is too short for
    # the rest, and the results are still packed
    rc = mod.main(common + ["--layers", "3", "--budget-s", "30", "--reserve-s", "0"])
    S2 = json.loads((out / "predictor_run.json").read_text())
    assert S2["collect"]["new_requests"] == 0 and S2["collect"]["requests"] == 8
    assert "embed" in S2["skipped"] and (out / "predictor_results.tar.gz").is_file()


def test_trace_parts_round_trip(tmp_path, monkeypatch):
    """A trace over the size limit is split into valid partial traces; --trace joins them again."""
    from trail.predictor.trace import TraceRecord, TraceWriter, read_trace

    src = tmp_path / "trace.jsonl"
    with TraceWriter(src, {"model": "m", "max_new_tokens": 64}) as w:
        for i in range(300):
            w.write(TraceRecord(f"t{i}", "s", "p" * 50, list(range(i % 7 + 1)), [(i * 7919 + k) % 50000 for k in range(64)],
                                "length"))
    monkeypatch.setattr(mod, "MAX_PART_BYTES", 20_000)
    parts = mod.pack_trace(src, tmp_path / "out")
    assert len(parts) > 1 and all(p.name.startswith("trace.part") for p in parts)
    assert sum(len(read_trace(p)) for p in parts) == 300
    mod.seed_trace(",".join(str(p) for p in parts), tmp_path / "joined.jsonl")
    assert [r.id for r in read_trace(tmp_path / "joined.jsonl").records] == [f"t{i}" for i in range(300)]
