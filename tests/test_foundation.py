"""The build and the kernel dispatch: trail._C loads, reports its build, and its ops compute
what their plain definitions say; TRAIL_KERNELS picks the implementation."""
import os

import pytest
import torch

import trail
import trail_kernels
from trail_kernels.dispatch import use_triton


def test_native_info_reports_loaded_build():
    info = trail.native_info()
    assert info["build"] in ("cpu", "cuda")
    assert info["build_type"] == "Release"
    assert "-g " not in info["cxx_flags"] + " "
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if not torch.cuda.is_available():
        assert info["build"] == "cpu"


def _slot_mapping_python(tables, slot_ids, positions, block_size):
    out = []
    for s, p in zip(slot_ids.tolist(), positions.tolist()):
        if s < 0 or s >= tables.shape[0] or p < 0 or p // block_size >= tables.shape[1]:
            out.append(-1)
            continue
        b = int(tables[s, p // block_size])
        out.append(-1 if b < 0 else b * block_size + p % block_size)
    return torch.tensor(out, dtype=torch.int64)


def _random_case(gen, device):
    num_slots, max_blocks, block_size = 7, 9, 16
    tables = torch.randint(0, 1000, (num_slots, max_blocks), generator=gen, dtype=torch.int32)
    tables[torch.rand(num_slots, max_blocks, generator=gen) < 0.1] = -1
    n = 257
    slot_ids = torch.randint(-1, num_slots + 1, (n,), generator=gen, dtype=torch.int32)
    positions = torch.randint(0, max_blocks * block_size + 20, (n,), generator=gen, dtype=torch.int64)
    expected = _slot_mapping_python(tables, slot_ids, positions, block_size)
    return [t.to(device) for t in (tables, slot_ids, positions)], block_size, expected


def test_slot_mapping_cpu_matches_definition(seeded):
    (tables, slot_ids, positions), bs, expected = _random_case(seeded, "cpu")
    got = trail.ops.slot_mapping(tables, slot_ids, positions, bs)
    assert torch.equal(got, expected)
    assert (expected == -1).any() and (expected >= 0).any()


def test_slot_mapping_rejects_bad_input():
    tables = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        trail.ops.slot_mapping(tables, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64), 16)
    with pytest.raises(RuntimeError, match="entries but positions has"):
        trail.ops.slot_mapping(tables.int(), torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int64), 16)


@pytest.mark.gpu
def test_slot_mapping_cuda_matches_definition(seeded):
    assert trail.native_info()["build"] == "cuda"
    (tables, slot_ids, positions), bs, expected = _random_case(seeded, "cuda")
    got = trail.ops.slot_mapping(tables, slot_ids, positions, bs)
    assert torch.equal(got.cpu(), expected)


def test_dispatch_modes(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setenv("TRAIL_KERNELS", "reference")
    assert not use_triton(x)
    monkeypatch.setenv("TRAIL_KERNELS", "auto")
    assert use_triton(x) == (x.is_cuda and trail_kernels.triton_available())
    monkeypatch.setenv("TRAIL_KERNELS", "bogus")
    with pytest.raises(ValueError, match="TRAIL_KERNELS"):
        use_triton(x)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_triton_matches_float64(with_residual, dtype, seeded):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, d = 5, 96
    x = torch.randn(rows, d, generator=seeded).to(device, dtype)
    w = torch.randn(d, generator=seeded).to(device, dtype)
    r = torch.randn(rows, d, generator=seeded).to(device, dtype) if with_residual else None
    out = trail_kernels.rms_norm(x, w, 1e-6, residual=r, impl="triton")
    ref = trail_kernels.rms_norm_reference(x, w, 1e-6, residual=r)
    x64 = x.double() + (r.double() if with_residual else 0)
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    y, y_ref = (out[0], ref[0]) if with_residual else (out, ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(y_ref.double(), exact, rtol=tol, atol=tol)
    if with_residual:
        torch.testing.assert_close(out[1], ref[1])
