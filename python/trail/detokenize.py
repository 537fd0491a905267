"""Incremental detokenization: the text a request's new tokens add, without decoding the whole
output every step, and without emitting half a multi-byte character (a token that ends inside a
UTF-8 sequence decodes to U+FFFD until the next token completes it). Stop strings are found here.
"""
from __future__ import annotations

from trail.request import Request

_PREFIX_WINDOW = 6   # tokens of context re-decoded so that merges at the boundary come out right


def text_delta(tokenizer, req: Request) -> str:
    """Appends the text of `req.output_ids[req.read_offset:]` to `req.text` when it is complete;
    returns what was appended (possibly '')."""
    if tokenizer is None:
        return ""
    ids = req.output_ids
    prefix_text = tokenizer.decode(ids[req.prefix_offset:req.read_offset], skip_special_tokens=True)
    new_text = tokenizer.decode(ids[req.prefix_offset:], skip_special_tokens=True)
    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
        return ""
    delta = new_text[len(prefix_text):]
    req.prefix_offset = max(req.read_offset, len(ids) - _PREFIX_WINDOW)
    req.read_offset = len(ids)
    req.text += delta
    return delta


def find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> int:
    """The index where the first stop string that overlaps the last `new_chars` characters
    starts, or -1."""
    if not stops or new_chars <= 0:
        return -1
    longest = max(len(s) for s in stops)
    lo = max(0, len(text) - new_chars - longest + 1)
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    return min(hits) if hits else -1
