"""The batched block copy `trail.ops.kv_swap_blocks` and the extension-owned host memory, on CPU:
copies match their definition bit for bit (repeated, adjacent and scattered blocks), runs are
coalesced exactly, bad input is refused with the problem named. GPU tests: test_kv_swap_gpu.py."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trail
from trail.kv_swap import host_buffer, swap_blocks

ops = trail.ops


def same(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def random_bits(shape, dtype, gen):
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).view(shape)


def mixed_pairs(num_src, num_dst, gen):
    """Adjacent runs, scattered blocks and repeated sources (num_src >= 16, num_dst >= 40);
    destinations distinct."""
    pairs = [(10, 30), (11, 31), (12, 32), (13, 33)]    # source and destination adjacent: one run
    pairs += [(3, 5), (4, 2), (5, 20)]                    # adjacent sources only
    pairs += [(7, 0), (7, 1)]                             # repeated source
    used = {d for _, d in pairs}
    free = [d for d in torch.randperm(num_dst, generator=gen).tolist() if d not in used]
    for d in free[:8]:                                    # scattered
        pairs.append((int(torch.randint(0, num_src, (1,), generator=gen)), d))
    return pairs


def test_methods_of_this_build():
    methods = ops.kv_swap_methods()
    assert "host" in methods
    if trail.native_info()["build"] == "cuda":
        assert {"memcpy", "kernel"} <= set(methods)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_host_copy_matches_definition(dtype, seeded):
    shape = (2, 2, 3, 4, 8)
    src = random_bits((40, *shape), dtype, seeded)
    dst = random_bits((48, *shape), dtype, seeded)
    pairs = mixed_pairs(40, 48, seeded)
    expected = dst.clone()
    for s, d in pairs:
        expected[d] = src[s]
    assert swap_blocks(src, dst, pairs) == "host"
    assert same(dst, expected)
    assert swap_blocks(src, dst, []) == "host"          # nothing to copy is fine
    assert same(dst, expected)


def test_swap_space_is_extension_memory():
    t = host_buffer((3, 5, 7), torch.bfloat16, pinned=False)
    assert t.shape == (3, 5, 7) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % 4096 == 0
    t.fill_(1.5)
    assert torch.all(t == 1.5)
    raw = ops.kv_host_alloc(4096 * 2 + 1, False)
    assert raw.numel() == 4096 * 2 + 1 and raw.dtype == torch.uint8
    assert host_buffer((0, 4), torch.float32, pinned=False).shape == (0, 4)
    with pytest.raises(ValueError, match="positive"):
        ops.kv_host_alloc(0, False)
    if trail.native_info()["build"] == "cpu":
        with pytest.raises(ValueError, match="CUDA build"):
            ops.kv_host_alloc(16, True)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_swap_space_is_freed_with_its_tensor():
    size = 32 << 20
    before = _rss_bytes()
    for _ in range(24):                       # 768 MiB if the deleter leaked
        t = ops.kv_host_alloc(size, False)
        t.fill_(1)                            # make it resident
        del t
    assert _rss_bytes() - before < 4 * size


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=30))
def test_coalesce_runs(pairs):
    runs = ops.kv_coalesce(torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)).tolist()
    expanded = [(s + i, d + i) for s, d, n in runs for i in range(n)]
    assert expanded == pairs                                 # same copies, same order
    for (s0, d0, n0), (s1, d1, _) in zip(runs, runs[1:]):    # maximal runs
        assert not (s1 == s0 + n0 and d1 == d0 + n0)
    assert all(n >= 1 for _, _, n in runs)


def test_bad_input_is_refused():
    src = torch.zeros(4, 8)
    dst = torch.zeros(3, 8)
    pairs = torch.tensor([[0, 0]])
    with pytest.raises(ValueError, match="destination block 1 appears twice"):
        swap_blocks(src, dst, [(0, 1), (2, 1)])
    with pytest.raises(ValueError, match="source block 4 outside"):
        swap_blocks(src, dst, [(4, 0)])
    with pytest.raises(ValueError, match="destination block -1 outside"):
        swap_blocks(src, dst, [(0, -1)])
    with pytest.raises(ValueError, match="bytes per block"):
        swap_blocks(src, torch.zeros(3, 4), pairs)
    with pytest.raises(ValueError, match="contiguous"):
        swap_blocks(torch.zeros(8, 4).t(), dst, pairs)
    with pytest.raises(ValueError, match="int64"):
        ops.kv_swap_blocks(src, dst, pairs.int(), 0, "auto", 0)
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        ops.kv_swap_blocks(src, dst, torch.zeros(2, 3, dtype=torch.int64), 0, "auto", 0)
    with pytest.raises(ValueError, match="share memory"):
        swap_blocks(src[:3], src[1:], pairs)
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        swap_blocks(src, dst, pairs, method="fast")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        swap_blocks(src, dst, pairs, method="kernel")
    assert torch.all(dst == 0)
