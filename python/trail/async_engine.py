"""`AsyncEngine`: trail's engine for asyncio servers. The engine core (an `LLMEngine` and its step
loop) runs in its own process (trail.server.core); this side tokenizes, sends requests over a
pipe and hands each request's outputs to its own asyncio queue.

    async with AsyncEngine("random:tiny", EngineConfig(policy="fcfs")) as engine:
        async for out in engine.generate("Hello", SamplingParams(max_new_tokens=16)):
            print(out.text_delta, end="")         # deltas; the last one has finished=True

Data flow: `add_request` tokenizes here (text, chat messages through the chat template, or token
ids), waits for a free engine slot (backpressure: at most `EngineConfig.max_slots` requests in the
engine, at most `max_queued` more waiting here, beyond that `EngineOverloaded`), sends the request
and waits for the core to accept it (a bad request raises ValueError here). A reader thread takes
each of the core's messages (one per engine step: the step's deltas merged, see `stream_interval`)
and puts each delta into its request's queue on the event loop; a consumer that lags gets the
queued deltas merged into one. Leaving `generate` early (break, an exception, a cancelled task: a
client that disconnected) aborts the request in the engine, which frees its KV blocks and slot at
once. `shutdown(timeout)` refuses new requests, lets the running ones finish for up to `timeout`
seconds, aborts the rest (each gets its final output, reason 'abort'), and stops the core. If the
core process dies, every open request ends with reason 'error' and new requests raise
`EngineClosed`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from trail.engine_config import EngineConfig
from trail.server.core import CoreSpec, spawn_core, stop_core

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """Every engine slot is taken and `max_queued` requests already wait: try again later (503)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down, or its core process died: no new requests (503)."""


@dataclass
class StreamOutput:
    """One delta of a request: `new_token_ids` / `text_delta` since the previous one (the deltas
    concatenate to the whole output). The last has `finished=True`, `finish_reason` ('stop',
    'length', 'abort' or 'error' with `error`) and `metrics` (ttft_s, latency_s, prompt_prediction,
    preemptions, recomputed_tokens, and the per-step predictions when asked for)."""
    request_id: int
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0          # tokens generated so far (this delta included)
    error: str | None = None
    metrics: dict | None = None


class RequestStream:
    """The outputs of one request, as an async iterator of `StreamOutput` (deltas queued while the
    consumer was busy come merged). `abort()` ends it early; `result()` gathers the whole output."""

    def __init__(self, engine: "AsyncEngine", request_id: int):
        self.engine, self.request_id = engine, request_id
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    def _push(self, out: StreamOutput) -> None:
        self._queue.put_nowait(out)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StreamOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        while not out.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            out = StreamOutput(out.request_id, out.new_token_ids + nxt.new_token_ids, out.text_delta + nxt.text_delta,
                               nxt.finished, nxt.finish_reason, nxt.prompt_tokens, nxt.completion_tokens,
                               nxt.error, nxt.metrics)
        self.finished = out.finished
        return out

    def abort(self) -> bool:
        """Aborts the request unless it finished; its final output (reason 'abort') still comes."""
        return False if self.finished else self.engine.abort(self.request_id)

    async def result(self) -> StreamOutput:
        """Every remaining delta merged into one final output."""
        ids, text, last = [], [], None
        async for last in self:
            ids += last.new_token_ids
            text.append(last.text_delta)
        if last is None:
            raise RuntimeError(f"the stream of request {self.request_id} was consumed already")
        return StreamOutput(self.request_id, ids, "".join(text), True, last.finish_reason, last.prompt_tokens,
                            last.completion_tokens, last.error, last.metrics)


class AsyncEngine:
    """An `LLMEngine` in its own process behind an asyncio API. `source`, `config`, `probe`,
    `prompt_predictor`, `device`, `dtype` (a name: 'float32', ...) and `seed` as
    `LLMEngine.from_pretrained` takes them; a `random:*` model is served with a byte tokenizer and
    a random probe (trail.server.random_parts). `stream_interval`: tokens gathered per delta
    (except the last); `max_queued`: requests allowed to wait here for an engine slot (None:
    max_slots); `threads`: torch threads of the core; `start_timeout`: seconds `start()` waits."""

    def __init__(self, source, config: EngineConfig | None = None, *, probe: str | None = "shipped",
                 prompt_predictor: str | None = "boe", device: str | None = None, dtype: str | None = None,
                 seed: int = 0, stream_interval: int = 1, max_queued: int | None = None,
                 threads: int | None = None, start_timeout: float = 600.0):
        if not (isinstance(stream_interval, int) and stream_interval >= 1):
            raise ValueError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")
        self.config = config or EngineConfig()
        self.spec = CoreSpec(str(source), self.config, probe, prompt_predictor, device, dtype, seed, stream_interval,
                             threads, logging.getLogger("trail").getEffectiveLevel())
        self.max_queued = self.config.max_slots if max_queued is None else max_queued
        self.start_timeout = start_timeout
        self.tokenizer = None
        self.info: dict = {}
        self.rejected = 0
        self._streams: dict[int, RequestStream] = {}
        self._waiters: deque[asyncio.Future] = deque()
        self._reserved = 0                # slots handed to waiters that have not registered yet
        self._ids = itertools.count()
        self._futures: dict = {}          # calls waiting for the core: "start", "bye", "empty" (a list), tokens
        self._tokens = itertools.count()
        self._proc = None
        self._dead: str | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outq: queue.SimpleQueue = queue.SimpleQueue()

    # ---- life cycle ------------------------------------------------------------------------------
    async def start(self) -> "AsyncEngine":
        """Starts the core process and loads the tokenizer here meanwhile; returns once the engine
        is built (RuntimeError with the core's error if it could not be)."""
        from trail.server.random_parts import model_tokenizer

        if self._proc is not None:
            raise RuntimeError("this AsyncEngine was started already (build a new one to start again)")
        self._loop = asyncio.get_running_loop()
        self._proc, self._inbox, self._outbox = spawn_core()
        self._send(self.spec)
        ready = self._loop.create_future()
        self._futures["start"] = ready
        threading.Thread(target=self._reader, name="trail-core-reader", daemon=True).start()
        threading.Thread(target=self._writer, name="trail-core-writer", daemon=True).start()
        try:
            tokenizer = asyncio.ensure_future(asyncio.to_thread(model_tokenizer, self.spec.source))
            self.info = await asyncio.wait_for(ready, self.start_timeout)
            self.tokenizer = await tokenizer
        except BaseException:
            self._closing = True
            await self._stop_process(10.0)
            raise
        logger.info("engine core ready (pid %d): %s", self.info["pid"], self.info)
        return self

    async def __aenter__(self) -> "AsyncEngine":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._dead is None and not self._closing

    @property
    def core_pid(self) -> int | None:
        """The engine core process's id (None before `start`)."""
        return None if self._proc is None else self._proc.pid

    @property
    def num_requests(self) -> int:          # requests in the engine (sent, not finished)
        return len(self._streams)

    @property
    def num_queued(self) -> int:            # requests waiting here for an engine slot
        return len(self._waiters)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuses new requests (queued ones raise EngineClosed), lets those in the engine finish
        for up to `timeout` seconds, aborts the rest (their final outputs still arrive), then
        stops the core process."""
        if self._proc is None or self._closing:
            return
        self._closing = True
        self._refuse_waiters("the engine is shutting down")
        if self._dead is None:
            if not await self._until_empty(timeout):
                logger.warning("shutdown: aborting %d unfinished requests", len(self._streams))
                self._send(("abort", list(self._streams)))
                await self._until_empty(60.0)
            bye = self._loop.create_future()
            self._futures["bye"] = bye
            self._send(("exit",))
            try:
                await asyncio.wait_for(bye, 60.0)
            except (asyncio.TimeoutError, EngineClosed):
                logger.warning("the engine core did not say goodbye")
        await self._stop_process(30.0)

    async def _until_empty(self, timeout: float | None) -> bool:
        """Waits until no request is in the engine (True) or `timeout` seconds pass (False)."""
        loop = self._loop
        end = None if timeout is None else loop.time() + timeout
        while self._streams and self._dead is None:
            idle = loop.create_future()
            self._futures.setdefault("empty", []).append(idle)
            try:
                await asyncio.wait_for(idle, None if end is None else max(0.0, end - loop.time()))
            except asyncio.TimeoutError:
                return False
        return True

    async def _stop_process(self, timeout: float) -> None:
        self._outq.put(None)               # the writer closes the pipe: the core sees EOF if it still runs
        await asyncio.to_thread(stop_core, self._proc, timeout)

    # ---- requests --------------------------------------------------------------------------------
    def tokenize(self, prompt, chat: bool = False) -> list[int]:
        """Prompt ids of text, chat messages (or text with chat=True: through the chat template)
        or token ids (checked against the vocabulary). ValueError names what is wrong."""
        from trail.request_checks import chat_text, prompt_token_ids

        if chat or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict)):
            prompt = chat_text(self.tokenizer, prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none: send token ids")
            ids = [int(t) for t in self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        else:
            ids = prompt_token_ids(prompt, self.info["vocab_size"])
        if not ids:
            raise ValueError("empty prompt")
        return ids

    async def add_request(self, prompt: str | Sequence[int] | Sequence[dict], params=None, *, chat: bool = False,
                          expected_output_tokens: float | None = None, return_predictions: bool = False) -> RequestStream:
        """Queues a request; returns its stream once the engine accepted it. `prompt`: text, token
        ids or chat messages (`chat`: text through the chat template too). `expected_output_tokens`:
        replaces the prompt-time prediction of its output length (the probe takes over after its
        prefill). Raises ValueError (a bad request), EngineOverloaded, EngineClosed."""
        from trail.request import SamplingParams

        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if expected_output_tokens is not None and not (isinstance(expected_output_tokens, (int, float))
                                                       and not isinstance(expected_output_tokens, bool)
                                                       and 0 <= expected_output_tokens < float("inf")):
            raise ValueError(f"expected_output_tokens must be a finite number >= 0, got {expected_output_tokens!r}")
        ids = self.tokenize(prompt, chat)
        await self._admission()
        rid = next(self._ids)
        stream = RequestStream(self, rid)
        self._streams[rid] = stream
        self._send(("add", rid, ids, params, {"hint": expected_output_tokens, "predictions": return_predictions}))
        try:
            stream.prompt_tokens = await asyncio.shield(stream._accepted)
        except asyncio.CancelledError:
            self.abort(rid)
            raise
        return stream

    async def _admission(self) -> None:
        """Waits for an engine slot (FIFO) or raises EngineOverloaded / EngineClosed. A slot handed
        to a waiter stays reserved until its request is registered (no one overtakes it)."""
        if self._dead is not None or self._closing or self._proc is None:
            raise EngineClosed(self._dead or "the engine is not running")
        if len(self._streams) + self._reserved < self.config.max_slots and not self._waiters:
            return
        if len(self._waiters) >= self.max_queued:
            self.rejected += 1
            raise EngineOverloaded(f"{len(self._streams)} requests in the engine and {len(self._waiters)} waiting")
        slot = self._loop.create_future()
        self._waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot in self._waiters:
                self._waiters.remove(slot)
            elif slot.done() and not slot.cancelled() and slot.exception() is None:
                self._reserved -= 1          # the slot was handed to us: pass it on
                self._wake()
            raise
        self._reserved -= 1                  # the caller registers its request before it awaits again

    def _refuse_waiters(self, why: str) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_exception(EngineClosed(why))

    def _wake(self) -> None:
        while self._waiters and len(self._streams) + self._reserved < self.config.max_slots:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                self._reserved += 1

    async def generate(self, prompt, params=None, *, chat: bool = False, expected_output_tokens: float | None = None,
                       return_predictions: bool = False) -> AsyncIterator[StreamOutput]:
        """`add_request` and its deltas; leaving early (an exception, cancellation, or a break
        followed by `aclose()`: use `contextlib.aclosing`) aborts the request."""
        stream = await self.add_request(prompt, params, chat=chat, expected_output_tokens=expected_output_tokens,
                                        return_predictions=return_predictions)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: int) -> bool:
        """Aborts a request in any state; False if it is unknown or finished."""
        if request_id not in self._streams or self._dead is not None:
            return False
        self._send(("abort", [request_id]))
        return True

    async def stats(self) -> dict:
        """The core's stats: requests by state, finished by reason, telemetry totals, KV blocks."""
        return await self._call("stats")

    async def wait_idle(self, timeout: float | None = None) -> dict:
        """Waits until no request is queued or in the engine and the core has nothing unfinished;
        returns its stats with `check`: 'ok' if `LLMEngine.check_idle` found every block and slot
        free, else what it found. asyncio.TimeoutError after `timeout` seconds."""
        async def wait():
            await self._until_empty(None)
            return await self._call("idle")
        return await asyncio.wait_for(wait(), timeout)

    async def _call(self, kind: str) -> dict:
        if self._dead is not None or self._proc is None:
            raise EngineClosed(self._dead or "the engine is not running")
        token = next(self._tokens)
        fut = self._loop.create_future()
        self._futures[token] = fut
        self._send((kind, token))
        return await fut

    # ---- the channel -----------------------------------------------------------------------------
    def _send(self, msg) -> None:
        self._outq.put(msg)

    def _writer(self) -> None:
        while (msg := self._outq.get()) is not None:
            try:
                self._outbox.send(msg)
            except (OSError, ValueError):
                break
        self._outbox.close()

    def _reader(self) -> None:
        while True:
            try:
                events = self._inbox.recv()
            except (EOFError, OSError):
                break
            try:
                self._loop.call_soon_threadsafe(self._dispatch, events)
            except RuntimeError:          # the loop is closed
                break
        self._inbox.close()
        try:
            self._loop.call_soon_threadsafe(self._core_gone)
        except RuntimeError:
            pass

    def _dispatch(self, events: list) -> None:
        futures = self._futures
        for ev in events:
            kind = ev[0]
            if kind == "out":
                _, rid, ids, text, reason, final = ev
                stream = self._streams.get(rid)
                if stream is None:
                    continue
                stream.completion_tokens += len(ids)
                done = reason is not None
                stream._push(StreamOutput(rid, ids, text, done, reason, stream.prompt_tokens, stream.completion_tokens,
                                          final.get("error") if done else None, final))
                if done:
                    self._forget(rid)
            elif kind == "acc":
                stream = self._streams.get(ev[1])
                if stream is not None and not stream._accepted.done():
                    stream.prompt_tokens = ev[2]     # now: this batch may carry its outputs too
                    stream._accepted.set_result(ev[2])
            elif kind == "err":
                stream = self._streams.get(ev[1])
                if stream is not None and not stream._accepted.done():
                    stream._accepted.set_exception(ValueError(ev[2]))
                self._forget(ev[1])
            elif kind in ("stats", "idle"):
                fut = futures.pop(ev[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(ev[2])
            elif kind in ("ready", "failed", "bye"):
                fut = futures.pop("bye" if kind == "bye" else "start", None)
                self._closing = self._closing or kind == "failed"      # the core exits by itself: quietly
                if fut is not None and not fut.done():
                    fut.set_exception(RuntimeError(f"the engine core could not start: {ev[1]}")) if kind == "failed" \
                        else fut.set_result(ev[1] if kind == "ready" else None)
            elif kind == "dead":
                self._fail_all(f"engine dead: {ev[1]}")

    def _forget(self, rid: int) -> None:
        self._streams.pop(rid, None)
        self._wake()
        if not self._streams:
            for fut in self._futures.pop("empty", []):
                if not fut.done():
                    fut.set_result(None)

    def _core_gone(self) -> None:
        quiet = self._closing and self._dead is None and not self._streams
        self._fail_all("the engine was shut down" if quiet else "the engine core process exited", log=not quiet)

    def _fail_all(self, why: str, log: bool = True) -> None:
        """The core is gone: every open request ends with an error, every waiting call fails."""
        if self._dead is None and log:
            logger.error("%s; ending %d requests", why, len(self._streams))
        self._dead = self._dead or why
        for rid, stream in list(self._streams.items()):
            if not stream._accepted.done():
                stream._accepted.set_exception(EngineClosed(why))
            else:
                stream._push(StreamOutput(rid, [], "", True, "error", stream.prompt_tokens, stream.completion_tokens,
                                          why, {"error": why}))
            self._forget(rid)
        self._refuse_waiters(why)
        for key, fut in list(self._futures.items()):
            for f in (fut if isinstance(fut, list) else [fut]):
                if not f.done():
                    f.set_exception(EngineClosed(why)) if key != "empty" else f.set_result(None)
        self._futures.clear()
