"""Attention over the paged KV cache, and the KV write into its blocks.

Layout (DESIGN.md "KV cache"): a layer's cache is the strided view
`kv_layer [num_blocks, 2, num_kv_heads, block_size, head_dim]` (index 0 = K, 1 = V); request slot
`s` owns the blocks `block_tables[s, :]` (int32, -1 = unmapped), so token position `p` of slot `s`
lives at block `block_tables[s, p // block_size]`, offset `p % block_size`.

One step is a batch of *segments* (one per request): segment `i` has the queries
`q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`, belongs to slot `slot_ids[i]`, and after this step's KV
write its slot holds `context_lens[i]` tokens, the segment's own tokens being the last ones. Query
`j` of the segment sits at position `context_lens[i] - len_i + j` and attends causally to every
cached position up to its own: a prefill chunk over a cached prefix (chunked prefill, recompute)
and a decode token (len 1) are the same case.

    write_kv(kv_layer, k, v, slot_mapping)                       k, v: [T, kv_heads, head_dim]
    paged_attention(q, kv_layer, block_tables, slot_ids, cu_seqlens_q, context_lens,
                    max_seqlen_q, max_context_len, scale)        -> [T, heads, head_dim]
    paged_decode(q, kv_layer, block_tables, slot_ids, context_lens, max_context_len, scale)

`max_seqlen_q` / `max_context_len` are host integers (upper bounds are fine): they size the work
without reading device memory, so no call synchronises with the device. Block tables are trusted:
a mapped position whose table entry is -1 reads block 0 (the engine maps blocks before a step);
with `TRAIL_KV_DEBUG=1` the Triton kernels trip a device assertion there instead.

Implementations: the torch references below (`*_reference`, the definition of each function) and
the Triton kernels of `trail_kernels/paged_attention_triton.py`, registered in `_TRITON` and
chosen by `trail_kernels.dispatch.use_triton` (auto: Triton on CUDA tensors, reference on CPU).
A segment with `context_lens[i] == 0` (a padded CUDA-graph row) gives NaN in the reference and
zeros in the Triton kernels; no real segment has an empty context.
"""
from __future__ import annotations

import torch

from trail_kernels.dispatch import use_triton

# name -> Triton launcher with the reference's signature (filled at the end of this module).
_TRITON: dict[str, object] = {}


def _dispatch(name: str, tensors, impl: str | None):
    fn = _TRITON.get(name)
    if fn is None:
        if impl == "triton":
            raise NotImplementedError(f"{name}: no Triton implementation yet (only the torch reference)")
        use_triton(*tensors, impl=impl)  # still validates `impl` / TRAIL_KERNELS
        return None
    return fn if use_triton(*tensors, impl=impl) else None


def _check_kv_layer(kv_layer: torch.Tensor):
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"kv_layer must be [num_blocks, 2, kv_heads, block_size, head_dim], "
                         f"got {tuple(kv_layer.shape)}")


# ---------------------------------------------------------------------------------------------
# KV write
# ---------------------------------------------------------------------------------------------
def write_kv_reference(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """kv_layer[slot // bs, 0/1, :, slot % bs, :] = k/v for every token whose slot is >= 0."""
    block_size = kv_layer.shape[3]
    slots = slot_mapping.long()
    valid = slots >= 0
    # Skipping tokens without a boolean filter (which would sync with the device): every skipped
    # token rewrites the value that the first valid token writes, to that token's slot, so the
    # duplicate writes agree; with no valid token at all, they rewrite slot 0's current content.
    # one-element index tensors (a 0-dim tensor index would be read on the host)
    first = torch.argmax(valid.to(torch.int32)).view(1)
    any_valid = valid[first]
    anchor = torch.where(any_valid, slots[first], torch.zeros_like(slots[first]))
    slots = torch.where(valid, slots, anchor)
    blocks, offsets = slots // block_size, slots % block_size
    for index, new in ((0, k), (1, v)):
        current = kv_layer[anchor // block_size, index, :, anchor % block_size]
        fill = torch.where(any_valid, new[first].to(kv_layer.dtype), current)
        new = torch.where(valid[:, None, None], new.to(kv_layer.dtype), fill)
        kv_layer[blocks, index, :, offsets] = new


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             impl: str | None = None) -> None:
    _check_kv_layer(kv_layer)
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != (kv_layer.shape[2], kv_layer.shape[4]):
        raise ValueError(f"write_kv: k {tuple(k.shape)} / v {tuple(v.shape)} must be "
                         f"[T, {kv_layer.shape[2]}, {kv_layer.shape[4]}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"write_kv: slot_mapping {tuple(slot_mapping.shape)} != [{k.shape[0]}]")
    if k.shape[0] == 0:
        return
    fn = _dispatch("write_kv", (kv_layer, k, v, slot_mapping), impl)
    (fn or write_kv_reference)(kv_layer, k, v, slot_mapping)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
def _gather_context(kv_layer, block_tables, slot_ids, max_context_len):
    """[S, 2, kv_heads, n_blocks * block_size, head_dim]: each segment's cache, block by block."""
    block_size = kv_layer.shape[3]
    n_blocks = -(-max_context_len // block_size)
    if n_blocks > block_tables.shape[1]:
        raise ValueError(f"max_context_len={max_context_len} needs {n_blocks} blocks, block tables "
                         f"have {block_tables.shape[1]}")
    tables = block_tables.index_select(0, slot_ids.long())[:, :n_blocks].long().clamp_min(0)
    kv = kv_layer[tables]                                 # [S, n_blocks, 2, kvh, bs, hd]
    s, nb, _, kvh, bs, hd = kv.shape
    return kv.permute(0, 2, 3, 1, 4, 5).reshape(s, 2, kvh, nb * bs, hd)


def paged_attention_reference(q, kv_layer, block_tables, slot_ids, cu_seqlens_q, context_lens,
                              max_seqlen_q: int, max_context_len: int, scale: float) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_segments = slot_ids.shape[0]
    kv_heads = kv_layer.shape[2]
    group = num_heads // kv_heads
    device = q.device
    cu = cu_seqlens_q.long()
    lens = cu[1:] - cu[:-1]
    ctx = context_lens.long()
    seg = torch.repeat_interleave(torch.arange(num_segments, device=device), lens,
                                  output_size=num_tokens)
    row = torch.arange(num_tokens, device=device) - cu[seg]

    kv = _gather_context(kv_layer, block_tables, slot_ids, max_context_len).float()
    n_keys = kv.shape[3]
    key_pos = torch.arange(n_keys, device=device)
    key_valid = key_pos[None, :] < ctx[:, None]                                   # [S, n_keys]
    # positions past a segment's context hold stale or uninitialised memory (maybe NaN): zero them
    kv = kv.masked_fill(~key_valid[:, None, None, :, None], 0.0)
    k, v = kv[:, 0], kv[:, 1]                                                     # [S, kvh, n, hd]

    q_pad = q.new_zeros(num_segments, max_seqlen_q, num_heads, head_dim, dtype=torch.float32)
    q_pad[seg, row] = q.float()
    q_pad = q_pad.view(num_segments, max_seqlen_q, kv_heads, group, head_dim)
    q_pad = q_pad.permute(0, 2, 3, 1, 4).reshape(num_segments, kv_heads, group * max_seqlen_q, head_dim)

    q_pos = (ctx - lens)[:, None] + torch.arange(max_seqlen_q, device=device)[None, :]  # [S, mq]
    allowed = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]  # [S, mq, n]
    allowed = allowed[:, None].expand(-1, group, -1, -1).reshape(num_segments, 1, group * max_seqlen_q, n_keys)

    scores = torch.matmul(q_pad, k.transpose(-1, -2)) * scale
    # padded query rows (past a segment's length) still see position 0, so no row is all -inf
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)                   # [S, kvh, g*mq, hd]
    out = out.view(num_segments, kv_heads, group, max_seqlen_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(num_segments, max_seqlen_q, num_heads, head_dim)
    return out[seg, row].to(q.dtype)


def _check_attention(q, kv_layer, block_tables, slot_ids, context_lens):
    _check_kv_layer(kv_layer)
    if q.dim() != 3 or q.shape[2] != kv_layer.shape[4] or q.shape[1] % kv_layer.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} must be [T, heads, {kv_layer.shape[4]}] with heads a "
                         f"multiple of kv_heads={kv_layer.shape[2]}")
    if block_tables.dtype != torch.int32 or slot_ids.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables, slot_ids and context_lens must be int32")
    if context_lens.shape != slot_ids.shape:
        raise ValueError(f"context_lens {tuple(context_lens.shape)} != slot_ids {tuple(slot_ids.shape)}")


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                    slot_ids: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                    max_seqlen_q: int, max_context_len: int, scale: float,
                    impl: str | None = None) -> torch.Tensor:
    """Causal attention of varlen query segments over their slots' cached context."""
    _check_attention(q, kv_layer, block_tables, slot_ids, context_lens)
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape != (slot_ids.shape[0] + 1,):
        raise ValueError(f"cu_seqlens_q must be int32 [{slot_ids.shape[0] + 1}], "
                         f"got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    fn = _dispatch("paged_attention", (q, kv_layer, block_tables), impl)
    return (fn or paged_attention_reference)(q, kv_layer, block_tables, slot_ids, cu_seqlens_q,
                                             context_lens, max_seqlen_q, max_context_len, scale)


def paged_decode_reference(q, kv_layer, block_tables, slot_ids, context_lens,
                           max_context_len: int, scale: float) -> torch.Tensor:
    cu = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return paged_attention_reference(q, kv_layer, block_tables, slot_ids, cu, context_lens, 1,
                                     max_context_len, scale)


def paged_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                 slot_ids: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                 scale: float, impl: str | None = None) -> torch.Tensor:
    """One query per segment (`q [S, heads, head_dim]`), the newest position of its slot."""
    _check_attention(q, kv_layer, block_tables, slot_ids, context_lens)
    if q.shape[0] != slot_ids.shape[0]:
        raise ValueError(f"paged_decode: {q.shape[0]} queries for {slot_ids.shape[0]} segments")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    fn = _dispatch("paged_decode", (q, kv_layer, block_tables), impl)
    return (fn or paged_decode_reference)(q, kv_layer, block_tables, slot_ids, context_lens,
                                          max_context_len, scale)


def _register_triton():
    from trail_kernels.dispatch import triton_available
    if not triton_available():
        return
    from trail_kernels import paged_attention_triton as kernels
    _TRITON.update(write_kv=kernels.write_kv_triton, paged_attention=kernels.paged_attention_triton,
                   paged_decode=kernels.paged_decode_triton)


_register_triton()
