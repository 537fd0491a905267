"""`trail bench-serve` against a real `trail serve random:tiny` process (burst and Poisson runs, the
report files, the comparison of runs in the in-process benchmark's format) and against a minimal
foreign OpenAI-style server (no usage, no /metrics); its trace reader and workload; and the
forced-length rule: a recorded length forced with ignore_eos + max_tokens leaves every prediction
trail's predictor and scheduler make unchanged (the cap they see is the server's)."""
import asyncio
import gzip
import json
import threading

import pytest
from aiohttp import web
from test_server import SERVER_ARGS, ServerProcess, post

import bench.serve
from trail import bench_serve
from trail.cli import main as trail_main

CAP = 48     # the server's --default-max-tokens: the cap of every request without its own max_tokens


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(*SERVER_ARGS, "--default-max-tokens", str(CAP))
    yield srv
    assert srv.stop() == 0, srv.stderr()[-3000:]


def _trace(path, n: int = 8):
    rows = [{"format": "trail-trace", "version": "1"}]
    for i in range(n):
        row = {"id": f"r{i}", "prompt": f"request {i}", "prompt_ids": [10 + i, 20, 30 + i][: 1 + i % 3]}
        row.update({"output_len": 3 + 4 * i} if i % 2 else {"output_ids": list(range(3 + 4 * i))})
        rows.append(row)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_trace_workload_and_request_bodies(tmp_path):
    trace = bench_serve.load_trace(_trace(tmp_path / "t.jsonl.gz"))
    assert [r.output_len for r in trace] == [3 + 4 * i for i in range(8)] and trace[2].prompt_ids == [12, 20, 32]
    idx, arr = bench_serve.workload(8, 20, 4.0, seed=5)
    again, arr2 = bench_serve.workload(8, 20, 4.0, seed=5)
    assert idx.tolist() == again.tolist() and arr.tolist() == arr2.tolist()
    assert sorted(idx[:8].tolist()) == list(range(8)) and arr[0] == 0 and (arr[1:] > arr[:-1]).all()
    assert 1.5 < (len(arr) - 1) / arr[-1] < 10           # about 4 per second
    assert bench_serve.workload(8, 5, None, seed=5)[1].tolist() == [0.0] * 5
    forced = bench_serve.request_body(trace[3], model="m", force=True, max_tokens=10)
    assert forced["max_tokens"] == 10 and forced["ignore_eos"] and forced["prompt"] == trace[3].prompt_ids
    plain = bench_serve.request_body(trace[1], model="m", max_tokens=64)
    assert plain["max_tokens"] == 64 and "ignore_eos" not in plain and plain["stream_options"]["include_usage"]
    chat = bench_serve.request_body(trace[1], model="m", chat=True)
    assert chat["messages"] == [{"role": "user", "content": "request 1"}] and "prompt" not in chat
    assert bench_serve.request_body(trace[1], model="m", text=True)["prompt"] == "request 1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "output_len": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        bench_serve.load_trace(bad)


def test_bench_serve_runs_against_trail_serve_and_compares_runs(server, tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl")
    common = ["bench-serve", "--url", server.url, "--trace", str(trace), "--force-lengths", "--max-tokens", "20"]
    assert trail_main([*common, "--burst", "8", "--out", str(tmp_path / "a"), "--label", "fcfs"]) == 0
    assert trail_main([*common, "--burst", "8", "--out", str(tmp_path / "b"), "--label", "trail"]) == 0
    run = json.loads((tmp_path / "a" / "bench_serve.json").read_text())
    recorded = {f"r{i}": 3 + 4 * i for i in range(8)}
    assert [r["output_tokens"] for r in run["records"]] == [min(recorded[i], 20) for i in run["workload"]["ids"]]
    assert all(r["error"] is None and 0 < r["ttft_s"] <= r["latency_s"] for r in run["records"])
    # a chunk per token, unless the front end lagged a step and the core merged that step's deltas
    # (async_engine: one message per engine step), which a loaded 2-core machine sometimes does
    assert all(1 <= len(r["itl_s"]) <= r["output_tokens"] - 1 for r in run["records"] if r["output_tokens"] > 1)
    gaps = sum(len(r["itl_s"]) for r in run["records"])
    assert gaps >= 0.75 * sum(r["output_tokens"] - 1 for r in run["records"]), gaps
    s = run["summary"]
    assert s["completed"] == 8 and s["failed"] == 0 and s["output_tokens"] == sum(min(v, 20) for v in recorded.values())
    assert s["p50_latency_s"] <= s["p99_latency_s"] and s["throughput_tok_s"] > 0
    assert run["server"] is not None and run["server"]["aborted"] == 0          # trail's /metrics, diffed
    assert (tmp_path / "a" / "bench_serve.png").stat().st_size > 0 and "fcfs: 8 requests" in capsys.readouterr().out

    assert trail_main(["bench-serve", "--compare", str(tmp_path / "a" / "bench_serve.json"),
                       str(tmp_path / "b" / "bench_serve.json"), "--out", str(tmp_path / "c")]) == 0
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert cmp["policies"]["fcfs"]["latency_ratio_to_fcfs"] == 1.0 and "latency_ratio_ci95" in cmp["policies"]["trail"]
    result = json.loads((tmp_path / "c" / "serve.json").read_text())     # bench/serve.py's format: its table and plots
    assert "trail" in bench.serve.summary_lines(result)
    bench.serve.plot(result, tmp_path / "c")
    assert (tmp_path / "c" / "serve_http.png").is_file() and (tmp_path / "c" / "compare.png").is_file()

    assert trail_main([*common, "--rate", "50", "--num-requests", "6", "--out", str(tmp_path / "d")]) == 0
    poisson = json.loads((tmp_path / "d" / "bench_serve.json").read_text())
    assert poisson["label"] == "trail" and poisson["summary"]["completed"] == 6    # the server's policy by default
    assert trail_main(["bench-serve", "--compare", str(tmp_path / "a" / "bench_serve.json"),
                       str(tmp_path / "d" / "bench_serve.json")]) == 2          # other requests: no pairing
    assert "requests do not pair" in capsys.readouterr().err


def test_forced_length_leaves_every_prediction_unchanged(server):
    """Forcing a recorded length (ignore_eos + max_tokens, what --force-lengths sends) gives the same
    prompt-time and per-step predictions as the same request unforced under the server's cap; a
    real max_tokens cap without ignore_eos changes them (the test can see a leak)."""
    req = bench_serve.TraceRequest("x", prompt_ids=[40, 41, 42], output_len=10)

    def send(body):
        body = {**body, "stream": False, "return_predictions": True, "return_token_ids": True}
        body.pop("stream_options")
        status, out = asyncio.run(post(server.url, body, key=None))
        assert status == 200, out
        return out["choices"][0]["token_ids"], out["trail"]

    forced_ids, forced = send(bench_serve.request_body(req, model="random:tiny", force=True, max_tokens=None))
    plain_ids, plain = send(bench_serve.request_body(req, model="random:tiny", max_tokens=CAP))
    capped_ids, capped = send(bench_serve.request_body(req, model="random:tiny", max_tokens=10))
    assert len(forced_ids) == 10 and plain_ids[:10] == forced_ids == capped_ids
    assert forced["prompt_prediction"] == plain["prompt_prediction"] == CAP
    assert len(forced["predictions"]) == 10 and forced["predictions"] == plain["predictions"][:10]
    assert capped["prompt_prediction"] == 10 and capped["predictions"] != forced["predictions"]
    # without --trust-client-hints an expected-length hint changes nothing either
    _, hinted = send({**bench_serve.request_body(req, model="random:tiny", max_tokens=CAP), "expected_output_tokens": 2})
    assert hinted["prompt_prediction"] == CAP and hinted["predictions"] == plain["predictions"]


def test_bench_serve_points_at_any_openai_server(tmp_path, capsys):
    """A foreign server: no usage in its stream, no /metrics: tokens are counted by chunks."""
    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "foreign", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason": "length" if i == body["max_tokens"] - 1
                                  else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        trace = _trace(tmp_path / "t.jsonl")
        assert trail_main(["bench-serve", "--url", f"http://127.0.0.1:{port}/v1", "--trace", str(trace), "--burst", "4",
                           "--force-lengths", "--out", str(tmp_path / "f")]) == 0
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    run = json.loads((tmp_path / "f" / "bench_serve.json").read_text())
    assert run["label"] == "foreign" and run["server"] is None and run["summary"]["failed"] == 0
    assert [r["output_tokens"] for r in run["records"]] == [3 + 4 * int(i[1:]) for i in run["workload"]["ids"]]
