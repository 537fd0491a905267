"""The fused rotary (q and k out of the qkv projection) and SiLU-and-multiply kernels: Triton
(under TRITON_INTERPRET=1 on CPU) and the torch references against float64 on fresh random
data, fp32 and bf16, GQA shapes, positions anywhere in the table."""
import pytest
import torch
from tolerances import assert_close_ulps

from trail_kernels.rotary import rotary_qk, rotary_qk_reference, silu_mul, silu_mul_reference


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def exact_rotary(qkv, positions, inv_freq, heads, kvh, d):
    t = qkv.shape[0]
    x = qkv[:, :(heads + kvh) * d].double().reshape(t, heads + kvh, d)
    ang = positions.double()[:, None] * inv_freq.double()[None, :]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out[:, :heads], out[:, heads:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kvh,d", [(9, 3, 64), (4, 1, 128), (6, 6, 32)], ids=["smollm2", "g4-d128", "mha"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rotary_qk_matches_float64(seeded, dtype, heads, kvh, d, impl):
    t, max_pos = 13, 300
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.arange(max_pos).double()[:, None] * inv[None, :]
    cos, sin = ang.cos().float().to(dev()), ang.sin().float().to(dev())
    # the projection's row holds q, k, v heads (and the layout has v after k, untouched here)
    qkv = (3 * torch.randn(t, (heads + 2 * kvh) * d, generator=seeded)).to(dtype).to(dev())
    positions = torch.randint(0, max_pos, (t,), generator=seeded).to(dev())
    q, k = rotary_qk(qkv, positions, cos, sin, heads, kvh, d, impl=impl)
    assert q.shape == (t, heads, d) and k.shape == (t, kvh, d) and q.dtype == dtype
    eq, ek = exact_rotary(qkv.cpu(), positions.cpu(), inv, heads, kvh, d)
    # fp32 tables (~1 ulp of fp32 each) times |x| ~ 10, then one rounding to the dtype
    ulps = 64 if dtype == torch.float32 else 2
    assert_close_ulps(q, eq, dtype=dtype, ulps=ulps, scale=10.0)
    assert_close_ulps(k, ek, dtype=dtype, ulps=ulps, scale=10.0)


def test_rotary_triton_equals_reference_and_checks_shapes(seeded):
    qkv = torch.randn(5, (4 + 2 * 2) * 16, generator=seeded).to(dev())
    cos, sin = torch.rand(40, 8, generator=seeded).to(dev()), torch.rand(40, 8, generator=seeded).to(dev())
    pos = torch.tensor([0, 39, 7, 7, 20], device=dev())
    a = rotary_qk(qkv, pos, cos, sin, 4, 2, 16, impl="triton")
    b = rotary_qk_reference(qkv, pos, cos, sin, 4, 2, 16)
    for x, y in zip(a, b):
        assert_close_ulps(x, y, ulps=4)
    with pytest.raises(ValueError, match="qkv"):
        rotary_qk(qkv[:, :100], pos, cos, sin, 4, 2, 16)
    with pytest.raises(ValueError, match="cos / sin"):
        rotary_qk(qkv, pos, cos[:, :4], sin[:, :4], 4, 2, 16)
    with pytest.raises(ValueError, match="positions"):
        rotary_qk(qkv, pos[:3], cos, sin, 4, 2, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [48, 1536, 1100])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_silu_mul_matches_float64(seeded, dtype, n, impl):
    x = (4 * torch.randn(7, 2 * n, generator=seeded)).to(dtype).to(dev())
    y = silu_mul(x, impl=impl)
    g, u = x.double().cpu().chunk(2, dim=-1)
    exact = g * torch.sigmoid(g) * u
    assert y.shape == (7, n) and y.dtype == dtype
    assert_close_ulps(y, exact, dtype=dtype, ulps=16 if dtype == torch.float32 else 2, scale=1.0)
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul(x[:, :-1], impl=impl)


def test_silu_mul_float64_stays_float64(seeded):
    x = torch.randn(3, 10, dtype=torch.float64, generator=seeded)
    g, u = x.chunk(2, dim=-1)
    assert torch.equal(silu_mul_reference(x), torch.nn.functional.silu(g) * u)
