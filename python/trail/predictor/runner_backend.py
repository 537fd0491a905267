"""Our own forward (`trail.model_runner.ModelRunner` over a paged KV cache) as a backend of the
predictor pipeline:
  RunnerGenerator  `trail collect --backend runner`: continuous batching (a finished request's
                   slot takes the next prompt at once), per-request sampling with repetition
                   penalty as transformers orders it, one host sync per step (the tokens);
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
        from trail.model_runner import Segment

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
    from trail.kv_cache import KVCache, KVCacheSpec

    cfg = model.config
    mb = math.ceil(max_len / 16)
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, block_size=16),
                    max_slots * mb, max_slots, mb, device)
    cache.assign_tables(torch.arange(max_slots * mb).view(max_slots, mb))
    return cache


class RunnerGenerator:
    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device, dtype: torch.dtype,
                 max_slots: int = 256, max_len: int = 1536, prefill_tokens: int = 32768):
        from trail.model_runner import ModelRunner
        from trail.models.loader import load_model

        self.model = load_model(model_dir, device, dtype)
        self.max_slots, self.max_len, self.prefill_tokens = max_slots, max_len, prefill_tokens
        self.runner = ModelRunner(self.model, _static_cache(self.model, max_slots, max_len, device, dtype))
        logger.info("runner generator: %d slots x %d tokens", max_slots, max_len)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int], *,
                 repetition_penalty: float = 1.0, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, request_keys: Sequence[str] | None = None) -> Iterator[tuple[int, list[int], str]]:
        """Yields (prompt index, output ids up to and including EOS, 'eos' | 'length') as requests
        finish. A sampled request's seed comes from `seed` and its key, so batching does not
        change its draws."""
        from trail.model_runner import DECODE, PREFILL, Segment
        from trail.sampling import SampleParams

        for i, p in enumerate(prompts):
            if len(p) + max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(p)} + {max_new_tokens} tokens exceed the generator's "
                                 f"max_len={self.max_len}")
        keys = request_keys or [str(i) for i in range(len(prompts))]

        def params_for(i):
            s = None if temperature <= 0 else (seed * 1_000_003 + zlib.crc32(keys[i].encode())) % (1 << 62)
            return SampleParams(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty, seed=s)

        eos = set(int(e) for e in eos_ids)
        pending = deque(range(len(prompts)))
        free = list(range(self.max_slots - 1, -1, -1))
        active: dict[int, tuple[int, list[int], SampleParams]] = {}
        while pending or active:
            segs, owners = [], []
            for slot, (i, out, prm) in active.items():
                segs.append(Segment(slot, [out[-1]], len(prompts[i]) + len(out) - 1, DECODE, params=prm))
                owners.append(slot)
            budget = self.prefill_tokens
            while pending and free and (len(prompts[pending[0]]) <= budget or budget == self.prefill_tokens):
                i = pending.popleft()
                slot = free.pop()
                budget -= len(prompts[i])
                active[slot] = (i, [], params_for(i))
                segs.append(Segment(slot, list(prompts[i]), 0, PREFILL, params=active[slot][2]))
                owners.append(slot)
            with torch.inference_mode():
                toks = self.runner.step(segs).next_tokens.tolist()
            for slot, tok in zip(owners, toks):
                i, out, _ = active[slot]
                out.append(int(tok))
                if tok in eos or len(out) >= max_new_tokens:
                    del active[slot]
                    free.append(slot)
                    yield i, out, ("eos" if tok in eos else "length")
