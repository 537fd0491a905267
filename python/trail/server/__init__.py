"""trail over HTTP: an OpenAI-compatible server (`trail serve`) in front of `trail.AsyncEngine`.

Data flow (docs/SERVER.md):

    HTTP client --JSON--> app (aiohttp; protocol: OpenAI fields -> prompt ids + SamplingParams)
        --> AsyncEngine (this process: tokenizer, one asyncio queue per request, backpressure)
        --pipe--> engine core process (core: LLMEngine's step loop; stream deltas merged per step)
        --pipe--> AsyncEngine --> app (SSE chunks or one JSON response) --> HTTP client

Modules: `app` (routes, streaming, auth, shutdown), `protocol` (request validation, response
bodies), `core` (the engine core process), `metrics` (Prometheus text, windowed telemetry),
`random_parts` (the byte tokenizer and random probe a `random:*` model is served with), `cli`
(the `trail serve` subcommand), `process` (`trail serve` as a child process, for benchmarks and
tests). Importing this package imports nothing heavy (no torch, no
aiohttp): the CLI's parser is built from it.
"""
