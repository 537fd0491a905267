"""The HTTP layer of `trail serve` (aiohttp): OpenAI routes over an `AsyncEngine`.

    POST /v1/completions, /v1/chat/completions   (stream: SSE chunks, `data: [DONE]` last)
    GET  /v1/models   /health   /metrics

A handler checks the body (trail.server.protocol), tokenizes through the engine, applies the cap
rule, submits, then streams the request's deltas as SSE chunks (or gathers them into one JSON
body). A client that disconnects cancels its handler (aiohttp's handler cancellation) or fails a
write; either way the handler's `finally` aborts the request, which frees its KV blocks and slot
at once. Errors are OpenAI error objects: 400 (a bad field, named in `param`), 401 (API key), 404
(model), 503 (queue full, shutting down, engine gone), 500 (the engine failed the request).

`/health` answers 200 while the engine core answers (its KV and request counts included);
`/health?wait_idle=S` first waits up to S seconds (at most 300) until no request is in flight
and reports `LLMEngine.check_idle`'s verdict (`check: ok`: every KV block and slot free): how
tests see that disconnected clients' blocks came back. `/metrics` is Prometheus text
(trail.server.metrics). `/v1/*` need `Authorization: Bearer KEY` when an API key is set.

`serve(...)` runs it until SIGINT / SIGTERM, then stops listening, gives running requests
`shutdown_timeout` seconds, aborts the rest (streams end with finish_reason 'abort') and stops the
engine core.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time

from aiohttp import web

from trail.async_engine import AsyncEngine, EngineClosed, EngineOverloaded
from trail.jsonio import dumps
from trail.server.metrics import prometheus_text
from trail.server.protocol import (ProtocolError, Reply, ServeOptions, error_body, parse_request, sampling_params,
                                   trail_extra)

logger = logging.getLogger(__name__)

MAX_WAIT_IDLE_S = 300.0
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _dumps(body) -> str:
    """Strict JSON (NaN and infinities as null, numpy values as numbers), compact."""
    return dumps(body, separators=(",", ":"))


def _json(body, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(body), status=status, content_type="application/json")


class OpenAIServer:
    """The routes over one engine. `api_key`: required on /v1/* when set."""

    def __init__(self, engine: AsyncEngine, opts: ServeOptions, api_key: str | None = None):
        self.engine, self.opts, self.api_key = engine, opts, api_key
        self.closing = False
        self.started = int(time.time())

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ProtocolError as exc:
            return _json(error_body(exc.message, exc.param, exc.kind), exc.status)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.path)
            return _json(error_body(f"internal error: {type(exc).__name__}: {exc}", kind="server_error"), 500)

    def _authorize(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ProtocolError("invalid or missing API key (send 'Authorization: Bearer KEY')", None, 401,
                                "authentication_error")

    # ---- generation ------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._authorize(request)
        if self.closing:
            raise ProtocolError("the server is shutting down", None, 503, "service_unavailable")
        try:
            body = await request.json(loads=json.loads)
        except ValueError as exc:
            raise ProtocolError(f"the request body is not valid JSON: {exc}") from None
        req = parse_request(body, chat, self.opts)
        key = "messages" if chat else "prompt"
        try:
            ids = self.engine.tokenize(req.prompt, chat=chat)
        except ValueError as exc:
            raise ProtocolError(str(exc), key) from None
        params = sampling_params(req, len(ids), self.opts)
        try:
            stream = await self.engine.add_request(ids, params, expected_output_tokens=req.expected_output_tokens,
                                                   return_predictions=req.return_predictions)
        except ValueError as exc:
            raise ProtocolError(str(exc), key) from None
        except EngineOverloaded as exc:
            raise ProtocolError(f"the server is busy ({exc}); retry later", None, 503, "server_busy") from None
        except EngineClosed as exc:
            raise ProtocolError(f"the engine is not available: {exc}", None, 503, "service_unavailable") from None
        reply = Reply(req, self.opts.model_name)
        try:
            if req.stream:
                return await self._stream(request, stream, reply)
            out = await stream.result()
            if out.finish_reason == "error":
                return _json(error_body(f"the engine failed this request: {out.error}", kind="server_error"), 500)
            return _json(reply.whole(out.text_delta, out.new_token_ids, out.finish_reason, out.prompt_tokens,
                                     out.completion_tokens, trail_extra(req, out.metrics)))
        finally:
            stream.abort()          # nothing once it finished; a client that left frees its blocks here

    async def _stream(self, request: web.Request, stream, reply: Reply) -> web.StreamResponse:
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)

        async def send(body) -> None:
            await resp.write(f"data: {_dumps(body)}\n\n".encode())

        try:
            if reply.req.chat:
                await send(reply.chunk("", [], role=True))
            async for out in stream:
                if out.finish_reason == "error":
                    await send(error_body(f"the engine failed this request: {out.error}", kind="server_error"))
                    break
                extra = trail_extra(reply.req, out.metrics) if out.finished else None
                await send(reply.chunk(out.text_delta, out.new_token_ids, out.finish_reason, extra=extra))
                if out.finished and reply.req.include_usage:
                    await send(reply.usage_chunk(out.prompt_tokens, out.completion_tokens))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:          # the client left (ConnectionResetError, aiohttp's reset errors)
            logger.debug("client left during the stream of request %d", stream.request_id)
        return resp

    # ---- the rest --------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        info = self.engine.info
        return _json({"object": "list", "data": [{"id": self.opts.model_name, "object": "model", "created": self.started,
                                                  "owned_by": "trail", "root": self.engine.spec.source,
                                                  "max_model_len": self.opts.max_model_len,
                                                  "policy": info.get("policy")}]})

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.alive or self.closing:
            return _json({"status": "closing" if self.closing else "dead"}, 503)
        wait = request.query.get("wait_idle")
        try:
            if wait is not None:
                try:
                    seconds = min(float(wait), MAX_WAIT_IDLE_S)
                except ValueError:
                    raise ProtocolError(f"wait_idle must be a number of seconds, got {wait!r}", "wait_idle") from None
                stats = await self.engine.wait_idle(seconds)
                return _json({"status": "ok", "idle": True, **_health(stats)})
            stats = await asyncio.wait_for(self.engine.stats(), 10.0)
        except asyncio.TimeoutError:
            return _json({"status": "busy" if wait is not None else "not responding", "idle": False}, 503)
        except EngineClosed as exc:
            return _json({"status": "dead", "error": str(exc)}, 503)
        return _json({"status": "ok", "requests": self.engine.num_requests, "queued": self.engine.num_queued,
                      **_health(stats)})

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            stats = await asyncio.wait_for(self.engine.stats(), 10.0)
        except (asyncio.TimeoutError, EngineClosed):
            stats = None
        front = {"up": self.engine.alive, "queued": self.engine.num_queued, "rejected": self.engine.rejected}
        return web.Response(text=prometheus_text(stats, front), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")


def _health(stats: dict) -> dict:
    keys = ("check", "unfinished", "waiting", "running", "kept", "swapped", "kv_free", "kv_total", "host_free",
            "host_total", "finished", "policy")
    return {k: stats[k] for k in keys if k in stats}


async def serve(engine: AsyncEngine, opts: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, shutdown_timeout: float = 30.0, on_ready=None) -> None:
    """Starts the engine and the server; runs until SIGINT or SIGTERM, then shuts down cleanly.
    `on_ready(host, port)` is called once it listens (port 0 picks a free port)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    server = OpenAIServer(engine, opts, api_key)
    runner = web.AppRunner(server.build_app(), handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=shutdown_timeout + 10.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        if on_ready is not None:
            on_ready(bound[0], bound[1])
        await stop.wait()
        logger.warning("shutting down: %d requests in the engine get %.0f s to finish", engine.num_requests,
                       shutdown_timeout)
        server.closing = True
        await site.stop()                     # no new connections
        await engine.shutdown(shutdown_timeout)
    finally:
        await engine.shutdown(0.0)
        await runner.cleanup()
