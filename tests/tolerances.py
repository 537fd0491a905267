"""Tolerances for kernel-vs-reference comparisons, scaled to the floating-point epsilon of the
values compared. A fixed absolute tolerance (say 1e-6) is a few ulps at |x| ~ 5 in float32 and
fails on CPUs whose vector units round a reduction differently (seen on AMD EPYC: 3 ulps at
|x| ~ 5.6). Here the allowed error is `ulps` units of the dtype's epsilon times the larger of the
element's magnitude and `scale` (the magnitude of the values the result was computed from:
cancellation leaves absolute, not relative, errors)."""
from __future__ import annotations

import torch


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 16,
                      dtype: torch.dtype = torch.float32, scale: float | None = None, msg=None) -> None:
    """|actual - expected| <= ulps * eps(dtype) * max(|expected|, scale), elementwise. `scale`
    defaults to max(1, max |expected|) over the finite entries."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if scale is None:
        finite = e[torch.isfinite(e)]
        scale = max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(a, e, rtol=ulps * eps, atol=ulps * eps * scale, msg=msg)
