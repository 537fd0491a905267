"""The CUDA-graph buckets: the decode batch sizes and the mixed-step token counts that
`ModelRunner.capture_graphs` captures (the engine picks them from its config), and the bucket a
step is padded to (`ModelRunner.prepare_plan`)."""
from __future__ import annotations

import bisect
from collections.abc import Sequence


DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def graph_batch_sizes(max_batch: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The decode batch sizes captured as CUDA graphs: `sizes` (default DEFAULT_GRAPH_SIZES) below
    `max_batch`, plus `max_batch` itself, so every decode batch has a bucket."""
    base = DEFAULT_GRAPH_SIZES if sizes is None else sizes
    return sorted({int(b) for b in base if 1 <= b < max_batch} | {max_batch})


MAX_MIXED_GRAPH_TOKENS = 8192


def mixed_token_sizes(max_tokens: int, rows: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The token buckets of the mixed-step graphs (`rows` rows each): `sizes`, or a ladder from
    just above `rows` growing by ~1.25x (multiples of 16, so a step pads by at most ~25%) up to
    min(max_tokens, MAX_MIXED_GRAPH_TOKENS) + rows (a step of up to `max_tokens` tokens plus one
    token per pad row). Larger steps run eager."""
    if sizes is not None:
        return sorted({int(t) for t in sizes})
    top = min(max_tokens, MAX_MIXED_GRAPH_TOKENS) + rows
    out, t = [], -(-(rows + 16) // 16) * 16
    while t < top:
        out.append(t)
        t = max(t + 16, round(t * 1.25 / 16) * 16)
    return out + [top]


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest size >= n in sorted `sizes` (None: above all of them)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None
