"""KVCache on CPU: allocators (no block handed out twice, no leak, clean out-of-space errors), block
tables, and the swap protocol. Copies here can be deferred (`DeferredKVCache`: a simulated copy
stream that runs a copy only when its event is waited on or the test advances it), so the
ordering rules are exercised: blocks freed by a copy stay unusable until it completes, and
swapped-in blocks hold the data only after `wait`."""
from collections import deque

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import trail
from trail.block_allocator import BlockAllocator, CompletedEvent, KVCacheOutOfBlocks
from trail.kv_cache import KVCache, SwappedKV
from trail.kv_cache_spec import KVCacheSpec


# ---------------------------------------------------------------- simulated asynchronous copies
class SimCopyStream:
    """Copies run in FIFO order, and only when an event is synchronized or `advance` is called."""

    def __init__(self):
        self.queue: deque = deque()   # (run, gpu blocks touched, host blocks touched)
        self.issued = self.done = 0

    def enqueue(self, fn, gpu_blocks=(), host_blocks=()) -> "SimEvent":
        self.queue.append((fn, set(gpu_blocks), set(host_blocks)))
        self.issued += 1
        return SimEvent(self, self.issued)

    def advance(self, n: int) -> None:
        for _ in range(min(n, len(self.queue))):
            self.queue.popleft()[0]()
            self.done += 1

    def busy(self) -> tuple[set, set]:
        """Blocks that copies not yet run will read or write."""
        gpu, host = set(), set()
        for _, g, h in self.queue:
            gpu |= g
            host |= h
        return gpu, host


class SimEvent:
    def __init__(self, stream: SimCopyStream, seq: int):
        self.stream, self.seq = stream, seq

    def query(self) -> bool:
        return self.stream.done >= self.seq

    def synchronize(self) -> None:
        self.stream.advance(self.seq - self.stream.done)


class SimComputeStream:
    """Compute on CPU is immediate, so waiting for an event on it means running the copy now."""

    def __init__(self):
        self.waited = []

    def wait_event(self, event) -> None:
        self.waited.append(event)
        event.synchronize()


class DeferredKVCache(KVCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sim = SimCopyStream()

    def _enqueue_copy(self, src, dst, pairs, after):
        pairs_t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        gpu_side = [p[0] for p in pairs] if src is self.pool else [p[1] for p in pairs]
        host_side = [p[1] for p in pairs] if src is self.pool else [p[0] for p in pairs]
        return self.sim.enqueue(lambda: trail.ops.kv_swap_blocks(src, dst, pairs_t, 0, "host", 0),
                                gpu_side, host_side)


SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, block_size=4)


def fill_random(kv: KVCache, blocks, gen=None) -> None:
    if blocks:
        kv.pool[blocks] = torch.randn((len(blocks), *kv.spec.block_shape), generator=gen)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads included)."""
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def snapshot(kv: KVCache):
    """The logical state: tables, reference counts, and which blocks are not held. (Whether an
    unheld block is still pending or already reclaimed is not part of it: any allocation may
    reclaim completed copies.)"""
    def unheld(a: BlockAllocator):
        return sorted(a._free + [b for _, blocks in a._pending for b in blocks])
    return ([kv.blocks_of(s) for s in range(kv.max_slots)],
            list(kv.gpu_allocator._refs), unheld(kv.gpu_allocator),
            list(kv.host_allocator._refs), unheld(kv.host_allocator))


# ---------------------------------------------------------------- spec
def test_spec_sizes_from_config():
    llama = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "hidden_size": 4096, "torch_dtype": "bfloat16"}
    spec = KVCacheSpec.from_config(llama)
    assert spec.bytes_per_block == 2 * 2**20 and spec.bytes_per_token == 128 * 1024
    smol = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "hidden_size": 576, "torch_dtype": "bfloat16"}
    assert KVCacheSpec.from_config(smol).bytes_per_block == 360 * 1024
    assert KVCacheSpec.from_config(smol, dtype=torch.float32).bytes_per_block == 720 * 1024
    with pytest.raises(ValueError, match="num_hidden_layers"):
        KVCacheSpec.from_config({"hidden_size": 64})


# ---------------------------------------------------------------- allocator
def test_allocator_refcounts_and_errors():
    a = BlockAllocator(5)
    x = a.allocate(3)
    assert x == [0, 1, 2] and a.num_free == 2
    a.incref(x[:1])
    assert a.free(x) == [1, 2] and a.refcount(0) == 1
    before = (list(a._free), list(a._refs))
    with pytest.raises(KVCacheOutOfBlocks, match="need 5, 4 free") as info:
        a.allocate(5)
    assert info.value.needed == 5 and info.value.free == 4 and info.value.kind == "gpu"
    with pytest.raises(ValueError, match="block 1 released 1 time"):
        a.free([0, 1])  # 1 is already free: nothing changes, not even block 0
    with pytest.raises(ValueError, match="block 0 released 2 time"):
        a.free([0, 0])
    with pytest.raises(ValueError, match="not a block id"):
        a.free([7])
    assert (list(a._free), list(a._refs)) == before
    a.check()


def test_allocator_pending_until_event():
    stream = SimCopyStream()
    a = BlockAllocator(4)
    blocks = a.allocate(4)
    ev = stream.enqueue(lambda: None)
    a.free(blocks[:2], ev)
    assert a.num_pending == 2 and a.num_free == 0
    with pytest.raises(KVCacheOutOfBlocks, match="2 more wait") as info:
        a.allocate(1)                       # query: the copy has not run
    assert info.value.pending == 2
    assert a.reclaim() == 0
    stream.advance(1)
    assert a.allocate(2) == [0, 1]          # reclaimed by query inside allocate
    ev2 = stream.enqueue(lambda: None)
    a.free([0], ev2)
    assert a.reclaim(wait=True) == 1 and ev2.query()
    ev3 = stream.enqueue(lambda: None)
    a.free([1], ev3)
    compute = SimComputeStream()
    assert a.reclaim(stream=compute) == 1 and compute.waited == [ev3]
    a.check()


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / incref / free / free-with-event / complete / reclaim: every block is
    held, pending or free exactly once, and handed out only when free."""

    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(9)
        self.stream = SimCopyStream()
        self.held: list[int] = []          # one entry per reference
        self.pending: set[int] = set()

    @rule(n=st.integers(0, 5))
    def allocate(self, n):
        try:
            got = self.a.allocate(n)
        except KVCacheOutOfBlocks:
            assert n > self.a.num_free
            return
        assert len(got) == n and len(set(got)) == n
        assert not set(got) & set(self.held), "handed out a held block"
        assert not set(got) & self.pending, "handed out a block whose copy is still running"
        self.held.extend(got)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def incref(self, data):
        b = data.draw(st.sampled_from(self.held))
        self.a.incref([b])
        self.held.append(b)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), with_event=st.booleans())
    def free(self, data, with_event):
        k = data.draw(st.integers(1, len(self.held)))
        idx = data.draw(st.lists(st.integers(0, len(self.held) - 1), min_size=k, max_size=k, unique=True))
        blocks = [self.held[i] for i in idx]
        event = self.stream.enqueue(lambda: None) if with_event else None
        released = self.a.free(blocks, event)
        for i in sorted(idx, reverse=True):
            del self.held[i]
        assert set(released) == set(blocks) - set(self.held)
        if with_event:
            self.pending |= set(released)

    @rule(n=st.integers(1, 3))
    def complete(self, n):
        self.stream.advance(n)
        self.pending = {b for ev, bl in self.a._pending if not ev.query() for b in bl}

    @rule()
    def reclaim(self):
        self.a.reclaim()

    @rule(bad=st.integers(0, 8))
    def double_free_is_rejected(self, bad):
        if self.a.refcount(bad) == 0:
            before = (list(self.a._free), list(self.a._refs), self.a.num_pending)
            with pytest.raises(ValueError):
                self.a.free([bad])
            assert (list(self.a._free), list(self.a._refs), self.a.num_pending) == before

    @invariant()
    def consistent(self):
        self.a.check()
        assert self.a.num_used == len(set(self.held))

    def teardown(self):
        for b in list(self.held):
            self.a.free([b])
        self.stream.advance(10**6)
        self.a.reclaim()
        assert self.a.num_free == self.a.num_blocks, "leak"


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------- KVCache
def test_allocate_all_or_nothing_and_tables():
    kv = KVCache(SPEC, num_blocks=6, max_slots=3, max_blocks_per_request=4)
    assert kv.allocate({0: 5, 1: 4}) == {0: [0, 1], 1: [2]}
    assert kv.allocate({0: 8}) == {}                         # already holds 2 blocks of 4 tokens
    assert kv.blocks_needed({0: 9, 2: 1}) == 2 and kv.can_allocate({0: 9, 2: 1})
    before = snapshot(kv)
    with pytest.raises(KVCacheOutOfBlocks, match="need 4, 3 free"):
        kv.allocate({0: 16, 2: 8})
    assert snapshot(kv) == before and not kv.can_allocate({0: 16, 2: 8})
    with pytest.raises(ValueError, match="max_blocks_per_request"):
        kv.allocate({2: 17})
    with pytest.raises(IndexError, match="slot 3"):
        kv.allocate({3: 1})
    with pytest.raises(ValueError, match="negative"):
        kv.allocate({1: -1})
    assert snapshot(kv) == before
    assert kv.commit_block_tables() == 3
    assert kv.block_tables.tolist() == [[0, 1, -1, -1], [2, -1, -1, -1], [-1, -1, -1, -1]]
    kv.free(0)
    kv.allocate({2: 12})
    kv.commit_block_tables()
    assert kv.block_tables.tolist() == [[-1] * 4, [2, -1, -1, -1], [0, 1, 3, -1]]
    assert kv.commit_block_tables() == 0


def test_share_prefix_refcounts():
    kv = KVCache(SPEC, num_blocks=6, max_slots=3, max_blocks_per_request=4)
    kv.allocate({0: 12})
    kv.share_prefix(0, 1, 2)
    assert kv.blocks_of(1) == [0, 1] and kv.gpu_allocator.refcount(0) == 2
    kv.free(0)
    assert kv.num_free_blocks == 4 and kv.gpu_allocator.refcount(1) == 1
    with pytest.raises(ValueError, match="already holds"):
        kv.share_prefix(1, 1, 1)
    # swapping out a slot whose blocks are shared copies them and keeps the other user's blocks
    kv2 = KVCache(SPEC, num_blocks=6, max_slots=3, max_blocks_per_request=4, num_host_blocks=4)
    kv2.allocate({0: 8})
    kv2.share_prefix(0, 1, 2)
    fill_random(kv2, kv2.blocks_of(0))
    ref = kv2.pool[kv2.blocks_of(0)].clone()
    (h,) = kv2.swap_out([1])
    kv2.reclaim()
    assert kv2.blocks_of(0) == [0, 1] and kv2.num_free_blocks == 4
    kv2.free(0)
    kv2.reclaim()
    assert torch.equal(kv2.host_pool[h.host_blocks], ref) and kv2.num_free_blocks == 6


@pytest.mark.parametrize("order", ["scattered", "adjacent"])
def test_swap_round_trip_bit_exact(order, seeded):
    kv = KVCache(SPEC, num_blocks=40, max_slots=6, max_blocks_per_request=10, num_host_blocks=30)
    if order == "scattered":   # interleave slots so each slot's blocks are scattered in the pool
        for step in range(1, 40):
            demands = {s: 4 * step for s in range(5) if step <= 2 * s + 2}
            if kv.blocks_needed(demands) > kv.num_free_blocks:
                break
            kv.allocate(demands)
    else:
        kv.allocate({s: 4 * (2 * s + 1) for s in range(5)})
    kv.pool.view(torch.int32).copy_(torch.randint(-2**31, 2**31 - 1, kv.pool.shape, generator=seeded,
                                                  dtype=torch.int32))  # every bit pattern, NaNs too
    ref = {s: kv.pool[kv.blocks_of(s)].clone() for s in range(5)}
    handles = kv.swap_out([4, 1, 3])
    assert [h.num_blocks for h in handles] == [len(ref[4]), len(ref[1]), len(ref[3])]
    for h, s in zip(handles, [4, 1, 3]):
        assert same(kv.host_pool[h.host_blocks], ref[s])
    kv.pool.fill_(float("nan"))   # what the swap-in must overwrite
    kv.reclaim()
    event = kv.swap_in([(5, handles[0]), (1, handles[1])])
    kv.wait(event)
    assert same(kv.pool[kv.blocks_of(5)], ref[4])
    assert same(kv.pool[kv.blocks_of(1)], ref[1])
    with pytest.raises(ValueError, match="already swapped in"):
        kv.swap_in([(4, handles[0])])
    kv.discard(handles[2])
    kv.reclaim()
    assert kv.host_allocator.num_free == 30 and kv.host_allocator.num_used == 0


def test_swap_out_of_space_changes_nothing():
    kv = KVCache(SPEC, num_blocks=8, max_slots=4, max_blocks_per_request=8, num_host_blocks=3)
    kv.allocate({0: 8, 1: 8})
    fill_random(kv, list(range(4)))
    pool = kv.pool.clone()
    before = snapshot(kv)
    with pytest.raises(KVCacheOutOfBlocks, match="out of host blocks: need 4, 3 free"):
        kv.swap_out([0, 1])
    assert snapshot(kv) == before and same(kv.pool, pool)
    (h,) = kv.swap_out([0])
    kv.allocate({2: 24})          # takes the blocks slot 0 had once reclaimed, and more
    before = snapshot(kv)
    with pytest.raises(KVCacheOutOfBlocks, match="out of gpu blocks"):
        kv.swap_in([(0, h)])
    assert snapshot(kv) == before and not h.released
    with pytest.raises(ValueError, match="already holds"):
        kv.swap_in([(1, h)])
    with pytest.raises(ValueError, match="slots repeat"):
        kv.swap_out([1, 1])
    assert snapshot(kv) == before


def test_swap_requires_host_space():
    kv = KVCache(SPEC, num_blocks=4, max_slots=2, max_blocks_per_request=4)
    kv.allocate({0: 4})
    with pytest.raises(KVCacheOutOfBlocks, match="host"):
        kv.swap_out([0])
    assert kv.host_pool.shape == (0, *SPEC.block_shape)
    (h,) = kv.swap_out([1])                       # an empty slot needs no swap space
    assert h.num_blocks == 0
    kv.wait(kv.swap_in([(1, h)]))


def test_blocks_freed_by_swap_out_wait_for_the_copy(seeded):
    """A large swap-out is still running when the next allocation needs blocks: the freed blocks
    are not handed out (query), or handed out only after the consumer waited for the copy."""
    kv = DeferredKVCache(SPEC, num_blocks=10, max_slots=3, max_blocks_per_request=10,
                         num_host_blocks=10)
    kv.allocate({0: 28, 1: 12})
    fill_random(kv, kv.blocks_of(0) + kv.blocks_of(1), seeded)
    ref = kv.pool[kv.blocks_of(0)].clone()
    (h,) = kv.swap_out([0])
    assert not h.event.query() and kv.gpu_allocator.num_pending == 7
    with pytest.raises(KVCacheOutOfBlocks, match="7 more wait"):
        kv.allocate({2: 12})
    compute = SimComputeStream()
    assert kv.reclaim(stream=compute) == 7 and compute.waited == [h.event]
    new = kv.allocate({2: 12})[2]
    assert set(new) <= set(range(7))             # reuses the swapped-out blocks ...
    kv.pool[new] = -1.0                          # ... and the new owner writes them
    assert torch.equal(kv.host_pool[h.host_blocks], ref)


def test_swap_in_data_visible_only_after_wait(seeded):
    kv = DeferredKVCache(SPEC, num_blocks=8, max_slots=2, max_blocks_per_request=8,
                         num_host_blocks=8)
    kv.allocate({0: 16})
    fill_random(kv, kv.blocks_of(0), seeded)
    ref = kv.pool[kv.blocks_of(0)].clone()
    (h,) = kv.swap_out([0])
    kv.sim.advance(1)
    kv.pool.fill_(7.0)
    event = kv.swap_in([(1, h)])
    blocks = kv.blocks_of(1)
    assert torch.all(kv.pool[blocks] == 7.0)     # not yet: reading now would see stale memory
    kv.wait(event)
    assert torch.equal(kv.pool[blocks], ref)


def test_freeing_a_slot_during_its_swap_in_waits_for_the_copy(seeded):
    """A request dropped before its swap-in copy ran: its blocks are not reused until the copy
    (which still writes them) completes."""
    kv = DeferredKVCache(SPEC, num_blocks=4, max_slots=3, max_blocks_per_request=4,
                         num_host_blocks=4)
    kv.allocate({0: 8})
    (h,) = kv.swap_out([0])
    kv.sim.advance(1)
    kv.reclaim()
    event = kv.swap_in([(1, h)])
    writing = kv.blocks_of(1)
    kv.free(1)
    assert kv.gpu_allocator.num_pending == 2
    with pytest.raises(KVCacheOutOfBlocks, match="2 more wait"):
        kv.allocate({2: 16})
    new = kv.allocate({2: 8})[2]
    assert set(new).isdisjoint(writing)
    event.synchronize()
    kv.reclaim()
    assert kv.gpu_allocator.num_pending == 0 and kv.num_free_blocks == 2
    # a swap-in whose copy has completed leaves nothing pending when its slot is freed
    kv.allocate({0: 4})
    (h,) = kv.swap_out([0])
    kv.sim.advance(1)
    kv.reclaim()
    kv.wait(kv.swap_in([(1, h)]))
    kv.free(1)
    assert kv.gpu_allocator.num_pending == 0


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / write / free / swap out / swap in / discard / copy progress / reclaim
    with deferred copies. A model holds every request's expected KV; checked bit-exactly on the
    GPU pool (after wait) and in the swap space (after the swap-out completed)."""

    SLOTS = 5

    def __init__(self):
        super().__init__()
        self.kv = DeferredKVCache(SPEC, num_blocks=14, max_slots=self.SLOTS,
                                  max_blocks_per_request=6, num_host_blocks=12)
        self.gen = torch.Generator().manual_seed(0)
        self.expect: dict[int, torch.Tensor] = {}          # slot -> [n_blocks, *block_shape]
        self.unwaited: dict[int, object] = {}              # slot -> swap-in event not waited on
        self.swapped: list[tuple[SwappedKV, torch.Tensor]] = []

    def _data(self, n):
        return torch.randn((n, *SPEC.block_shape), generator=self.gen)

    def _use(self, slot):
        if slot in self.unwaited:
            self.kv.wait(self.unwaited.pop(slot))

    @rule(slot=st.integers(0, SLOTS - 1), tokens=st.integers(1, 24))
    def allocate(self, slot, tokens):
        self._use(slot)
        before = snapshot(self.kv)
        try:
            new = self.kv.allocate({slot: tokens}).get(slot, [])
        except KVCacheOutOfBlocks:
            assert snapshot(self.kv) == before
            return
        data = self._data(len(new))
        if new:
            self.kv.pool[new] = data
        old = self.expect.get(slot, torch.empty((0, *SPEC.block_shape)))
        self.expect[slot] = torch.cat([old, data])

    @rule(slot=st.integers(0, SLOTS - 1))
    def rewrite(self, slot):
        self._use(slot)
        blocks = self.kv.blocks_of(slot)
        if blocks:
            data = self._data(1)
            self.kv.pool[blocks[-1]] = data[0]
            self.expect[slot][-1] = data[0]

    @rule(slot=st.integers(0, SLOTS - 1))
    def free(self, slot):
        self.unwaited.pop(slot, None)   # dropping a request needs no wait
        self.kv.free(slot)
        self.expect.pop(slot, None)

    @rule(slots=st.sets(st.integers(0, SLOTS - 1), min_size=1, max_size=3))
    def swap_out(self, slots):
        slots = sorted(slots)
        before = snapshot(self.kv)
        try:
            handles = self.kv.swap_out(slots)
        except KVCacheOutOfBlocks:
            assert snapshot(self.kv) == before
            return
        for s, h in zip(slots, handles):
            self.unwaited.pop(s, None)  # the copy stream orders it after the swap-in
            self.swapped.append((h, self.expect.pop(s, torch.empty((0, *SPEC.block_shape)))))

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        i = data.draw(st.integers(0, len(self.swapped) - 1))
        empty = [s for s in range(self.SLOTS) if not self.kv.blocks_of(s)]
        if not empty:
            return
        slot = data.draw(st.sampled_from(empty))
        h, expected = self.swapped[i]
        before = snapshot(self.kv)
        try:
            event = self.kv.swap_in([(slot, h)])
        except KVCacheOutOfBlocks:
            assert snapshot(self.kv) == before
            return
        del self.swapped[i]
        self.expect[slot] = expected
        self.unwaited[slot] = event

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def discard(self, data):
        h, _ = self.swapped.pop(data.draw(st.integers(0, len(self.swapped) - 1)))
        self.kv.discard(h)

    @rule(n=st.integers(1, 3))
    def progress(self, n):
        self.kv.sim.advance(n)

    @rule()
    def scribble_on_free_blocks(self):
        """Free blocks hold garbage: nothing may still read or write them."""
        gpu, host = self.kv.gpu_allocator._free, self.kv.host_allocator._free
        if gpu:
            self.kv.pool[gpu] = self._data(len(gpu))
        if host:
            self.kv.host_pool[host] = self._data(len(host))

    @rule(mode=st.sampled_from(["query", "stream", "wait"]))
    def reclaim(self, mode):
        if mode == "query":
            self.kv.reclaim()
        elif mode == "stream":
            self.kv.reclaim(stream=SimComputeStream())
        else:
            self.kv.reclaim(wait=True)

    @rule(slot=st.integers(0, SLOTS - 1))
    def read(self, slot):
        self._use(slot)
        self._check_slot(slot)

    @precondition(lambda self: self.unwaited)
    @rule(data=st.data(), drop=st.booleans())
    def use_or_drop_fresh_swap_in(self, data, drop):
        """The risky moments: right after a swap-in, its request is read or dropped."""
        slot = data.draw(st.sampled_from(sorted(self.unwaited)))
        if drop:
            self.free(slot)
        else:
            self.read(slot)

    def _check_slot(self, slot):
        blocks = self.kv.blocks_of(slot)
        expected = self.expect.get(slot, torch.empty((0, *SPEC.block_shape)))
        assert len(blocks) == len(expected)
        if blocks:
            assert torch.equal(self.kv.pool[blocks], expected), f"slot {slot} KV corrupted"

    @invariant()
    def consistent(self):
        kv = self.kv
        kv.gpu_allocator.check()
        kv.host_allocator.check()
        busy_gpu, busy_host = kv.sim.busy()
        assert not busy_gpu & set(kv.gpu_allocator._free), "a block a copy still uses is free"
        assert not busy_host & set(kv.host_allocator._free), "a host block a copy still uses is free"
        refs = [0] * kv.num_blocks
        for s in range(self.SLOTS):
            for b in kv.blocks_of(s):
                refs[b] += 1
        assert refs == kv.gpu_allocator._refs
        host_refs = [0] * kv.num_host_blocks
        for h, _ in self.swapped:
            for b in h.host_blocks:
                host_refs[b] += 1
        assert host_refs == kv.host_allocator._refs
        for s in range(self.SLOTS):
            if s not in self.unwaited:
                self._check_slot(s)
        for h, expected in self.swapped:
            if h.event.query() and h.host_blocks:
                assert torch.equal(kv.host_pool[h.host_blocks], expected), "swap space corrupted"
        kv.commit_block_tables()
        for s in range(self.SLOTS):
            row = kv.blocks_of(s)
            assert kv.block_tables[s].tolist() == row + [-1] * (kv.max_blocks_per_request - len(row))

    def teardown(self):
        kv = self.kv
        for s in range(self.SLOTS):
            kv.free(s)
        for h, _ in self.swapped:
            kv.discard(h)
        kv.reclaim(wait=True)
        assert kv.num_free_blocks == kv.num_blocks and kv.num_free_host_blocks == kv.num_host_blocks


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                       suppress_health_check=[HealthCheck.filter_too_much,
                                                              HealthCheck.too_slow])


def test_state_machine_catches_early_release(monkeypatch):
    """The protocol test can fail: releasing swapped-out blocks at once corrupts the copy."""
    original = BlockAllocator.free
    monkeypatch.setattr(BlockAllocator, "free", lambda self, blocks, event=None: original(self, blocks, None))
    kv = DeferredKVCache(SPEC, num_blocks=4, max_slots=2, max_blocks_per_request=4, num_host_blocks=4)
    kv.allocate({0: 16})
    fill_random(kv, kv.blocks_of(0))
    ref = kv.pool[kv.blocks_of(0)].clone()
    (h,) = kv.swap_out([0])
    kv.allocate({1: 16})                  # with eager release this succeeds at once ...
    kv.pool[kv.blocks_of(1)] = 0.0        # ... and the new owner overwrites the source
    kv.sim.advance(1)
    assert not torch.equal(kv.host_pool[h.host_blocks], ref)


def test_completed_event_and_cpu_wait():
    kv = KVCache(SPEC, num_blocks=2, max_slots=1, max_blocks_per_request=2, num_host_blocks=2)
    kv.allocate({0: 4})
    (h,) = kv.swap_out([0])
    assert isinstance(h.event, CompletedEvent) and h.event.query()
    kv.wait(h.event)
