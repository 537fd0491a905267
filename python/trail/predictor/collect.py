"""`trail collect`: run prompts through the model and write a trace (resumable).

Prompts are chat-templated, those longer than `max_prompt_tokens` are skipped (logged), and the
rest go through the model: with transformers in static batches of similar prompt length, with our
engine in the given order (continuous batching; so a run stopped at a `deadline` keeps a random
subset of the prompts, not the shortest ones). Each finished batch is appended to
the trace and flushed, so a killed run resumes where it stopped: prompts whose id is already in
the trace are not run again, and the decoding settings must match the trace's header.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from tqdm.auto import tqdm

from trail.predictor import hf_backend
from trail.predictor.prompts import Prompt
from trail.predictor.trace import Trace, TraceRecord, TraceWriter, read_trace

logger = logging.getLogger(__name__)


def collect_settings(lm: hf_backend.LoadedModel, max_new_tokens: int, repetition_penalty: float,
                     temperature: float, top_p: float, seed: int, max_prompt_tokens: int,
                     backend: str = "hf") -> dict:
    return {
        "model": lm.model_id,
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "repetition_penalty": float(repetition_penalty),
        "chat_template": "model",
        "seed": int(seed),
        "eos_token_ids": lm.eos_token_ids(),
        "max_prompt_tokens": int(max_prompt_tokens),
        "backend": "trail.model_runner" if backend == "runner" else "transformers.generate",
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": lm.device.type,
    }


def collect(prompts: Sequence[Prompt], trace_path: str | os.PathLike,
            lm: hf_backend.LoadedModel | None = None, *, max_new_tokens: int = 512,
            repetition_penalty: float = 1.1, temperature: float = 0.0, top_p: float = 1.0,
            seed: int = 0, batch_size: int = 256, max_prompt_tokens: int = 1024,
            progress: bool = True, runner=None, deadline: float | None = None) -> Trace:
    """`runner`: a runner_backend.RunnerGenerator (our forward, continuous batching with
    `batch_size` ignored: its slots bound the batch); None: transformers `generate` in static
    batches of `batch_size` similar-length prompts. `deadline` (time.monotonic()): stop taking
    results once it passes (requests in flight then are dropped; the trace stays resumable)."""
    import time

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lm = lm or hf_backend.load()
    settings = collect_settings(lm, max_new_tokens, repetition_penalty, temperature, top_p, seed,
                                max_prompt_tokens, "runner" if runner is not None else "hf")
    with TraceWriter(trace_path, settings) as writer:
        todo, too_long = [], 0
        for p in prompts:
            if p.id in writer.done:
                continue
            ids = hf_backend.chat_ids(lm.tokenizer, p.text)
            if len(ids) > max_prompt_tokens:
                too_long += 1
                continue
            todo.append((p, ids))
        if too_long:
            logger.info("skipped %d prompts longer than %d tokens", too_long, max_prompt_tokens)
        logger.info("collect: %d to run, %d already in %s", len(todo), len(writer.done), trace_path)
        if runner is None:
            todo.sort(key=lambda t: len(t[1]))
        bar = tqdm(total=len(todo), desc="collect", unit="req", disable=not progress)
        if runner is not None:
            done = 0
            for i, out_ids, finish in runner.generate(
                    [ids for _, ids in todo], max_new_tokens, lm.eos_token_ids(),
                    repetition_penalty=repetition_penalty, temperature=temperature, top_p=top_p,
                    seed=seed, request_keys=[p.id for p, _ in todo]):
                p, ids = todo[i]
                writer.write(TraceRecord(p.id, p.source, p.text, ids, out_ids, finish))
                done += 1
                if done % 64 == 0:
                    writer.flush()
                bar.update(1)
                if deadline is not None and time.monotonic() > deadline:
                    logger.warning("collect: deadline reached after %d of %d requests", done, len(todo))
                    break
            todo = []
        for start in range(0, len(todo), batch_size):
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("collect: deadline reached after %d of %d requests", start, len(todo))
                break
            chunk = todo[start: start + batch_size]
            outs = hf_backend.generate(lm, [ids for _, ids in chunk], max_new_tokens,
                                       repetition_penalty, temperature, top_p, seed)
            for (p, ids), (out_ids, finish) in zip(chunk, outs):
                writer.write(TraceRecord(p.id, p.source, p.text, ids, out_ids, finish))
            writer.flush()
            bar.update(len(chunk))
        bar.close()
    return read_trace(trace_path)


def summarize(trace: Trace) -> dict:
    """Length statistics of a trace (what models.md tabulates)."""
    import numpy as np

    lens = np.array([r.output_len for r in trace.records])
    if lens.size == 0:
        return {"requests": 0}
    eos = np.array([not r.hit_cap for r in trace.records])
    out = {
        "requests": int(lens.size),
        "hit_cap_fraction": float(1 - eos.mean()),
        "mean_len": float(lens.mean()),
        "p10_p50_p90": [float(x) for x in np.percentile(lens, [10, 50, 90])],
        "sources": {s: sum(r.source == s for r in trace.records) for s in sorted({r.source for r in trace.records})},
    }
    if eos.any():
        out["eos_p10_p50_p90"] = [float(x) for x in np.percentile(lens[eos], [10, 50, 90])]
    return out
