"""Paged KV cache: the block-major pool on the device, block tables, and the swap space in pinned
host memory. Knows no model: sizes come from a `KVCacheSpec` (trail.kv_cache_spec); block ids
from two `BlockAllocator`s (trail.block_allocator); copies through `trail.kv_swap`.

Layout (frozen, DESIGN.md "KV cache"): one pool tensor per device,
`[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]`, so one block of all layers is
one contiguous range; `layer_view(l)` is the strided `[num_blocks, 2, num_kv_heads, block_size,
head_dim]` view that kernels read (never `.contiguous()` it: that copies the pool).
Block tables: `int32 [max_slots, max_blocks_per_request]`, -1 where no block is mapped.

What the scheduler decides, this module carries out, all on host state (no device sync):
`allocate` / `allocate_many` (grow slots for the next step, all or nothing), `free` (finished, or
dropped to recompute later),
`swap_out` (GPU -> host), `swap_in` (host -> GPU), `discard` (forget a swapped request). Host-side
block tables are the truth; `commit_block_tables()` pushes the changed entries to
`block_tables` on the current stream, once per step before the forward.

Ordering (what corrupts data when wrong):
- A swap-out copy waits for `after` (default: everything already enqueued on the current stream,
  which covers the victims' last KV write). A swap-in waits the same way, so it cannot overwrite
  blocks that earlier compute work still reads.
- GPU blocks freed by a swap-out, and host blocks freed by a swap-in, are *pending*: they return to
  their free list only once the copy's event has completed (`reclaim()`, a query, no wait), or,
  with `reclaim(stream=s)`, at once, after making `s` wait for the copy on the GPU (valid when all
  later writes to those blocks are on `s`).
- Blocks freed by `free` are reusable at once: later work on the compute stream is
  ordered after the reads, and swap-ins wait for the compute stream (above). Except a slot whose
  swap-in copy has not completed yet: its blocks are pending on that copy.
- A swapped-in request's blocks must not be read before `wait(event)` on the reading stream.

Copies run through `trail.ops.kv_swap_blocks` (csrc/kv_swap/) on a dedicated copy stream.
Not thread-safe: one engine thread owns a KVCache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from trail._native import ops
from trail.block_allocator import COMPLETED, BlockAllocator, Event, LedgerCounts
from trail.kv_cache_spec import KVCacheSpec
from trail.kv_swap import host_buffer, physical_memory_bytes

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class SwappedKV:
    """A request's KV in the host swap space: `host_blocks[i]` holds its i-th block. Written by
    a copy that completes with `event`; consumed by `swap_in` or `discard`."""
    host_blocks: list[int]
    event: Event
    released: bool = field(default=False, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.host_blocks)


class KVCache(LedgerCounts):
    """The pool, the block tables, the GPU block allocator, and the host swap space."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, max_slots: int,
                 max_blocks_per_request: int, device: torch.device | str = "cpu", *,
                 num_host_blocks: int = 0, swap_method: str = "auto",
                 copy_stream: Any = None):
        if num_blocks <= 0 or max_slots <= 0 or max_blocks_per_request <= 0:
            raise ValueError(
                f"KVCache needs positive sizes, got num_blocks={num_blocks}, max_slots={max_slots}, "
                f"max_blocks_per_request={max_blocks_per_request}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        total = physical_memory_bytes()      # the swap space is checked before anything is allocated
        if total is not None and num_host_blocks * spec.bytes_per_block > total:
            raise ValueError(
                f"KV swap space of {num_host_blocks} host blocks x {spec.bytes_per_block} bytes = "
                f"{num_host_blocks * spec.bytes_per_block / 2**30:.6g} GiB exceeds this machine's physical memory "
                f"({total / 2**30:.1f} GiB): EngineConfig.swap_space_gib (or num_host_blocks) must be in "
                f"[0, {total / 2**30:.1f}] GiB, and leave room for everything else")
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.pool = torch.empty((num_blocks, *spec.block_shape), dtype=spec.dtype, device=self.device)
        self.block_tables = torch.full((max_slots, max_blocks_per_request), -1, dtype=torch.int32,
                                       device=self.device)
        self.max_slots, self.max_blocks_per_request = max_slots, max_blocks_per_request

        methods = ["auto", *ops.kv_swap_methods()]
        if swap_method not in methods:
            raise ValueError(f"swap_method {swap_method!r} is not one of {methods} in this build")
        self.swap_method = swap_method
        self.gpu_allocator = BlockAllocator(num_blocks, "gpu")
        self.host_allocator = BlockAllocator(num_host_blocks, "host")
        self.num_host_blocks = num_host_blocks
        # [num_host_blocks, *block_shape], extension-owned (cudaHostAlloc on CUDA devices).
        self.host_pool = host_buffer((num_host_blocks, *spec.block_shape), spec.dtype,
                                     pinned=self.device.type == "cuda")
        self.copy_stream = copy_stream
        if self.device.type == "cuda" and copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device=self.device)

        self._tables: list[list[int]] = [[] for _ in range(max_slots)]
        self._num_mapped = np.zeros(max_slots, dtype=np.int64)   # len(self._tables[s]), for numpy checks
        self._committed_len = [0] * max_slots    # entries [0, len) valid in block_tables
        self._dirty_from: dict[int, int] = {}     # slot -> first entry changed since commit
        self._swap_in_events: dict[int, Event] = {}  # slot -> its swap-in copy (may be running)
        self._warned_method = False

    @classmethod
    def from_memory_fraction(cls, spec: KVCacheSpec, max_slots: int, max_blocks_per_request: int,
                             device: torch.device | str = "cuda", gpu_memory_utilization: float = 0.9,
                             swap_space_bytes: int = 0, **kwargs) -> "KVCache":
        """Sizes the pool like vLLM's gpu_memory_utilization: the fraction of the GPU's memory
        this process may use in total, minus what it uses now (weights already loaded), and the
        host swap space as `swap_space_bytes // bytes_per_block` blocks."""
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError("from_memory_fraction needs a CUDA device; give num_blocks on CPU")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * gpu_memory_utilization) - (total - free) - max_slots * max_blocks_per_request * 4
        num_blocks = budget // spec.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"no room for KV blocks: {budget / 2**30:.2f} GiB left at "
                             f"gpu_memory_utilization={gpu_memory_utilization}, a block is "
                             f"{spec.bytes_per_block} bytes")
        logger.info("KV cache: %d GPU blocks (%.2f GiB), %d host blocks", num_blocks,
                    num_blocks * spec.bytes_per_block / 2**30, swap_space_bytes // spec.bytes_per_block)
        return cls(spec, int(num_blocks), max_slots, max_blocks_per_request, device,
                   num_host_blocks=int(swap_space_bytes // spec.bytes_per_block), **kwargs)

    # ---- frozen interface ----
    @property
    def block_size(self) -> int:
        return self.spec.block_size

    def layer_view(self, layer: int) -> torch.Tensor:
        """`[num_blocks, 2, num_kv_heads, block_size, head_dim]`, a strided view into the pool."""
        if not 0 <= layer < self.spec.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.spec.num_layers})")
        return self.pool[:, layer]

    # ---- queries (free counts, mapped_blocks: LedgerCounts) ----

    def blocks_of(self, slot: int) -> list[int]:
        self._check_slot(slot)
        return list(self._tables[slot])

    def blocks_needed(self, demands: Mapping[int, int]) -> int:
        """New GPU blocks `allocate(demands)` would take."""
        return sum(self._growth(demands).values())

    def can_allocate(self, demands: Mapping[int, int]) -> bool:
        need = self.blocks_needed(demands)
        if need > self.gpu_allocator.num_free:
            self.gpu_allocator.reclaim()
        return need <= self.gpu_allocator.num_free

    # ---- operations ----
    def allocate(self, demands: Mapping[int, int]) -> dict[int, list[int]]:
        """Grows each slot so its blocks hold `demands[slot]` tokens, for all slots or none
        (KVCacheOutOfBlocks leaves everything unchanged). Returns the new blocks per slot."""
        growth = self._growth(demands)
        blocks = self.gpu_allocator.allocate(sum(growth.values()))
        out, i = {}, 0
        for slot, extra in growth.items():
            new = blocks[i:i + extra]
            i += extra
            self._extend(slot, new)
            out[slot] = new
        return out

    def allocate_many(self, slots: np.ndarray, num_tokens: np.ndarray) -> int:
        """`grow_to` for token counts (distinct int slots): each slot holds at least enough blocks
        for its tokens. All or nothing; returns the number of new blocks."""
        return self.grow_to(slots, -(-np.asarray(num_tokens, dtype=np.int64) // self.block_size))

    def grow_to(self, slots: np.ndarray, num_blocks: np.ndarray) -> int:
        """Each slot (distinct ints) maps at least `num_blocks` blocks afterwards (the plan's
        BLOCKS column): only the slots that grow are touched in Python. All or nothing; returns
        the number of new blocks."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size and (slots.min() < 0 or slots.max() >= self.max_slots):
            raise IndexError(f"slots out of range [0, {self.max_slots}): {slots.tolist()}")
        want = np.asarray(num_blocks, dtype=np.int64)
        if want.size and want.max() > self.max_blocks_per_request:
            raise ValueError(f"a slot needs {int(want.max())} blocks, more than "
                             f"max_blocks_per_request={self.max_blocks_per_request}")
        extra = want - self._num_mapped[slots]
        grow = np.flatnonzero(extra > 0)
        total = int(extra[grow].sum())
        blocks = self.gpu_allocator.allocate(total)
        i = 0
        for j in grow.tolist():
            n = int(extra[j])
            self._extend(int(slots[j]), blocks[i:i + n])
            i += n
        return total

    def assign_tables(self, tables: torch.Tensor) -> None:
        """A static layout: slot i maps the blocks of row i of `tables` (int [max_slots, w],
        -1 = none), taken from the allocator (they must be free; every slot must be empty).
        For fixed-size uses (teacher forcing, benchmarks) that never allocate per step."""
        rows = [[int(b) for b in row if b >= 0] for row in torch.as_tensor(tables).tolist()]
        if len(rows) != self.max_slots:
            raise ValueError(f"assign_tables: {len(rows)} rows, expected max_slots={self.max_slots}")
        if any(self._tables):
            raise ValueError("assign_tables: some slots already hold blocks")
        flat = [b for row in rows for b in row]
        if any(len(row) > self.max_blocks_per_request for row in rows):
            raise ValueError(f"assign_tables: a row maps more than {self.max_blocks_per_request} blocks")
        self.gpu_allocator.claim(flat)
        for slot, row in enumerate(rows):
            if row:
                self._extend(slot, row)

    def free(self, slot: int) -> None:
        """Releases the slot's blocks (finished request, or drop for recompute): reusable now,
        or, if the slot's swap-in copy may still be writing them, once that copy completes."""
        self._check_slot(slot)
        event = self._swap_in_events.pop(slot, None)
        if event is not None and event.query():
            event = None
        if self._tables[slot]:
            self.gpu_allocator.free(self._tables[slot], event)
            self._set_table(slot, [])

    def share_prefix(self, src_slot: int, dst_slot: int, num_blocks: int) -> None:
        """Maps the first `num_blocks` blocks of `src_slot` into the empty `dst_slot` (reference
        counted; writing into a shared block is the caller's business)."""
        self._check_slot(src_slot)
        self._check_slot(dst_slot)
        if self._tables[dst_slot]:
            raise ValueError(f"slot {dst_slot} already holds blocks")
        if not 0 <= num_blocks <= len(self._tables[src_slot]):
            raise ValueError(f"slot {src_slot} holds {len(self._tables[src_slot])} blocks, "
                             f"cannot share {num_blocks}")
        shared = self._tables[src_slot][:num_blocks]
        self.gpu_allocator.incref(shared)
        self._set_table(dst_slot, list(shared))
        if src_slot in self._swap_in_events:
            self._swap_in_events[dst_slot] = self._swap_in_events[src_slot]

    def swap_out(self, slots: Sequence[int], after: Event | None = None) -> list[SwappedKV]:
        """Copies the slots' blocks to host blocks in one batched copy and empties the slots.
        The copy starts after `after` (default: all work enqueued so far on the current stream).
        The GPU blocks are pending until the copy completes. Raises KVCacheOutOfBlocks('host')
        with nothing changed if the swap space is short."""
        slots = self._distinct_slots(slots)
        lists = [self._tables[s] for s in slots]
        host = self.host_allocator.allocate(sum(len(b) for b in lists))
        per_slot, pairs, i = [], [], 0
        for blocks in lists:
            hb = host[i:i + len(blocks)]
            i += len(blocks)
            per_slot.append(hb)
            pairs.extend(zip(blocks, hb))
        try:
            event = self._enqueue_copy(self.pool, self.host_pool, pairs, after)
        except BaseException:
            self.host_allocator.free(host)
            raise
        handles = []
        for slot, blocks, hb in zip(slots, lists, per_slot):
            if blocks:
                self.gpu_allocator.free(blocks, event)
            # A swap-in into this slot may still run: the swap-out is after it on the copy stream.
            self._swap_in_events.pop(slot, None)
            self._set_table(slot, [])
            handles.append(SwappedKV(hb, event))
        return handles

    def swap_in(self, items: Sequence[tuple[int, SwappedKV]], after: Event | None = None) -> Event:
        """Copies each swapped request back into fresh GPU blocks of its (empty) slot, one batched
        copy, after `after` (default: all work enqueued so far on the current stream). Returns
        the copy's event: `wait(event)` before the first read of these blocks. The host blocks
        are pending until the copy completes. Raises KVCacheOutOfBlocks('gpu') with nothing
        changed if the GPU is short."""
        items = list(items)
        slots = self._distinct_slots([slot for slot, _ in items])
        for slot, handle in items:
            if handle.released:
                raise ValueError("this SwappedKV was already swapped in or discarded")
            if self._tables[slot]:
                raise ValueError(f"slot {slot} already holds {len(self._tables[slot])} blocks")
        if len({id(h) for _, h in items}) != len(items):
            raise ValueError("the same SwappedKV appears twice")
        gpu = self.gpu_allocator.allocate(sum(h.num_blocks for _, h in items))
        pairs, per_slot, i = [], [], 0
        for _, handle in items:
            gb = gpu[i:i + handle.num_blocks]
            i += handle.num_blocks
            per_slot.append(gb)
            pairs.extend(zip(handle.host_blocks, gb))
        try:
            event = self._enqueue_copy(self.host_pool, self.pool, pairs, after)
        except BaseException:
            self.gpu_allocator.free(gpu)
            raise
        for slot, (_, handle), gb in zip(slots, items, per_slot):
            self._set_table(slot, gb)
            self._swap_in_events[slot] = event
            if handle.host_blocks:
                self.host_allocator.free(handle.host_blocks, event)
            handle.released = True
        return event

    def discard(self, handle: SwappedKV) -> None:
        """Forgets a swapped request (finished, aborted, or to be recomputed instead); its host
        blocks are reusable once its swap-out copy has completed."""
        if handle.released:
            raise ValueError("this SwappedKV was already swapped in or discarded")
        if handle.host_blocks:
            self.host_allocator.free(handle.host_blocks, handle.event)
        handle.released = True

    def reclaim(self, stream: Any = None, wait: bool = False) -> int:
        """Returns pending blocks (GPU and host) whose copies completed to the free lists; see
        BlockAllocator.reclaim for `stream` (pass the compute stream: it writes the GPU blocks;
        host blocks are written only by later swap-outs, which the copy stream runs in order)
        and `wait`. Returns the number released."""
        return self.gpu_allocator.reclaim(stream, wait) + self.host_allocator.reclaim(stream, wait)

    def wait(self, event: Event, stream: Any = None) -> None:
        """Makes `stream` (default: the current stream) wait for `event` on the GPU before its
        next work; on CPU, waits for the event."""
        if self.device.type == "cuda" and isinstance(event, torch.cuda.Event):
            (stream or torch.cuda.current_stream(self.device)).wait_event(event)
        else:
            event.synchronize()

    def commit_block_tables(self) -> int:
        """Writes the table entries changed since the last commit into `block_tables` on the
        current stream (one small host-to-device copy, no sync). Returns the entries written."""
        if not self._dirty_from:
            return 0
        width = self.max_blocks_per_request
        index, values = [], []
        for slot, start in self._dirty_from.items():
            row = self._tables[slot]
            end = max(len(row), self._committed_len[slot])
            index.extend(range(slot * width + start, slot * width + end))
            values.extend(row[start:end])
            values.extend([-1] * (end - max(start, len(row))))
            self._committed_len[slot] = len(row)
        self._dirty_from.clear()
        if not index:
            return 0
        packed = torch.tensor([index, values], dtype=torch.int64)
        if self.device.type == "cuda":
            packed = packed.to(self.device, non_blocking=True)
        flat = self.block_tables.view(-1)
        flat.index_copy_(0, packed[0], packed[1].to(torch.int32))
        return len(index)

    # ---- internals ----
    def _check_slot(self, slot: int) -> None:
        if not (isinstance(slot, int) and 0 <= slot < self.max_slots):
            raise IndexError(f"slot {slot!r} out of range [0, {self.max_slots})")

    def _distinct_slots(self, slots: Sequence[int]) -> list[int]:
        slots = list(slots)
        for s in slots:
            self._check_slot(s)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots repeat: {slots}")
        return slots

    def _growth(self, demands: Mapping[int, int]) -> dict[int, int]:
        growth = {}
        for slot, num_tokens in demands.items():
            self._check_slot(slot)
            if num_tokens < 0:
                raise ValueError(f"slot {slot}: negative token count {num_tokens}")
            want = -(-num_tokens // self.block_size)
            if want > self.max_blocks_per_request:
                raise ValueError(f"slot {slot}: {num_tokens} tokens need {want} blocks, more than "
                                 f"max_blocks_per_request={self.max_blocks_per_request}")
            extra = want - len(self._tables[slot])
            if extra > 0:
                growth[slot] = extra
        return growth

    def _extend(self, slot: int, blocks: list[int]) -> None:
        self._touch(slot, len(self._tables[slot]))
        self._tables[slot].extend(blocks)
        self._num_mapped[slot] = len(self._tables[slot])

    def _set_table(self, slot: int, blocks: list[int]) -> None:
        self._tables[slot] = blocks
        self._num_mapped[slot] = len(blocks)
        self._touch(slot, 0)

    @property
    def tables_committed(self) -> bool:
        """Whether `block_tables` on the device matches the host tables."""
        return not self._dirty_from

    def _touch(self, slot: int, first_changed: int) -> None:
        self._dirty_from[slot] = min(first_changed, self._dirty_from.get(slot, first_changed))

    def _enqueue_copy(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]],
                      after: Event | None) -> Event:
        """One batched copy of block pairs; returns its completion event."""
        pairs_t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        if self.device.type != "cuda":
            if after is not None:
                after.synchronize()
            if pairs:
                ops.kv_swap_blocks(src, dst, pairs_t, 0, "host", 0)
            return COMPLETED
        stream = self.copy_stream
        if after is None:
            after = torch.cuda.current_stream(self.device).record_event()
        if isinstance(after, torch.cuda.Event):
            stream.wait_event(after)
        else:
            after.synchronize()
        if pairs:
            used = ops.kv_swap_blocks(src, dst, pairs_t, stream.cuda_stream, self.swap_method, 0)
            if used != self.swap_method and self.swap_method != "auto" and not self._warned_method:
                logger.warning("KV swap: asked for %s, ran %s", self.swap_method, used)
                self._warned_method = True
            logger.debug("KV swap: %d blocks (%s)", len(pairs), used)
        return stream.record_event()
