"""trail.AsyncEngine on CPU (random:tiny in float64, the engine core in its own process): streamed
deltas equal an in-process LLMEngine's greedy tokens and merge per --stream-interval; abort and
leaving a stream early free every block at once; backpressure (a full queue refuses, queued
requests run once slots free); the expected-length hint replaces only the prompt-time prediction;
shutdown finishes or aborts every request; a dead core ends every request with an error."""
import asyncio
import contextlib
import os
import signal
import threading

import pytest
import torch

from trail import EngineConfig, LLMEngine, SamplingParams
from trail.async_engine import AsyncEngine, EngineClosed, EngineOverloaded
from trail.server.random_parts import engine_parts

CONFIG = EngineConfig(policy="trail", max_batch=8, max_slots=12, max_model_len=512, kv_cache_gib=0.02,
                      num_host_blocks=0)
INTERVAL = 3


class LoopThread:
    """An event loop in a thread: the engine lives on it across tests; each test runs coroutines there."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _engine(**kwargs) -> AsyncEngine:
    return AsyncEngine("random:tiny", kwargs.pop("config", CONFIG), dtype="float64", threads=1, **kwargs)


@pytest.fixture(scope="module")
def lt():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def engine(lt):
    eng = lt.run(_engine(stream_interval=INTERVAL, max_queued=4).start())
    yield eng
    lt.run(eng.shutdown(10.0))


@pytest.fixture(scope="module")
def reference():
    """The same weights in an in-process LLMEngine: greedy ids and the tokenizer."""
    parts = engine_parts("random:tiny", probe="shipped", prompt_predictor="boe", device="cpu", dtype=torch.float64)
    return LLMEngine(config=EngineConfig(policy="fcfs", max_batch=4, max_model_len=512, kv_cache_gib=0.02,
                                         num_host_blocks=0), **parts)


def _greedy(reference, prompt, n: int, chat: bool = False) -> list[int]:
    (out,) = reference.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True), progress=False, chat=chat)
    return list(out.token_ids)


def test_streamed_deltas_equal_the_in_process_engine(lt, engine, reference):
    prompts = [([5 + i, 17, 300 + i, 42][: 2 + i % 3], 4 + 5 * i) for i in range(9)]
    prompts += [("Hello there, tiny model.", 11), ("What is 2 + 2?", 7)]

    async def one(prompt, n, chat):
        deltas = []
        async for out in engine.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), chat=chat):
            deltas.append(out)
        return deltas

    async def main():
        jobs = [one(p, n, False) for p, n in prompts] + [one("Hi!", 10, True)]
        return await asyncio.gather(*jobs)

    results = lt.run(main())
    for (prompt, n), deltas in zip(prompts + [("Hi!", 10)], results):
        chat = prompt == "Hi!"
        ids = [t for d in deltas for t in d.new_token_ids]
        assert ids == _greedy(reference, prompt, n, chat), prompt
        final = deltas[-1]
        assert final.finished and final.finish_reason == "length" and final.completion_tokens == n
        assert not any(d.finished for d in deltas[:-1])
        assert all(len(d.new_token_ids) % INTERVAL == 0 and d.new_token_ids for d in deltas[:-1])  # merged per interval
        assert 1 <= len(final.new_token_ids) <= INTERVAL or len(deltas) == 1
        text = "".join(d.text_delta for d in deltas)
        assert text == reference.tokenizer.decode(ids, skip_special_tokens=True)
        assert final.prompt_tokens == len(engine.tokenize(prompt, chat=chat))


def test_abort_and_leaving_a_stream_free_every_block(lt, engine):
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)

    async def main():
        before = (await engine.stats())["finished"].get("abort", 0)
        stream = await engine.add_request([1, 2, 3], params)
        first = await stream.__anext__()
        held = await engine.stats()
        assert stream.abort()
        rest = [out async for out in stream]
        async with contextlib.aclosing(engine.generate([4, 5, 6], params)) as gen:
            async for _ in gen:
                break                                 # leaving early aborts the request
        idle = await engine.wait_idle(30.0)
        return first, held, rest, idle, before

    first, held, rest, idle, before = lt.run(main())
    assert first.new_token_ids and held["kv_free"] < held["kv_total"] and held["unfinished"] == 1
    assert rest[-1].finish_reason == "abort" and first.completion_tokens + sum(len(o.new_token_ids) for o in rest) < 400
    assert idle["check"] == "ok" and idle["kv_free"] == idle["kv_total"] and idle["unfinished"] == 0
    assert idle["finished"]["abort"] == before + 2


def test_backpressure_queues_then_refuses(lt, engine, reference):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)

    async def main():
        streams = [await engine.add_request([7, i], params) for i in range(CONFIG.max_slots)]
        queued = [asyncio.ensure_future(engine.add_request([8, i], params)) for i in range(engine.max_queued)]
        for _ in range(5):
            await asyncio.sleep(0)                    # let each queued call reach its wait for a slot
        assert engine.num_queued == engine.max_queued and not any(q.done() for q in queued)
        with pytest.raises(EngineOverloaded):
            await engine.add_request([9], params)
        outs = [await s.result() for s in streams] + [await (await q).result() for q in queued]
        return outs

    rejected = engine.rejected
    outs = lt.run(main())
    assert engine.rejected == rejected + 1
    for i, out in enumerate(outs):
        prompt = [7, i] if i < CONFIG.max_slots else [8, i - CONFIG.max_slots]
        assert out.finish_reason == "length" and out.new_token_ids == _greedy(reference, prompt, 40)


def test_expected_length_hint_replaces_only_the_prompt_prediction(lt, engine):
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)

    async def main():
        hinted = await (await engine.add_request([11, 12, 13], params, expected_output_tokens=5.0,
                                                 return_predictions=True)).result()
        plain = await (await engine.add_request([11, 12, 13], params, return_predictions=True)).result()
        return hinted.metrics, plain.metrics

    hinted, plain = lt.run(main())
    assert hinted["prompt_prediction"] == 5.0 and plain["prompt_prediction"] == 30.0   # the prior mean capped at 30
    assert hinted["predictions"] == plain["predictions"] and len(plain["predictions"]) == 30   # the probe's, after prefill
    with pytest.raises(ValueError, match="expected_output_tokens"):
        lt.run(engine.add_request([1], params, expected_output_tokens=-1))
    with pytest.raises(ValueError, match="vocabulary"):
        lt.run(engine.add_request([100000], params))           # refused before it reaches the engine


def test_shutdown_finishes_or_aborts_every_request(lt):
    config = EngineConfig(policy="fcfs", max_batch=4, max_slots=4, max_model_len=1024, kv_cache_gib=0.02,
                          num_host_blocks=0)

    async def main():
        eng = await _engine(config=config, probe=None).start()
        long = [await eng.add_request([i + 1], SamplingParams(max_new_tokens=1000, ignore_eos=True)) for i in range(3)]
        short = await eng.add_request([9], SamplingParams(max_new_tokens=2, ignore_eos=True))
        waiting = asyncio.ensure_future(eng.add_request([10], SamplingParams(max_new_tokens=2)))
        await asyncio.sleep(0)
        assert eng.num_queued == 1
        await eng.shutdown(timeout=1.0)
        finals = [await s.result() for s in long + [short]]
        with pytest.raises(EngineClosed):
            await waiting
        with pytest.raises(EngineClosed):
            await eng.add_request([1], SamplingParams())
        return eng, finals

    eng, finals = lt.run(main())
    assert [f.finish_reason for f in finals] == ["abort"] * 3 + ["length"]
    assert all(f.completion_tokens < 1000 for f in finals[:3]) and finals[3].new_token_ids
    assert eng._proc.poll() == 0                      # the core exited by itself, cleanly


def test_a_dead_core_ends_every_request_with_an_error(lt):
    async def main():
        eng = await _engine(probe=None, config=EngineConfig(policy="fcfs", max_batch=4, max_slots=8,
                                                            max_model_len=1024, kv_cache_gib=0.02,
                                                            num_host_blocks=0)).start()
        streams = [await eng.add_request([i + 1], SamplingParams(max_new_tokens=1000, ignore_eos=True))
                   for i in range(2)]
        await streams[0].__anext__()
        os.kill(eng.core_pid, signal.SIGKILL)
        finals = [await s.result() for s in streams]
        alive = eng.alive
        with pytest.raises(EngineClosed):
            await eng.add_request([1], SamplingParams())
        with pytest.raises(EngineClosed):
            await eng.stats()
        await eng.shutdown()
        return finals, alive

    finals, alive = lt.run(main())
    assert not alive
    assert [f.finish_reason for f in finals] == ["error", "error"]
    assert all("exited" in f.error for f in finals)


def test_outputs_in_the_same_batch_as_the_acceptance_carry_the_prompt_length(lt, engine):
    """The core may answer a request's acceptance and its outputs (even its final one) in one
    batch of events, before add() resumes from its await: those outputs still carry the prompt's
    token count (a race seen on a loaded CPU: usage.prompt_tokens was 0)."""
    from trail.async_engine import RequestStream

    async def race():
        rid = -12345                            # a stream the core never sees: only _dispatch runs
        stream = RequestStream(engine, rid)
        engine._streams[rid] = stream
        engine._dispatch([("acc", rid, 7), ("out", rid, [1, 2], "ab", None, {}),
                          ("out", rid, [3], "c", "length", {"error": None})])
        outs = [o async for o in stream]
        return stream, outs

    stream, outs = lt.run(race())
    assert stream.prompt_tokens == 7 and [o.prompt_tokens for o in outs] == [7] * len(outs)
    assert sum(len(o.new_token_ids) for o in outs) == 3 and outs[-1].finished
