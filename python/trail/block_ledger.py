"""The block ledger without a device: GPU and host block ids per slot, for the simulator. It has
the subset of `KVCache`'s interface that `ServingCore` drives (grow_to / free / swap_out / swap_in
/ discard / reclaim / wait / mapped_blocks and the free counts), so the simulator applies a plan
through the same code as the engine; nothing is copied and every event is already complete."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from trail.block_allocator import COMPLETED, BlockAllocator, Event, LedgerCounts
from trail.kv_cache import SwappedKV


class HostBlockLedger(LedgerCounts):
    def __init__(self, num_gpu_blocks: int, num_host_blocks: int, max_slots: int):
        self.gpu_allocator = BlockAllocator(num_gpu_blocks, "gpu")
        self.host_allocator = BlockAllocator(num_host_blocks, "host")
        self._tables: list[list[int]] = [[] for _ in range(max_slots)]
        self._num_mapped = np.zeros(max_slots, np.int64)

    def grow_to(self, slots: np.ndarray, num_blocks: np.ndarray) -> int:
        slots = np.asarray(slots, np.int64)
        extra = np.asarray(num_blocks, np.int64) - self._num_mapped[slots]
        grow = np.flatnonzero(extra > 0)
        total = int(extra[grow].sum())
        blocks, i = self.gpu_allocator.allocate(total), 0
        for j in grow.tolist():
            n, slot = int(extra[j]), int(slots[j])
            self._tables[slot].extend(blocks[i:i + n])
            self._num_mapped[slot] += n
            i += n
        return total

    def free(self, slot: int) -> None:
        self.gpu_allocator.free(self._tables[slot])
        self._tables[slot] = []
        self._num_mapped[slot] = 0

    def swap_out(self, slots: Sequence[int]) -> list[SwappedKV]:
        handles = []
        for slot in slots:
            n = len(self._tables[slot])
            self.free(slot)
            handles.append(SwappedKV(self.host_allocator.allocate(n), COMPLETED))
        return handles

    def swap_in(self, items: Sequence[tuple[int, SwappedKV]]) -> Event:
        for slot, handle in items:
            self.discard(handle)
            self.grow_to(np.array([slot]), np.array([handle.num_blocks]))
        return COMPLETED

    def discard(self, handle: SwappedKV) -> None:
        if handle.released:
            raise ValueError("this SwappedKV was already swapped in or discarded")
        self.host_allocator.free(handle.host_blocks)
        handle.released = True

    def reclaim(self, stream: Any = None, wait: bool = False) -> int:
        return 0

    def wait(self, event: Event, stream: Any = None) -> None:
        event.synchronize()
