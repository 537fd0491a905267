"""KV block swap on the GPU (skipped without CUDA): every method copies bit-exactly between the
pool and the pinned swap space (repeated, adjacent, scattered blocks; batches past the chunk sizes;
a pool past 2^31 elements), and the ordering rules hold on real streams. Each ordering test shows
the rule is required (a delayed stream makes the unsafe variant read or write the wrong data) and
sufficient (the same schedule through KVCache gives the right data)."""
import functools

import pytest
import torch

import trail
from trail.block_allocator import KVCacheOutOfBlocks
from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.kv_swap import host_buffer, swap_blocks

pytestmark = pytest.mark.gpu

METHODS = ["auto", "batch", "memcpy", "kernel"]
SPEC = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)  # 32 KiB


def same(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8).cpu(), b.view(torch.uint8).cpu())


def randomize_(t: torch.Tensor) -> torch.Tensor:
    flat = t.view(torch.uint8).view(-1)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, device=t.device))
    return t


def need(method):
    if method != "auto" and method not in trail.ops.kv_swap_methods():
        pytest.skip(f"method {method} is not in this build")


def device_index(blocks):
    """Block ids on the GPU without a host sync (pageable non_blocking copy is staged)."""
    return torch.tensor(blocks, dtype=torch.int64).to("cuda", non_blocking=True)


@functools.cache
def cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def sleep_on(stream, ms=150.0):
    """Keeps `stream` busy for `ms` so that work queued behind it runs late."""
    cycles = int(ms * cycles_per_ms())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)


def test_cuda_build():
    assert trail.native_info()["build"] == "cuda"
    assert {"batch", "memcpy", "kernel"} <= set(trail.ops.kv_swap_methods())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["mixed", "many_small"])
def test_round_trip_bit_exact(method, case):
    need(method)
    gen = torch.Generator().manual_seed(5)
    if case == "mixed":      # adjacent runs, repeated sources, scattered
        shape, n_pool, n_host = SPEC.block_shape, 96, 64
        pairs = [(10, 30), (11, 31), (12, 32), (13, 33), (3, 5), (4, 2), (5, 20), (7, 0), (7, 1)]
        used = {d for _, d in pairs}
        rest = [d for d in torch.randperm(n_host, generator=gen).tolist() if d not in used][:20]
        pairs += [(int(torch.randint(0, n_pool, (1,), generator=gen)), d) for d in rest]
    else:                    # 3000 scattered 1 KiB blocks: several batch calls / kernel launches
        shape, n_pool, n_host = (1, 2, 1, 16, 16), 4000, 3500
        src = torch.randperm(n_pool, generator=gen)[:3000].tolist()
        dst = torch.randperm(n_host, generator=gen)[:3000].tolist()
        pairs = list(zip(src, dst))
    pool = randomize_(torch.empty((n_pool, *shape), dtype=torch.bfloat16, device="cuda"))
    host = randomize_(host_buffer((n_host, *shape), torch.bfloat16, pinned=True))
    expected = host.clone()
    pool_cpu = pool.cpu()
    for s, d in pairs:
        expected[d] = pool_cpu[s]
    stream = torch.cuda.Stream()
    used_method = swap_blocks(pool, host, pairs, stream, method)
    assert used_method == method or (method == "auto" and used_method in ("batch", "memcpy"))
    stream.synchronize()
    assert same(host, expected)

    back = [(d, s) for s, d in pairs[:len(pairs) // 2]]        # host -> other GPU blocks
    sources = {s for s, _ in pairs}
    targets = [t for t in range(n_pool) if t not in sources][:len(back)]
    back = [(h, t) for (h, _), t in zip(back, targets)]
    expected_pool = pool.cpu()
    for h, t in back:
        expected_pool[t] = expected[h]
    swap_blocks(host, pool, back, stream, method)
    stream.synchronize()
    assert same(pool, expected_pool)


@pytest.mark.parametrize("ctas", [1, 7, 200])
def test_kernel_grid_sizes(ctas):
    pool = randomize_(torch.empty((64, *SPEC.block_shape), dtype=torch.bfloat16, device="cuda"))
    host = host_buffer((64, *SPEC.block_shape), torch.bfloat16, pinned=True)
    pairs = [(i, 63 - i) for i in range(0, 64, 3)]
    stream = torch.cuda.Stream()
    assert swap_blocks(pool, host, pairs, stream, "kernel", kernel_ctas=ctas) == "kernel"
    stream.synchronize()
    for s, d in pairs:
        assert same(host[d], pool[s])


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_swap_round_trip(method):
    need(method)
    kv = KVCache(SPEC, num_blocks=128, max_slots=8, max_blocks_per_request=32, device="cuda",
                 num_host_blocks=96, swap_method=method)
    for step in range(1, 17):                       # interleaved growth: scattered blocks
        kv.allocate({s: 16 * step for s in range(6) if step <= 4 + 2 * s})
    randomize_(kv.pool)
    ref = {s: kv.pool[kv.blocks_of(s)].clone() for s in range(6)}
    handles = kv.swap_out([5, 2, 3])
    torch.cuda.synchronize()
    for h, s in zip(handles, [5, 2, 3]):
        assert same(kv.host_pool[h.host_blocks], ref[s])
    assert kv.reclaim() == 32
    kv.pool.fill_(0)                                 # what the swap-in must overwrite
    event = kv.swap_in([(6, handles[0]), (2, handles[1]), (7, handles[2])])
    kv.wait(event)
    for slot, s in [(6, 5), (2, 2), (7, 3)]:
        assert same(kv.pool[kv.blocks_of(slot)], ref[s])
    kv.commit_block_tables()
    for slot in range(8):
        row = kv.blocks_of(slot)
        assert kv.block_tables[slot].tolist() == row + [-1] * (32 - len(row))


def test_swap_out_waits_for_the_last_kv_write():
    kv = KVCache(SPEC, num_blocks=32, max_slots=2, max_blocks_per_request=8, device="cuda",
                 num_host_blocks=16)
    old = torch.full((4, *SPEC.block_shape), 1.0, dtype=torch.bfloat16, device="cuda")
    new = randomize_(torch.empty_like(old))
    for slot in (0, 1):
        kv.allocate({slot: 64})
    idx0, idx1 = device_index(kv.blocks_of(0)), device_index(kv.blocks_of(1))
    kv.pool.index_copy_(0, idx0, old)
    kv.pool.index_copy_(0, idx1, old)
    torch.cuda.synchronize()

    # Required: a copy ordered only after an earlier event reads the KV before its last write.
    stale = torch.cuda.current_stream().record_event()
    sleep_on(torch.cuda.current_stream())
    kv.pool.index_copy_(0, idx1, new)                # the victim's last KV write, late
    (h1,) = kv.swap_out([1], after=stale)
    torch.cuda.synchronize()
    assert same(kv.host_pool[h1.host_blocks], old)

    # Sufficient: the default `after` (everything enqueued so far) sees the write.
    sleep_on(torch.cuda.current_stream())
    kv.pool.index_copy_(0, idx0, new)
    (h0,) = kv.swap_out([0])
    torch.cuda.synchronize()
    assert same(kv.host_pool[h0.host_blocks], new)


@pytest.mark.parametrize("method", METHODS)
def test_swap_in_wait_is_required_and_sufficient(method):
    kv = KVCache(SPEC, num_blocks=32, max_slots=2, max_blocks_per_request=8, device="cuda",
                 num_host_blocks=16, swap_method=method)
    kv.allocate({0: 128})
    randomize_(kv.pool)
    data = kv.pool[kv.blocks_of(0)].clone()
    (h,) = kv.swap_out([0])
    torch.cuda.synchronize()
    kv.reclaim()
    # warm-up: the first launch of a kernel loads its module (lazy loading), which can wait for
    # the whole device, the sleeping copy stream included; load every kernel used below first
    kv.wait(kv.swap_in([(1, h)]))
    kv.pool.index_select(0, device_index(kv.blocks_of(1)))
    (h,) = kv.swap_out([1])
    torch.cuda.synchronize()
    kv.reclaim()
    kv.pool.zero_()
    torch.cuda.synchronize()
    sleep_on(kv.copy_stream)                         # the copy engine is busy with earlier swaps
    event = kv.swap_in([(1, h)])
    idx = device_index(kv.blocks_of(1))
    early = kv.pool.index_select(0, idx)             # first use without waiting
    kv.wait(event)
    late = kv.pool.index_select(0, idx)              # first use after waiting
    torch.cuda.synchronize()
    assert same(late, data)
    assert not same(early, data) and torch.all(early == 0)


def test_blocks_freed_by_a_slow_swap_out_are_not_overwritten():
    """Same step: a large swap-out frees blocks, a newcomer gets them and writes them. The copy
    must read the old KV first."""
    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)  # 2 MiB
    kv = KVCache(spec, num_blocks=64, max_slots=2, max_blocks_per_request=64, device="cuda",
                 num_host_blocks=64)
    kv.allocate({0: 64 * 16})
    randomize_(kv.pool)
    ref = kv.pool.clone()
    torch.cuda.synchronize()

    sleep_on(kv.copy_stream)                         # makes the 128 MiB swap-out late
    (h,) = kv.swap_out([0])
    assert not h.event.query()
    with pytest.raises(KVCacheOutOfBlocks, match="64 more wait"):
        kv.allocate({1: 16})                         # query only: not released yet
    assert kv.reclaim(stream=torch.cuda.current_stream()) == 64   # released in GPU order
    new = kv.allocate({1: 64 * 16})[1]
    kv.pool.index_fill_(0, device_index(new), 0.0)   # the newcomer writes its blocks
    torch.cuda.synchronize()
    assert same(kv.host_pool[h.host_blocks], ref)

    # Required: the same schedule without the wait overwrites the KV before it is copied.
    randomize_(kv.pool)
    ref = kv.pool.clone()
    torch.cuda.synchronize()
    sleep_on(kv.copy_stream)
    pairs = list(zip(range(64), range(64)))
    swap_blocks(kv.pool, kv.host_pool, pairs, kv.copy_stream)
    kv.pool.index_fill_(0, device_index(list(range(64))), 0.0)
    torch.cuda.synchronize()
    assert not same(kv.host_pool, ref) and torch.all(kv.host_pool == 0)


def test_freeing_a_slot_during_its_swap_in():
    kv = KVCache(SPEC, num_blocks=8, max_slots=3, max_blocks_per_request=8, device="cuda",
                 num_host_blocks=8)
    kv.allocate({0: 128})
    randomize_(kv.pool)
    (h,) = kv.swap_out([0])
    torch.cuda.synchronize()
    kv.reclaim()
    sleep_on(kv.copy_stream)
    kv.swap_in([(1, h)])
    kv.free(1)                                       # dropped before its copy ran
    assert kv.gpu_allocator.num_pending == 8
    torch.cuda.synchronize()
    assert kv.reclaim() == 16 and kv.num_free_blocks == 8


def test_pool_past_int32_elements():
    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    num_blocks = 2100                                # 2100 * 2^20 elements > 2^31; 4.4 GB
    kv = KVCache(spec, num_blocks=num_blocks, max_slots=1, max_blocks_per_request=4,
                 device="cuda", num_host_blocks=8)
    assert kv.pool.numel() > 2**31
    far = [2099, 2048, 2047, 5]
    idx = device_index(far)
    kv.pool.index_copy_(0, idx, randomize_(torch.empty((4, *spec.block_shape), dtype=spec.dtype,
                                                       device="cuda")))
    ref = kv.pool.index_select(0, idx).cpu()
    stream = torch.cuda.Stream()
    for method in [m for m in ("batch", "memcpy", "kernel") if m in trail.ops.kv_swap_methods()]:
        kv.host_pool.zero_()
        swap_blocks(kv.pool, kv.host_pool, list(zip(far, range(4))), stream, method)
        stream.synchronize()
        assert same(kv.host_pool[:4], ref), method
        back = [2098, 2097, 2060, 2049]
        swap_blocks(kv.host_pool, kv.pool, list(zip(range(4), back)), stream, method)
        stream.synchronize()
        assert same(kv.pool.index_select(0, device_index(back)), ref), method
        assert same(kv.layer_view(31)[2098], ref[0][31]), method


def test_swap_space_is_pinned_and_exact():
    kv = KVCache(SPEC, num_blocks=4, max_slots=1, max_blocks_per_request=4, device="cuda",
                 num_host_blocks=3)
    assert kv.host_pool.is_pinned()
    assert kv.host_pool.untyped_storage().nbytes() == 3 * SPEC.bytes_per_block


def test_bad_input_on_gpu():
    pool = torch.zeros((4, 8), device="cuda")
    pageable = torch.zeros((4, 8))
    with pytest.raises(ValueError, match="page-locked"):
        swap_blocks(pool, pageable, [(0, 0)], torch.cuda.Stream())
    host = host_buffer((4, 8), torch.float32, pinned=True)
    if torch.cuda.default_stream().cuda_stream == 0 and "batch" in trail.ops.kv_swap_methods():
        with pytest.raises(ValueError, match="legacy default stream"):
            swap_blocks(pool, host, [(0, 0)], torch.cuda.default_stream(), "batch")
        assert swap_blocks(pool, host, [(0, 0)], torch.cuda.default_stream(), "auto") == "memcpy"
    with pytest.raises(ValueError, match="16-byte aligned"):
        swap_blocks(torch.zeros((4, 3), device="cuda"), host_buffer((4, 3), torch.float32, True),
                    [(0, 0)], torch.cuda.Stream(), "kernel")


def test_from_memory_fraction():
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    want = 1 << 30
    fraction = (total - free + want) / total
    kv = KVCache.from_memory_fraction(SPEC, max_slots=4, max_blocks_per_request=16,
                                      gpu_memory_utilization=fraction,
                                      swap_space_bytes=10 * SPEC.bytes_per_block)
    assert abs(kv.num_blocks * SPEC.bytes_per_block - want) < 2 * SPEC.bytes_per_block + (1 << 20)
    assert kv.num_host_blocks == 10
    with pytest.raises(ValueError, match="no room"):
        KVCache.from_memory_fraction(SPEC, 4, 16, gpu_memory_utilization=(total - free) / total / 2)
