"""Our own forward (`trail.model_runner.ModelRunner` over a paged KV cache) as the feature
backend for one layer: teacher-forced sequences go in as prefill segments, the runner's layer
tap comes out. Used by `embed_dense` when `backend="runner"` (the probe reads exactly what the
engine's tap will hand it); transformers (hf_backend) stays the oracle and the all-layer path.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


class RunnerTap:
    def __init__(self, model_dir: str | os.PathLike, layer: int, device: str | torch.device,
                 dtype: torch.dtype, max_slots: int = 64, max_len: int = 2048):
        from trail.kv_cache import KVCache, KVCacheSpec
        from trail.model_runner import ModelRunner
        from trail.models.loader import load_model

        self.model = load_model(model_dir, device, dtype)
        cfg = self.model.config
        self.layer, self.max_slots, self.max_len = layer, max_slots, max_len
        self.block_size = 16
        mb = math.ceil(max_len / self.block_size)
        cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype,
                                    block_size=self.block_size), max_slots * mb, max_slots, mb, device)
        cache.block_tables.copy_(torch.arange(max_slots * mb, dtype=torch.int32).view(max_slots, mb))
        self.runner = ModelRunner(self.model, cache, tap_layer=layer)
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
