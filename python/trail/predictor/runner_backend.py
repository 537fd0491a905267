"""Our own forward (`trail.model_runner.ModelRunner` over a paged KV cache) as a backend of the
predictor pipeline:
  RunnerGenerator  `trail collect --backend runner`: generation on trail's engine (passed in),
                   continuous batching, per-request sampling with repetition penalty as
                   transformers orders it, one host sync per step (the tokens);
  RunnerTap        `trail embed --backend runner`: teacher-forced sequences as prefill segments,
                   the runner's layer tap out (what the engine's probe will read).
transformers (hf_backend) stays the fallback, the oracle, and the all-layer feature path.
"""
from __future__ import annotations

import logging
import math
import os
import zlib
from collections import deque
from typing import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)


class RunnerTap:
    def __init__(self, model_dir: str | os.PathLike, layer: int, device: str | torch.device,
                 dtype: torch.dtype, max_slots: int = 64, max_len: int = 2048):
        from trail.model_runner import ModelRunner
        from trail.models.loader import load_model

        self.model = load_model(model_dir, device, dtype)
        self.layer, self.max_slots, self.max_len = layer, max_slots, max_len
        self.runner = ModelRunner(self.model, _static_cache(self.model, max_slots, max_len, device, dtype),
                                  tap_layer=layer)
        logger.info("runner tap on layer %d (%d slots x %d tokens)", layer, max_slots, max_len)

    def padded_states(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Layer states [B, T_max, d] (zeros past each sequence's end)."""
        from trail.segments import Segment

        if any(len(s) > self.max_len for s in seqs):
            raise ValueError(f"a sequence is longer than the runner tap's max_len={self.max_len}")
        width = max(len(s) for s in seqs)
        out = None
        for start in range(0, len(seqs), self.max_slots):
            chunk = seqs[start: start + self.max_slots]
            with torch.inference_mode():
                tap = self.runner.step([Segment(i, list(s), 0) for i, s in enumerate(chunk)]).tap
            if out is None:
                out = torch.zeros(len(seqs), width, tap.states.shape[1], dtype=tap.states.dtype,
                                  device=tap.states.device)
            cu = tap.cu_seqlens.tolist()
            for i in range(len(chunk)):
                out[start + i, : cu[i + 1] - cu[i]] = tap.states[cu[i]: cu[i + 1]]
        return out


def _static_cache(model, max_slots: int, max_len: int, device, dtype):
    """A cache whose slot i owns a fixed run of blocks (no allocator: every slot holds max_len)."""
    from trail.kv_cache import KVCache
    from trail.kv_cache_spec import KVCacheSpec

    cfg = model.config
    mb = math.ceil(max_len / 16)
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, block_size=16),
                    max_slots * mb, max_slots, mb, device)
    cache.assign_tables(torch.arange(max_slots * mb).view(max_slots, mb))
    return cache


class RunnerGenerator:
    """Collection on trail's own engine, passed in (the predictor imports no engine): any object
    with `add_request(prompt_ids, SamplingParams, request_id=...)`, `step()` and
    `has_unfinished()`, e.g. `trail.engine.LLMEngine` under the fcfs policy. The engine does the
    continuous batching, the sampling and the one sync per step."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int] = (), *,
                 repetition_penalty: float = 1.0, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, request_keys: Sequence[str] | None = None) -> Iterator[tuple[int, list[int], str]]:
        """Yields (prompt index, output ids up to and including the stop token, 'eos' | 'length')
        as requests finish. A sampled request's seed comes from `seed` and its key, so batching
        does not change its draws. Prompts are queued as the engine's slots allow."""
        from trail.request import FinishReason, SamplingParams

        keys = request_keys or [str(i) for i in range(len(prompts))]

        def params_for(i):
            s = None if temperature <= 0 else (seed * 1_000_003 + zlib.crc32(keys[i].encode())) % (1 << 62)
            return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=s, stop_token_ids=tuple(eos_ids))

        pending = deque(range(len(prompts)))
        engine, capacity = self.engine, getattr(self.engine.config, "max_slots", 256)
        while pending or engine.has_unfinished():
            while pending and engine.num_unfinished < capacity:
                i = pending.popleft()
                engine.add_request(prompts[i], params_for(i), request_id=i)
            for out in engine.step():
                if out.finished:
                    reason = "eos" if out.finish_reason == FinishReason.STOP else "length"
                    yield out.request_id, list(out.token_ids), reason


def collect_engine(model_source, lm, max_batch: int, max_prompt_tokens: int, max_new_tokens: int,
                   kv_headroom: float = 1.25) -> RunnerGenerator:
    """A RunnerGenerator over a fresh fcfs `trail.engine.LLMEngine` sized for collection: at most
    `max_batch` running requests, a KV pool of `kv_headroom` x what they can hold at full length
    (bounded, so the rest of the device stays free for embedding), 1,024 queued slots."""
    from trail.engine import LLMEngine
    from trail.engine_config import EngineConfig
    from trail.models.loader import load_model

    max_len = max_prompt_tokens + max_new_tokens
    blocks = int(max_batch * -(-max_len // 16) * kv_headroom) + 64
    config = EngineConfig(policy="fcfs", max_batch=max_batch, max_slots=max(max_batch, 1024), max_model_len=max_len,
                          max_tokens_per_step=max(8192, max_batch), num_gpu_blocks=blocks, num_host_blocks=64)
    engine = LLMEngine(load_model(model_source, lm.device, lm.dtype), lm.tokenizer, config,
                       eos_token_ids=lm.eos_token_ids())
    logger.info("collection engine: max_batch %d, %d KV blocks, max_model_len %d", max_batch, blocks, max_len)
    return RunnerGenerator(engine)
