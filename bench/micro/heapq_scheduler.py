"""The Python baseline for the scheduler micro-benchmark: the same policy step as trail's C++ core
(the logic of the test oracle tests/scheduler_reference.py) over heapq priority queues with lazy deletion, the way
Python serving schedulers keep their priority queues.

vLLM's own priority queue (v1 `PriorityRequestQueue`) is a heapq of (priority, arrival, request);
it removes with `list.remove` + `heapify` (O(n)) and picks preemption victims with a `max()` scan
over the running list. Here removal and key updates are O(log n) tombstones instead (an entry is
marked dead and a new one pushed; dead entries are skipped at the top and compacted when they
outnumber the live ones), which is faster than vLLM's, so the ratio we report is conservative.
"""
from __future__ import annotations

import heapq

from tests.scheduler_reference import ReferenceScheduler
from trail.scheduler import SchedulerConfig

_ALIVE = 4


class LazyHeapQueue:
    """heapq with tombstones. Entries are [k0, k1, k2, slot, alive]; the three keys are unique
    (the id is one of them), so comparisons never reach slot or alive."""

    def __init__(self, is_max: bool = False):
        self._heap: list[list] = []
        self._live: dict[int, list] = {}
        self._neg = is_max

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, slot: int) -> bool:
        return slot in self._live

    def _entry(self, slot: int, key: tuple) -> list:
        if self._neg:
            return [-key[0], -key[1], -key[2], slot, True]
        return [key[0], key[1], key[2], slot, True]

    def push(self, slot: int, key: tuple) -> None:
        if slot in self._live:
            raise AssertionError(f"slot {slot} pushed twice")
        e = self._entry(slot, key)
        self._live[slot] = e
        heapq.heappush(self._heap, e)

    def update(self, slot: int, key: tuple) -> None:
        self._live[slot][_ALIVE] = False
        e = self._entry(slot, key)
        self._live[slot] = e
        heapq.heappush(self._heap, e)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._compact()

    def remove(self, slot: int) -> None:
        self._live.pop(slot)[_ALIVE] = False
        if len(self._heap) > 2 * len(self._live) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[_ALIVE]]
        heapq.heapify(self._heap)

    def top(self) -> int:
        heap = self._heap
        while not heap[0][_ALIVE]:
            heapq.heappop(heap)
        return heap[0][3]

    def pop(self) -> int:
        heap = self._heap
        while True:
            e = heapq.heappop(heap)
            if e[_ALIVE]:
                del self._live[e[3]]
                return e[3]


class HeapqScheduler(ReferenceScheduler):
    """The reference step over lazy-deletion heaps: same API, same decisions as the C++ core."""

    def __init__(self, config: SchedulerConfig):
        super().__init__(config, queue_cls=LazyHeapQueue)
