"""`trail serve random:tiny` as CI runs it: a real server process on a free port (--port 0, the
port read from its first line), the official `openai` client, a real aiohttp client for 200
concurrent clients with random disconnects. Greedy tokens are checked against an in-process
LLMEngine on the same weights (float64, so batch composition cannot flip an argmax); after the
disconnects every KV block and slot must be free (`/health?wait_idle`: LLMEngine.check_idle)."""
import asyncio
import json
import os
import random
import signal
import subprocess
import sys

import aiohttp
import pytest
import torch

from trail import EngineConfig, LLMEngine, SamplingParams
from trail.server.bench_report import parse_prometheus
from trail.server.process import ServeProcess
from trail.server.random_parts import engine_parts

KEY = "test-key"
MODEL = "random:tiny"
SERVER_ARGS = ["--dtype", "float64", "--threads", "1", "--max-batch", "16", "--max-slots", "256",
               "--max-model-len", "512", "--kv-cache-gib", "0.02", "--num-host-blocks", "0"]


class ServerProcess(ServeProcess):
    """`trail serve random:tiny --port 0 ...` with one torch thread."""

    def __init__(self, *args: str, **kwargs):
        super().__init__(MODEL, *args, env=dict(os.environ, OMP_NUM_THREADS="1"), **kwargs)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(*SERVER_ARGS, "--api-key", KEY, "--trust-client-hints", "--default-max-tokens", "64")
    yield srv
    assert srv.stop() == 0, srv.stderr()[-3000:]


@pytest.fixture(scope="module")
def reference():
    parts = engine_parts(MODEL, probe="shipped", prompt_predictor="boe", device="cpu", dtype=torch.float64)
    return LLMEngine(config=EngineConfig(policy="fcfs", max_batch=64, max_slots=256, max_model_len=512,
                                         kv_cache_gib=0.02, num_host_blocks=0), **parts)


def greedy(reference, prompts, lengths, chat=False) -> list[list[int]]:
    outs = reference.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths],
                              progress=False, chat=chat)
    return [list(o.token_ids) for o in outs]


def run(coro):
    return asyncio.run(coro)


async def get(url: str, path: str, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.get(url + path, **kw) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def post(url: str, body: dict, path: str = "/v1/completions", key: str | None = KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers=headers) as r:
            return r.status, await r.json()


def metrics(url: str) -> dict:
    status, text = run(get(url, "/metrics"))
    assert status == 200
    return parse_prometheus(text)


def test_openai_client_streams_a_completion_and_a_chat_completion(server, reference):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chunks = list(client.completions.create(model=MODEL, prompt="Hello, world", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []
    texts = [c.choices[0] for c in chunks if c.choices]
    assert texts[-1].finish_reason == "length" and all(t.finish_reason is None for t in texts[:-1])
    whole = client.completions.create(model=MODEL, prompt="Hello, world", max_tokens=8, temperature=0)
    assert "".join(t.text for t in texts) == whole.choices[0].text
    ids = [i for t in texts for i in t.model_extra["token_ids"]]
    assert ids == greedy(reference, ["Hello, world"], [8])[0]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"return_token_ids": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > 10
    deltas = [c.choices[0] for c in chunks[1:] if c.choices]
    text = "".join(d.delta.content for d in deltas)
    assert deltas[-1].finish_reason == "length"
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert [i for d in deltas for i in d.model_extra["token_ids"]] == greedy(reference, [messages], [6], chat=True)[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()


def test_a_client_disconnect_frees_the_request_blocks(server):
    before = metrics(server.url).get('trail_requests_finished_total{reason="abort"}', 0)

    async def main():
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "stream": True}
            resp = await s.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            for _ in range(3):
                assert (await resp.content.readline()).startswith(b"data: ")
                await resp.content.readline()
            _, held = await get(server.url, "/health")
            resp.close()                              # the client disconnects mid-stream
        _, idle = await get(server.url, "/health?wait_idle=60")
        return held, idle

    held, idle = run(main())
    assert held["running"] == 1 and held["kv_free"] < held["kv_total"]
    assert idle["idle"] and idle["check"] == "ok" and idle["kv_free"] == idle["kv_total"] and idle["unfinished"] == 0
    assert metrics(server.url)['trail_requests_finished_total{reason="abort"}'] == before + 1


def test_200_concurrent_clients_with_random_disconnects_lose_nothing(server, reference):
    rng = random.Random(28)
    jobs = []       # (prompt, max_tokens, stream, disconnect after n chunks / cancel after s seconds / None)
    for i in range(200):
        prompt = [rng.randrange(509) for _ in range(rng.randint(2, 10))]
        kind = rng.random()
        if kind < 0.2:
            jobs.append((prompt, 300, True, ("chunks", rng.randint(1, 3))))
        elif kind < 0.3:
            jobs.append((prompt, 300, False, ("cancel", rng.uniform(0.0, 0.3))))
        else:
            jobs.append((prompt, rng.randint(2, 12), rng.random() < 0.5, None))
    before = metrics(server.url)
    headers = {"Authorization": f"Bearer {KEY}"}

    async def client(session, prompt, n, stream, leave):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "ignore_eos": True, "temperature": 0,
                "return_token_ids": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if leave is not None and leave[0] == "cancel":
            try:
                await asyncio.wait_for(client(session, prompt, n, stream, None), leave[1])
            except asyncio.TimeoutError:
                pass
            return None
        async with session.post(server.url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            if not stream:
                out = await r.json()
                return out["choices"][0]["token_ids"], out["choices"][0]["finish_reason"], out["usage"], True
            ids, reason, usage, done, chunks = [], None, None, False, 0
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    ids += chunk["choices"][0]["token_ids"]
                    reason = chunk["choices"][0]["finish_reason"] or reason
                    chunks += 1
                    if leave is not None and chunks == leave[1]:
                        return None               # leaving the block closes the connection mid-stream
                usage = chunk.get("usage") or usage
            return ids, reason, usage, done

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            results = await asyncio.gather(*[client(session, *job) for job in jobs])
        _, idle = await get(server.url, "/health?wait_idle=120")
        return results, idle

    results, idle = run(main())
    kept = [(job, res) for job, res in zip(jobs, results) if job[3] is None]
    want = greedy(reference, [job[0] for job, _ in kept], [job[1] for job, _ in kept])
    for (job, (ids, reason, usage, done)), expect in zip(kept, want):
        assert ids == expect and reason == "length" and done, job
        assert usage["completion_tokens"] == job[1] and usage["prompt_tokens"] == len(job[0])
    assert idle["check"] == "ok" and idle["kv_free"] == idle["kv_total"] and idle["unfinished"] == 0
    after = metrics(server.url)
    delta = {r: after.get(f'trail_requests_finished_total{{reason="{r}"}}', 0)
             - before.get(f'trail_requests_finished_total{{reason="{r}"}}', 0) for r in ("length", "abort", "error")}
    left_stream = sum(1 for job in jobs if job[3] and job[3][0] == "chunks")
    cancelled = sum(1 for job in jobs if job[3] and job[3][0] == "cancel")
    assert delta["error"] == 0 and left_stream >= 20 and cancelled >= 10
    assert len(kept) <= delta["length"] and left_stream <= delta["abort"] and delta["length"] + delta["abort"] <= 200
    assert after['trail_step_seconds_count'] > before['trail_step_seconds_count']
    assert after["trail_generation_tokens_total"] - before["trail_generation_tokens_total"] >= sum(j[1] for j, _ in kept)


def test_fields_sent_with_defaults_pass_and_others_get_a_400_naming_them(server, reference):
    ok = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 4, "temperature": 0, "n": 1, "best_of": 1, "echo": False,
          "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None,
          "user": "u1", "top_p": 1, "top_k": -1, "seed": 3, "min_tokens": 0, "priority": 0, "stop": None,
          "stop_token_ids": [], "ignore_eos": False, "return_token_ids": True}
    status, body = run(post(server.url, ok))
    assert status == 200 and body["choices"][0]["token_ids"] == greedy(reference, [[3, 4, 5]], [4])[0]
    bad = [({"n": 2}, "n"), ({"logprobs": 1}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
           ({"frequency_penalty": 1}, "frequency_penalty"), ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"),
           ({"min_tokens": 4}, "min_tokens"), ({"priority": 1}, "priority"), ({"logit_bias": {"5": 1}}, "logit_bias"),
           ({"temperature": -1}, "temperature"), ({"bogus": 1}, "bogus"), ({"max_tokens": 0}, "max_tokens"),
           ({"max_tokens": 600}, "max_tokens"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [9999]}, "prompt"),
           ({"stream_options": {"include_usage": True}}, "stream_options"), ({"ignore_eos": "yes"}, "ignore_eos")]
    for change, field in bad:
        status, body = run(post(server.url, {**ok, **change}))
        assert status == 400 and body["error"]["param"] == field and body["error"]["message"], (change, body)
    status, body = run(post(server.url, {**ok, "priority": 2}))
    assert "priority is not supported yet" in body["error"]["message"]
    status, body = run(post(server.url, {**ok, "model": "other"}))
    assert status == 404 and body["error"]["param"] == "model"
    assert run(post(server.url, ok, key=None))[0] == 401
    chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 2, "logprobs": False, "tools": [], "response_format": {"type": "text"}}
    assert run(post(server.url, chat, "/v1/chat/completions"))[0] == 200
    for change, field in (({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
                          ({"messages": []}, "messages"), ({"max_completion_tokens": 3}, "max_completion_tokens")):
        status, body = run(post(server.url, {**chat, **change}, "/v1/chat/completions"))
        assert status == 400 and body["error"]["param"] == field, (change, body)


def test_vllm_sampling_fields_act(server, reference):
    base = {"model": MODEL, "prompt": [20, 21, 22], "return_token_ids": True}
    ids = greedy(reference, [[20, 21, 22]], [10])[0]
    status, body = run(post(server.url, {**base, "max_tokens": 10, "temperature": 0, "stop_token_ids": [ids[3]]}))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["token_ids"] == ids[:ids.index(ids[3]) + 1]
    sampled = [run(post(server.url, {**base, "max_tokens": 10, "temperature": 1.0, "top_k": 50, "seed": s}))[1]
               for s in (1, 1, 2)]
    tokens = [b["choices"][0]["token_ids"] for b in sampled]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]
    status, body = run(post(server.url, {**base, "temperature": 0}))       # no max_tokens: --default-max-tokens
    assert body["usage"]["completion_tokens"] <= 64 and status == 200
    text = run(post(server.url, {**base, "max_tokens": 10, "temperature": 0}))[1]["choices"][0]["text"]
    stop = text[3:5]
    if stop and text.index(stop) > 0:
        body = run(post(server.url, {**base, "max_tokens": 10, "temperature": 0, "stop": [stop]}))[1]
        assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["text"] == text[:text.index(stop)]


def test_trusted_expected_length_hint_replaces_the_prompt_prediction(server):
    body = {"model": MODEL, "prompt": [30, 31], "max_tokens": 20, "temperature": 0, "return_predictions": True}
    hinted = run(post(server.url, {**body, "expected_output_tokens": 3}))[1]["trail"]
    plain = run(post(server.url, body))[1]["trail"]
    assert hinted["prompt_prediction"] == 3 and plain["prompt_prediction"] == 20
    assert hinted["predictions"] == plain["predictions"]


def test_metrics_page_has_the_serving_series(server):
    status, _ = run(post(server.url, {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}))
    assert status == 200                # a request of its own: the test does not depend on the ones before it
    m = metrics(server.url)
    for name in ('trail_requests{state="waiting"}', 'trail_requests{state="running"}',
                 'trail_requests{state="swapped"}', 'trail_preemptions_total{mode="keep"}',
                 'trail_preemptions_total{mode="swap"}', 'trail_preemptions_total{mode="recompute"}',
                 "trail_recomputed_tokens_total", 'trail_step_seconds{quantile="0.5"}', "trail_step_seconds_sum",
                 "trail_kv_blocks_free{pool=\"gpu\"}", "trail_up"):
        assert name in m, name
    assert m["trail_up"] == 1 and m["trail_step_seconds_count"] > 0 and m["trail_step_seconds_sum"] > 0
    assert m["trail_probe_predicted_requests_total"] > 0 and m["trail_probe_online_mae_tokens"] >= 0
    assert m["trail_prediction_fallback"] in (0, 1)


def test_sigterm_finishes_or_aborts_every_request():
    """SIGTERM to the server's whole process group (as Ctrl-C, `timeout` or systemd send it): the
    engine core ignores it, the server finishes what it can in --shutdown-timeout, aborts the rest
    (their streams end with finish_reason 'abort' and [DONE]) and exits 0."""
    srv = ServerProcess(*SERVER_ARGS, "--policy", "fcfs", "--probe", "none", "--shutdown-timeout", "0.5",
                        "--max-model-len", "2048", new_session=True)

    async def stream(session, n, started: asyncio.Event):
        body = {"model": MODEL, "prompt": [1, 2], "max_tokens": n, "ignore_eos": True, "stream": True}
        async with session.post(srv.url + "/v1/completions", json=body) as r:
            chunks = []
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunks.append(json.loads(line[6:]))
                    started.set()
            return chunks[-1]["choices"][0]["finish_reason"], len(chunks)

    async def main():
        async with aiohttp.ClientSession() as session:
            begun = [asyncio.Event(), asyncio.Event()]
            long = asyncio.ensure_future(stream(session, 2000, begun[0]))   # >= 2000 steps: seconds
            await begun[0].wait()                    # the long request streams: SIGTERM comes mid-stream
            short = asyncio.ensure_future(stream(session, 3, begun[1]))
            await begun[1].wait()
            os.killpg(srv.proc.pid, signal.SIGTERM)  # the group this test started: server and engine core
            return await long, await short

    try:
        (long_reason, long_n), (short_reason, short_n) = run(main())
        assert srv.proc.wait(60) == 0, srv.stderr()[-3000:]
    finally:
        srv.stop()
    assert "trail serve: stopped" in srv.proc.stdout.read()
    assert short_reason == "length" and short_n == 3
    assert long_reason == "abort" and long_n < 2000


def test_an_engine_that_cannot_start_is_one_line_and_exit_code_1():
    r = subprocess.run([sys.executable, "-m", "trail.cli", "serve", MODEL, "--port", "0", "--policy", "sjf_prompt"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == ("trail serve: error: the engine core could not start: ValueError: the sjf_prompt "
                                "policy needs a prompt predictor"), r.stderr
