"""The Python face of the KV swap op (csrc/kv_swap/, `trail.ops.kv_swap_blocks`): `swap_blocks`
copies blocks between a device pool and a host buffer (public: other engines use it directly),
`host_buffer` allocates the host swap space (pinned when on CUDA). `trail.kv_cache.KVCache` builds
its swap space and copies on these.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from trail._native import ops


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, pairs, stream: Any = None,
                method: str = "auto", kernel_ctas: int = 0) -> str:
    """Copies block `s` of `src` to block `d` of `dst` for each (s, d) in `pairs`; blocks are
    dim 0 of contiguous tensors. Between a CUDA tensor and a pinned host tensor the copy is
    enqueued on `stream` (a torch.cuda.Stream; default: the current one) and returns at once;
    between CPU tensors it is a synchronous memcpy. Returns the method that ran: batch (DMA, one
    cudaMemcpyBatchAsync), memcpy (DMA, one cudaMemcpyAsync per run of adjacent blocks), kernel
    (copy kernel over mapped pinned memory: uses SMs), or host."""
    if not isinstance(pairs, torch.Tensor):
        pairs = torch.tensor(list(pairs), dtype=torch.int64).reshape(-1, 2)
    handle = 0
    cuda = src.is_cuda or dst.is_cuda
    if cuda:
        if stream is None:
            stream = torch.cuda.current_stream(src.device if src.is_cuda else dst.device)
        handle = stream.cuda_stream
    return ops.kv_swap_blocks(src, dst, pairs, handle, method, kernel_ctas)


def host_buffer(shape: Sequence[int], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A CPU tensor over memory the extension allocated once (cudaHostAlloc when `pinned`: page
    locked and mapped, exactly the size asked for, unlike `pin_memory()`), freed with the
    tensor."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return ops.kv_host_alloc(nbytes, pinned).view(dtype).view(tuple(shape))

