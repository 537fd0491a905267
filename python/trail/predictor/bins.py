"""Bins of remaining output length, and the request-hash split every step of the pipeline shares.

Edges `e_0 = 0 < e_1 < ... < e_K` (the last may be `inf`, an open-ended bin); a remaining length
r falls in bin k when e_k <= r < e_{k+1}, and anything >= e_{K-1} in the last bin (so the label
512 of a request that hit a 512 cap at g = 0 lands in [460.8, 512)). A bin's value is the mean
remaining length of the training labels in it, so an open-ended bin has a finite value.

Split: sha1 of the request id decides, independently of what else is in the trace: 10% test
(held out for evaluation), 10% validation (early stopping, filter fitting), 80% train. A probe
records the ids it saw (train + validation) as a compact set of 32-bit id hashes
(`encode_id_set`), so evaluation can keep exactly the requests it never saw, in any trace.
"""
from __future__ import annotations

import base64
import hashlib
import math
from typing import Sequence

import torch

TEST_PERCENT, VAL_PERCENT = 10, 10


def default_edges(num_bins: int = 10, upper: float = 512.0) -> list[float]:
    return [upper * k / num_bins for k in range(num_bins + 1)]


def validate_edges(edges: Sequence[float]) -> list[float]:
    try:
        edges = [float(e) for e in edges]
    except (TypeError, ValueError):
        raise ValueError(f"bin edges must be numbers, got {edges!r}") from None
    if len(edges) < 3:
        raise ValueError(f"bin edges need at least 3 values (2 bins), got {len(edges)}")
    if edges[0] != 0.0:
        raise ValueError(f"bin edges must start at 0, got {edges[0]}")
    if any(math.isnan(e) for e in edges) or any(math.isinf(e) for e in edges[:-1]):
        raise ValueError(f"bin edges must be finite (only the last may be inf): {edges}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bin edges must be strictly increasing: {edges}")
    if any(b - a < 1 for a, b in zip(edges[1:], edges[2:])):
        raise ValueError(f"bins above the first must be at least one token wide (the filter moves "
                         f"one token per step): {edges}")
    return edges


def parse_edges(text: str | None, num_bins: int = 10, upper: float = 512.0) -> list[float]:
    """`--bin-edges "0,32,64,...,inf"`; None -> equal width over [0, upper)."""
    if not text:
        return default_edges(num_bins, upper)
    return validate_edges([float(x) for x in text.split(",")])


def bin_index(remaining: torch.Tensor, edges: Sequence[float]) -> torch.Tensor:
    inner = torch.tensor(list(edges[1:-1]), dtype=torch.float64, device=remaining.device)
    return torch.bucketize(remaining.to(torch.float64), inner, right=True)


def bin_values(remaining: torch.Tensor, edges: Sequence[float]) -> list[float]:
    """Mean label per bin; an empty bin gets its midpoint (its lower edge + 1 if open-ended)."""
    idx = bin_index(remaining, edges)
    k = len(edges) - 1
    out = []
    for b in range(k):
        sel = remaining[idx == b]
        if sel.numel():
            out.append(float(sel.double().mean()))
        elif math.isinf(edges[b + 1]):
            out.append(float(edges[b]) + 1.0)
        else:
            out.append(0.5 * (edges[b] + edges[b + 1]))
    return out


def label_prior(remaining: torch.Tensor, edges: Sequence[float]) -> list[float]:
    """Bin frequencies of the training labels (the `pi` the filter divides by), Laplace-smoothed
    so no bin has zero prior mass."""
    k = len(edges) - 1
    counts = torch.bincount(bin_index(remaining, edges), minlength=k).double() + 1.0
    return (counts / counts.sum()).tolist()


def split_of(request_id: str) -> str:
    h = int.from_bytes(hashlib.sha1(request_id.encode("utf-8")).digest()[:8], "big") % 100
    if h < TEST_PERCENT:
        return "test"
    if h < TEST_PERCENT + VAL_PERCENT:
        return "val"
    return "train"


def id_hash32(request_id: str) -> int:
    """32 bits of sha1(id), independent of the split's bits (bytes 8..12)."""
    return int.from_bytes(hashlib.sha1(request_id.encode("utf-8")).digest()[8:12], "little")


def encode_id_set(ids: Sequence[str]) -> str:
    """base64 of the sorted, distinct 32-bit hashes of `ids` (4 bytes per id)."""
    hs = sorted({id_hash32(i) for i in ids})
    return base64.b64encode(b"".join(h.to_bytes(4, "little") for h in hs)).decode("ascii")


def decode_id_set(text: str) -> set[int]:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise ValueError("id set: length is not a multiple of 4 bytes")
    return {int.from_bytes(raw[i: i + 4], "little") for i in range(0, len(raw), 4)}
