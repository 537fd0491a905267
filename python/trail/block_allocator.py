"""Block bookkeeping of the paged KV cache, device-free: `BlockAllocator` hands out block ids,
counts references (prefix sharing) and holds freed blocks back until the event of the copy still
reading or writing them has completed. `trail.kv_cache.KVCache` owns one for GPU blocks and one
for host swap blocks; the simulator (`trail.sim`) uses them alone. `KVCacheOutOfBlocks` is what
an allocation that does not fit raises; `Event` is what a pending free waits on (a
torch.cuda.Event, or `COMPLETED` for synchronous CPU copies).
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Any, Mapping, Protocol, Sequence


class KVCacheOutOfBlocks(RuntimeError):
    """Not enough free blocks; the allocator is unchanged. `pending` more blocks are waiting for
    their swap copies (see `KVCache.reclaim`)."""

    def __init__(self, kind: str, needed: int, free: int, pending: int):
        self.kind, self.needed, self.free, self.pending = kind, needed, free, pending
        hint = f"; {pending} more wait for swap copies to complete (reclaim)" if pending else ""
        super().__init__(f"KV cache out of {kind} blocks: need {needed}, {free} free{hint}")


class Event(Protocol):
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


class CompletedEvent:
    """The event of a copy that has already happened (CPU copies are synchronous)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


COMPLETED = CompletedEvent()


class BlockAllocator:
    """Block ids `[0, num_blocks)`: a free stack, reference counts, and freed blocks that wait
    for an event (a copy still reading or writing them) before they can be handed out again."""

    def __init__(self, num_blocks: int, kind: str = "gpu"):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks, self.kind = num_blocks, kind
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out ascending ids
        self._refs = [0] * num_blocks
        self._pending: deque[tuple[Event, list[int]]] = deque()
        self._num_pending = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_pending(self) -> int:
        return self._num_pending

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - self._num_pending

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """n blocks with reference count 1. Reclaims completed pending blocks if short; raises
        KVCacheOutOfBlocks (state unchanged) if still short."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            self.reclaim()
            if n > len(self._free):
                raise KVCacheOutOfBlocks(self.kind, n, len(self._free), self._num_pending)
        if n == 0:
            return []
        blocks = self._free[-n:]
        del self._free[-n:]
        blocks.reverse()
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def _check_held(self, times: Mapping[int, int], what: str) -> None:
        for b, count in times.items():
            if not (isinstance(b, int) and 0 <= b < self.num_blocks):
                raise ValueError(f"{self.kind} block {b!r} is not a block id in [0, {self.num_blocks})")
            if self._refs[b] < count:
                raise ValueError(f"{self.kind} block {b} {what} {count} time(s) but holds "
                                 f"{self._refs[b]} reference(s)")

    def claim(self, blocks: Sequence[int]) -> None:
        """Takes these specific free blocks (reference count 1). ValueError, nothing changed, if
        one is not free or repeats."""
        want = set(blocks)
        if len(want) != len(blocks):
            raise ValueError(f"{self.kind}: claim lists a block twice")
        free = set(self._free)
        missing = [b for b in blocks if b not in free]
        if missing:
            raise ValueError(f"{self.kind}: blocks {missing[:8]} are not free")
        self._free = [b for b in self._free if b not in want]
        for b in blocks:
            self._refs[b] = 1

    def incref(self, blocks: Sequence[int]) -> None:
        """One more reference to each (allocated) block: prefix sharing."""
        self._check_held(Counter(set(blocks)), "shared")
        for b in blocks:
            self._refs[b] += 1

    def free(self, blocks: Sequence[int], event: Event | None = None) -> list[int]:
        """Drops one reference per entry; blocks reaching zero become free now (event None) or
        once `event` has completed. Returns those blocks. Raises ValueError (state unchanged) on a
        block that is not held."""
        self._check_held(Counter(blocks), "released")
        released = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                released.append(b)
        if released:
            if event is None:
                self._free.extend(reversed(released))
            else:
                self._pending.append((event, released))
                self._num_pending += len(released)
        return released

    def reclaim(self, stream: Any = None, wait: bool = False) -> int:
        """Returns pending blocks to the free list: those whose event has completed (query); with
        `stream`, all of them after `stream.wait_event(event)` (GPU-side order, no host wait);
        with `wait`, all of them after `event.synchronize()`. Returns the number released."""
        released, keep = 0, deque()
        for event, blocks in self._pending:
            if event.query():
                pass
            elif stream is not None:
                stream.wait_event(event)
            elif wait:
                event.synchronize()
            else:
                keep.append((event, blocks))
                continue
            self._free.extend(reversed(blocks))
            released += len(blocks)
        self._pending = keep
        self._num_pending -= released
        return released

    def check(self) -> None:
        """Asserts the bookkeeping: every block is exactly one of free, pending, or referenced."""
        pending = [b for _, blocks in self._pending for b in blocks]
        seen = Counter(self._free) + Counter(pending)
        assert all(c == 1 for c in seen.values()), f"{self.kind}: a block is listed twice"
        assert len(pending) == self._num_pending
        for b in range(self.num_blocks):
            assert (b in seen) != (self._refs[b] > 0), f"{self.kind} block {b} is lost or double-held"


class LedgerCounts:
    """What the serving core reads of a block ledger (`KVCache`, `HostBlockLedger`): free GPU and
    host blocks and each slot's mapped blocks. Needs `gpu_allocator`, `host_allocator` and an int64
    `_num_mapped[max_slots]`."""

    @property
    def num_free_blocks(self) -> int:
        return self.gpu_allocator.num_free

    @property
    def num_free_host_blocks(self) -> int:
        return self.host_allocator.num_free

    def mapped_blocks(self, slots):
        """Blocks mapped in each slot's table (host truth), int64, for vectorised checks."""
        return self._num_mapped[slots]

