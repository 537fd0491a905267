"""The Python face of the KV swap op (csrc/kv_swap/, `trail.ops.kv_swap_blocks`): `swap_blocks`
copies blocks between a device pool and a host buffer (public: other engines use it directly),
`host_buffer` allocates the host swap space (pinned when on CUDA). `trail.kv_cache.KVCache` builds
its swap space and copies on these.
"""
from __future__ import annotations

import os
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


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (os.sysconf), None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def host_buffer(shape: Sequence[int], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A CPU tensor over memory the extension allocated once (cudaHostAlloc when `pinned`: page
    locked and mapped, exactly the size asked for, unlike `pin_memory()`), freed with the
    tensor. More than the machine's physical memory is refused before allocating (ValueError);
    an allocation that fails anyway is a MemoryError saying how much was asked for."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    total = physical_memory_bytes()
    if total is not None and nbytes > total:
        raise ValueError(f"host buffer of {nbytes / 2**30:.6g} GiB exceeds this machine's physical memory "
                         f"({total / 2**30:.1f} GiB)")
    try:
        raw = ops.kv_host_alloc(nbytes, pinned)
    except (MemoryError, RuntimeError) as exc:
        raise MemoryError(f"could not allocate a {'pinned ' if pinned else ''}host buffer of {nbytes / 2**30:.6g} "
                          f"GiB (physical memory {'unknown' if total is None else f'{total / 2**30:.1f} GiB'}): "
                          f"{type(exc).__name__} {exc}") from exc
    return raw.view(dtype).view(tuple(shape))

