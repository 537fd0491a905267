"""`trail bench-serve`: an OpenAI-protocol load generator. It replays a trace's prompts against any
OpenAI-compatible server (trail serve, vLLM, SGLang, ...) with Poisson (`--rate R`) or burst
(`--burst N`) arrivals, streams every response and measures per request the time to first token,
the times between tokens (streamed chunks) and the end-to-end latency; then the summary and plots
of the in-process serving benchmark (trail.server.bench_report).

Trace: JSONL (or .jsonl.gz), one request a line: `prompt_ids` (token ids), `prompt` (text) or
`messages` (chat), and optionally the recorded output length `output_len` (or `output_ids`); a
`trail collect` trace works as is (its header line is skipped). `--force-lengths` replays the
recorded lengths: each request sends `ignore_eos: true, max_tokens: L`. A trail server serves such
a request as replay_length L under the cap every request gets, so forcing never changes what
trail's predictor and scheduler see (trail.server.protocol); a vLLM server stops at L too.

Data flow: trace -> seeded draw of requests and arrival times -> one aiohttp task per request
(sleeps until its arrival, POSTs with stream: true, reads the SSE chunks) -> records -> report.
Runs of several servers on the same trace, seed and arrivals pair request by request: `trail
bench-serve --compare A.json B.json ...` gives the in-process benchmark's comparison (ratios to
fcfs with paired-bootstrap intervals) and plots.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trail.cli_args import UsageError, existing_file, nonneg_int, positive_float, positive_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceRequest:
    id: str
    prompt_ids: list | None = None
    prompt: str | None = None
    messages: list | None = None
    output_len: int | None = None


def load_trace(path: str | Path) -> list[TraceRequest]:
    """The requests of a JSONL trace (header lines with a 'format' key are skipped). ValueError
    names the line that has no prompt."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if "format" in r and not any(k in r for k in ("prompt", "prompt_ids", "messages")):
                continue
            length = r.get("output_len", len(r["output_ids"]) if isinstance(r.get("output_ids"), list) else None)
            req = TraceRequest(str(r.get("id", n)), r.get("prompt_ids"), r.get("prompt"), r.get("messages"),
                               None if length is None else int(length))
            if req.prompt_ids is None and req.prompt is None and req.messages is None:
                raise ValueError(f"{path}:{n}: no prompt_ids, prompt or messages")
            out.append(req)
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def workload(pool: int, n: int, rate: float | None, seed: int):
    """(pool indices, arrival seconds): a seeded permutation of the pool, continued by further
    permutations when n exceeds it; Poisson arrivals at `rate` req/s (the first at 0), or all at 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(pool) for _ in range(-(-n // pool))])[:n]
    if rate is None:
        return idx, np.zeros(n)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return idx, np.cumsum(gaps)


def request_body(r: TraceRequest, *, model: str, chat: bool = False, text: bool = False, force: bool = False,
                 max_tokens: int | None = 256, temperature: float = 0.0) -> dict:
    """The request sent for `r`: streamed with usage, greedy by default. `force`: its recorded
    length as ignore_eos + max_tokens (capped at max_tokens). `text`: the prompt's text even when
    it has token ids (completions only)."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": temperature}
    if force:
        if r.output_len is None:
            raise ValueError(f"request {r.id} has no recorded length to force (output_len)")
        body.update(max_tokens=r.output_len if max_tokens is None else min(r.output_len, max_tokens), ignore_eos=True)
    elif max_tokens is not None:
        body["max_tokens"] = max_tokens
    if chat:
        if r.messages is None and r.prompt is None:
            raise ValueError(f"request {r.id}: the chat endpoint needs messages or prompt text")
        body["messages"] = r.messages or [{"role": "user", "content": r.prompt}]
    elif r.prompt_ids is not None and not (text and r.prompt is not None):
        body["prompt"] = list(r.prompt_ids)
    elif r.prompt is not None:
        body["prompt"] = r.prompt
    else:
        raise ValueError(f"request {r.id}: the completions endpoint needs prompt_ids or prompt text")
    return body


async def _one(session, url: str, body: dict, headers: dict, t0: float, arrival: float, chat: bool) -> dict:
    import aiohttp

    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    start = time.perf_counter()
    rec = {"arrival_s": arrival, "lag_s": start - t0 - arrival, "ttft_s": None, "itl_s": [], "latency_s": None,
           "output_tokens": 0, "prompt_tokens": None, "chunks": 0, "finish_reason": None, "error": None}
    last = None
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = str(chunk["error"].get("message", chunk["error"]))
                    break
                if chunk.get("usage"):
                    rec["output_tokens"] = chunk["usage"].get("completion_tokens", 0)
                    rec["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if chat and "role" in delta and not delta.get("content") and not choice.get("finish_reason"):
                        continue                  # the role announcement carries no token
                    now = time.perf_counter()
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now - start
                    else:
                        rec["itl_s"].append(now - last)
                    last = now
                    rec["chunks"] += 1
                    rec["finish_reason"] = choice.get("finish_reason") or rec["finish_reason"]
        rec["latency_s"] = time.perf_counter() - start
        if not rec["output_tokens"]:
            rec["output_tokens"] = rec["chunks"]          # a server that sends no usage: a chunk per token
        if rec["error"] is None and rec["ttft_s"] is None:
            rec["error"] = "no token arrived"
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def server_model(url: str, headers: dict) -> tuple[str, str | None]:
    """(id, policy if the server says) of the first model GET /v1/models lists."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{_base(url)}/v1/models", headers=headers) as resp:
            resp.raise_for_status()
            first = (await resp.json())["data"][0]
            return first["id"], first.get("policy")


async def scrape_metrics(url: str) -> dict[str, float]:
    """trail's counters from /metrics ({} for a server without them)."""
    import aiohttp

    from trail.server.bench_report import parse_prometheus

    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{_base(url)}/metrics") as resp:
                return parse_prometheus(await resp.text()) if resp.status == 200 else {}
    except (aiohttp.ClientError, OSError):
        return {}


async def run(url: str, bodies: list[dict], arrivals, *, chat: bool = False, api_key: str | None = None,
              timeout: float = 600.0) -> tuple[list[dict], float]:
    """Sends `bodies` at `arrivals` (seconds from now); -> (records in request order, makespan s)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = f"{_base(url)}/v1/{'chat/completions' if chat else 'completions'}"
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()
        records = await asyncio.gather(*[_one(session, endpoint, b, headers, t0, float(a), chat)
                                         for b, a in zip(bodies, arrivals)])
        return list(records), time.perf_counter() - t0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench-serve", help="replay a trace against an OpenAI-compatible server: TTFT, time "
                                                  "between tokens, latency (needs aiohttp)",
                              description=__doc__.split("\n\n")[0].replace("`trail bench-serve`: ", ""))
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--trace", type=existing_file, help="JSONL(.gz) of prompts (prompt_ids, prompt or messages) and "
                                                       "optionally recorded lengths (output_len)")
    arrivals = p.add_mutually_exclusive_group()
    arrivals.add_argument("--rate", type=positive_float, default=None, help="Poisson arrivals, requests per second")
    arrivals.add_argument("--burst", type=positive_int, default=None, metavar="N", help="N requests at once")
    p.add_argument("--num-requests", type=positive_int, default=None,
                   help="requests with --rate (default: the trace's size; more reuse prompts)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="which requests, in which order, at which times")
    p.add_argument("--force-lengths", action="store_true",
                   help="replay the recorded lengths (ignore_eos + max_tokens); trail's scheduler still sees only "
                        "its own cap")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="max_tokens of each request; forced lengths are capped at it too (compare with the same value "
                        "as the server's --default-max-tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="completions (prompt ids, else text) or chat (messages, else the prompt as a user message)")
    p.add_argument("--text-prompts", action="store_true", help="send the prompt text even where token ids exist")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY, else none)")
    p.add_argument("--label", default=None, help="this run's name in comparisons, e.g. the server's policy "
                                                 "(default: the server's policy if it says, else the model)")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds a request may take")
    p.add_argument("--out", default=None, metavar="DIR", help="write bench_serve.json, .summary.txt and .png here")
    p.add_argument("--compare", nargs="+", type=existing_file, default=None, metavar="RUN.json",
                   help="instead of a run: compare runs (bench_serve.json files of the same trace, seed and "
                        "arrivals) as the in-process benchmark does; writes to --out")
    p.set_defaults(func=cmd_bench_serve)
    return p


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from trail.server import bench_report

    if args.compare:
        try:
            text = bench_report.compare_runs([json.loads(Path(f).read_text()) for f in args.compare], args.out)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"cannot compare: {exc}") from None
        print(text, end="")
        return 0
    if not args.url or not args.trace or (args.rate is None and args.burst is None):
        raise UsageError("a run needs --url, --trace and --rate R or --burst N (or --compare RUN.json ...)")
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"bench-serve needs aiohttp: pip install 'trail[serve]' ({exc})") from None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    try:
        trace = load_trace(args.trace)
    except (ValueError, KeyError, OSError) as exc:
        raise UsageError(str(exc)) from None
    n = args.burst or args.num_requests or len(trace)
    idx, arrivals = workload(len(trace), n, args.rate, args.seed)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        model, policy = asyncio.run(server_model(args.url, headers))
    except Exception as exc:           # noqa: BLE001 - any failure to reach the server is the user's to fix
        raise UsageError(f"cannot list the models of {args.url}: {type(exc).__name__}: {exc}") from None
    model = args.model or model
    chat = args.endpoint == "chat"
    try:
        bodies = [request_body(trace[i], model=model, chat=chat, text=args.text_prompts, force=args.force_lengths,
                               max_tokens=args.max_tokens, temperature=args.temperature) for i in idx]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"bench-serve: {n} requests of {args.trace} to {args.url} ({model}), "
          f"{'burst' if args.rate is None else f'Poisson {args.rate:g} req/s'}, "
          f"{'forced lengths' if args.force_lengths else f'max_tokens {args.max_tokens}'}", flush=True)
    before = asyncio.run(scrape_metrics(args.url))
    records, makespan = asyncio.run(run(args.url, bodies, arrivals, chat=chat, api_key=api_key, timeout=args.timeout))
    after = asyncio.run(scrape_metrics(args.url))
    result = bench_report.run_result(records, makespan, before, after, label=args.label or policy or model, model=model, url=args.url,
                                     workload={"trace": str(args.trace), "n": n, "seed": args.seed, "rate": args.rate,
                                               "burst": args.burst, "force_lengths": args.force_lengths,
                                               "max_tokens": args.max_tokens, "endpoint": args.endpoint,
                                               "ids": [trace[i].id for i in idx]})
    text = bench_report.run_summary(result)
    print(text, end="")
    if args.out:
        bench_report.write_run(result, text, args.out)
        print(f"wrote {args.out}/bench_serve.json, bench_serve.summary.txt, bench_serve.png")
    return 0 if result["summary"]["failed"] == 0 else 1
