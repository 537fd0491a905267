"""Our Llama-family forward (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache.

Tokens of all segments of a step are packed into one `[T]` batch; each layer writes its new K/V
into the cache blocks (`slot_mapping`), then attends over the cache (`trail_kernels.paged_attention`).
Projections are fused (qkv, gate_up); parameter names are ours, loaders map checkpoints onto them.

Layer tap (DESIGN.md layer convention): `forward(..., tap_layer=L)` also returns the output of
decoder layer L before the final norm (`[T, hidden]`), captured inside the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trail.models.config import ModelConfig
from trail.models.rope import RotaryTable
from trail_kernels.paged_attention import paged_attention, paged_decode, write_kv
from trail_kernels.rms_norm import rms_norm
from trail_kernels.rotary import rotary_qk, silu_mul


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they attend to (device tensors + host bounds)."""
    positions: torch.Tensor        # int64 [T]
    slot_mapping: torch.Tensor     # int64 [T], flat cache slot of each token (-1 = skip write)
    block_tables: torch.Tensor     # int32 [max_slots, max_blocks]
    slot_ids: torch.Tensor         # int32 [S]
    cu_seqlens_q: torch.Tensor     # int32 [S + 1]
    context_lens: torch.Tensor     # int32 [S], tokens in the slot after this step's write
    max_seqlen_q: int
    max_context_len: int
    decode_only: bool              # every segment has exactly one token


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x, rope: RotaryTable, kv_layer: torch.Tensor, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)
        q, k = rotary_qk(qkv, meta.positions, rope.cos, rope.sin, self.num_heads, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        write_kv(kv_layer, k, v, meta.slot_mapping)
        if meta.decode_only:
            o = paged_decode(q, kv_layer, meta.block_tables, meta.slot_ids, meta.context_lens,
                             meta.max_context_len, self.scale)
        else:
            o = paged_attention(q, kv_layer, meta.block_tables, meta.slot_ids, meta.cu_seqlens_q,
                                meta.context_lens, meta.max_seqlen_q, meta.max_context_len, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, residual, rope, kv_layer, meta):
        """Returns (mlp output, residual); the layer's output is their sum."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, rope, kv_layer, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope: RotaryTable | None = None

    def rope(self) -> RotaryTable:
        device = self.embed_tokens.weight.device
        if self._rope is None or self._rope.device != device:
            self._rope = RotaryTable(self.config, device)
        return self._rope

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache,
                logits_indices: torch.Tensor | None = None, tap_layer: int | None = None):
        """input_ids int64 [T] -> (logits fp32 [R, vocab] for the rows `logits_indices` (all rows
        when None), layer-`tap_layer` states [T, hidden] or None)."""
        if tap_layer is not None and not 0 <= tap_layer < self.config.num_layers:
            raise ValueError(f"tap_layer={tap_layer} out of range [0, {self.config.num_layers})")
        rope = self.rope()
        rope.ensure(meta.max_context_len)
        h, residual, tap = self.embed_tokens(input_ids), None, None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, kv_cache.layer_view(i), meta)
            if i == tap_layer:
                tap = h + residual
        if logits_indices is not None:
            h, residual = h.index_select(0, logits_indices), residual.index_select(0, logits_indices)
        h, _ = self.norm(h, residual)
        return self.lm_head(h).float(), tap
