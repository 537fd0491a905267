"""`trail demo` at a tiny size (real SmolLM2-135M-Instruct on CPU, a few tokens per request): the
JSON it writes, options at their edges (a cap below every recorded length, one request, max
batch 1, a policy named twice, no fcfs), one-line errors for bad values, and the README table
script on its JSON. Runs the demo in a subprocess (it sets torch's thread count for its process)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo(tmp_path: Path, *options: str) -> tuple[dict, str]:
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "trail.cli", "demo", *options, "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return json.loads(out.read_text()), proc.stdout


def _table_script():
    spec = importlib.util.spec_from_file_location("readme_demo_table", ROOT / "scripts" / "readme_demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_tiny_json_and_readme_table(tmp_path):
    result, stdout = _demo(tmp_path, "--num-requests", "2", "--max-new-tokens", "8", "--policies", "fcfs", "trail")
    assert result["requests"] == 2 and result["max_new_tokens"] == 8 and result["max_batch"] == 4
    assert result["policy_order"] == ["fcfs", "trail"] and set(result["policies"]) == {"fcfs", "trail"}
    assert len(result["output_lengths"]) == 2 and max(result["output_lengths"]) <= 8     # capped at the cap
    assert result["tokens_per_policy"] == sum(result["output_lengths"])
    assert result["threads"] == 1 and result["device"] == "cpu" and result["wall_s"] > 0
    assert len(result["load_avg_1m"]) == 2 and result["cpu_count"] >= 1
    for s in result["policies"].values():
        for key in ("mean_latency_s", "p50_latency_s", "p99_latency_s", "mean_ttft_s", "throughput_tok_s",
                    "preemptions", "latency_ratio_to_fcfs"):
            assert key in s
        assert s["mean_latency_s"] > 0 and s["throughput_tok_s"] > 0
    trail = result["policies"]["trail"]
    lo, hi = trail["latency_ratio_ci95"]
    assert lo <= hi and isinstance(trail["within_noise"], bool)
    assert "fcfs" in stdout and "95% CI" in stdout and "wrote" in stdout

    # the README block from that JSON: the demo's columns, one row per policy, the wall time
    script = _table_script()
    readme = ("# x\n\nrun it (<!-- demo-wall -->old<!-- /demo-wall -->)\n\n"
              f"{script.BEGIN}\nstale\n{script.END}\n\n## next\n")
    new = script.rewrite(readme, result, "demo.json")
    assert "stale" not in new and new.endswith("\n\n## next\n") and new.startswith("# x\n")
    assert "| " + " | ".join(script.COLUMNS) + " |" in new
    assert "| fcfs | " in new and "| trail | " in new and "| oracle | " not in new
    assert f"<!-- demo-wall -->{result['wall_s']:.0f} s<!-- /demo-wall -->" in new
    assert "2-core" in new or f"{result['cpu_count']}-core" in new
    assert script.rewrite(new, result, "demo.json") == new            # idempotent
    with pytest.raises(ValueError):
        script.rewrite("no markers", result)
    # and as a command, on a file
    path = tmp_path / "README.md"
    path.write_text(readme)
    (tmp_path / "demo.json").write_text(json.dumps(result))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_demo_table.py"), str(tmp_path / "demo.json"),
                    "--readme", str(path)], check=True, capture_output=True)
    assert path.read_text() == new


def test_demo_edge_options(tmp_path):
    """One request, max batch 1, a cap of 1 token, a policy named twice and no fcfs: still a result."""
    result, stdout = _demo(tmp_path, "--num-requests", "1", "--max-batch", "1", "--max-new-tokens", "1",
                           "--policies", "oracle", "sjf_prompt", "oracle", "--seed", "7")
    assert result["policy_order"] == ["oracle", "sjf_prompt"] and result["output_lengths"] == [1]
    assert "latency_ratio_to_fcfs" not in result["policies"]["oracle"]
    assert "fcfs did not run" in stdout
    script = _table_script()
    assert "| oracle | " in script.render(result)


@pytest.mark.parametrize("option,value", [
    ("--num-requests", "0"), ("--num-requests", "49"), ("--num-requests", "x"), ("--max-batch", "0"),
    ("--max-batch", "2000"), ("--max-new-tokens", "0"), ("--max-new-tokens", "100000"), ("--seed", "-1"),
    ("--threads", "0"), ("--policies", "lifo"), ("--json", "/no/such/dir/demo.json"),
])
def test_demo_bad_values_are_one_line_errors(option, value, capsys):
    from trail.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_replay_length_is_capped():
    from trail.compare import ReplayRequest, replay_length
    from trail.request import SamplingParams

    assert replay_length(ReplayRequest([1, 2], 240), SamplingParams(max_new_tokens=16)) == 16
    assert replay_length(ReplayRequest([1, 2], 5), SamplingParams(max_new_tokens=16)) == 5


def test_demo_defaults_and_data():
    """The parser's limits match the shipped requests (held out, sorted by length)."""
    import trail
    from trail.cli import _DEMO_MAX_REQUESTS, _demo_requests, build_parser

    data = json.loads((Path(trail.__file__).parent / "data" / "demo_requests.json").read_text())["requests"]
    assert len(data) == _DEMO_MAX_REQUESTS
    lengths = [r["output_len"] for r in data]
    assert lengths == sorted(lengths) and all(len(r["prompt_ids"]) <= 96 for r in data)
    from trail.predictor.bins import split_of

    assert {split_of(r["id"]) for r in data} == {"test"}      # the shipped probe never trained on them
    args = build_parser().parse_args(["demo"])
    assert args.threads == 1 and args.max_batch < args.num_requests
    assert len(_demo_requests(args.num_requests, 0)) == args.num_requests
    assert len(_demo_requests(_DEMO_MAX_REQUESTS, 0)) == _DEMO_MAX_REQUESTS
