"""Incremental detokenization: the text a request's new tokens add, without decoding the whole
output every step, and without emitting half a multi-byte character (a token that ends inside a
UTF-8 sequence decodes to U+FFFD until the next token completes it). Stop strings are found here.

`IncrementalText` (one per request) is the streaming detokenizer: it decodes only the new tokens
(the prefix-offset / read-offset technique of vLLM and HF's TextStreamer: the tokens since the
last emission are decoded with the previous chunk as context, so merges and leading spaces at
the boundary come out right), finds stop strings in the new text (a match may start in text
held back earlier) and holds back any tail that could still be the start of a stop string. So
the concatenation of every delta it returns always equals its final text, and nothing past a
stop string's first character is ever streamed. `push_many` advances many requests in one call.

    det = IncrementalText(tokenizer, prompt_ids, stop=("\\n\\n",))
    delta, stopped = det.push([token])        # each step
    tail = det.finish()                       # the request ended for another reason (EOS, length)
    det.text                                  # everything streamed so far (== final text at the end)

"""
from __future__ import annotations

from typing import Callable, Sequence


_PROMPT_CONTEXT = 5  # prompt tokens decoded as context of the first output token (vLLM's choice)
_INCOMPLETE = "\ufffd"


def _decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[list[int]]], list[str]]:
    """Decodes a list of token id lists. A fast (Rust) tokenizer is called directly, one sequence
    at a time (the transformers wrapper costs ~5x the decode itself; the Rust batch call saves
    nothing on the 1-3 token windows decoded here); no tokenization-space
    clean-up, which is not prefix-stable (transformers 5 ignores it for BPE tokenizers anyway)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        dec = backend.decode
        return lambda seqs: [dec(s, skip_special_tokens=skip_special_tokens) for s in seqs]
    return lambda seqs: [tokenizer.decode(s, skip_special_tokens=skip_special_tokens,
                                          clean_up_tokenization_spaces=False) for s in seqs]


class IncrementalText:
    """The streamed text of one request.

    tokenizer: an HF tokenizer (fast or slow); prompt_ids: the prompt (its last few tokens are the
    context of the first output token; dropped if they end inside a character); stop: stop
    strings (the text ends before the first one to complete: the match with the smallest end,
    the longest of those ending there); skip_special_tokens: as in `tokenizer.decode`.

    `push(new_ids) -> (delta, stopped)`; `finish() -> tail` when the request ends for another
    reason; `text`: everything returned so far (after a stop or `finish()`, the final text);
    `held_back`: decoded text not returned yet; `stopped`, `stop_string`: whether and which stop
    string ended it; `finished`: stopped or finished. For a byte-level BPE tokenizer (Llama 3,
    SmolLM2, Qwen2) the final text is `tokenizer.decode(output_ids, skip_special_tokens=...)`
    cut before the stop string; a SentencePiece tokenizer keeps the leading space of the first
    output token (with the prompt as context), which a decode of the output alone strips.
    """

    __slots__ = ("_decode", "stop", "_longest", "_ids", "_prefix", "_read", "_prefix_text", "_pending",
                 "_parts", "_text", "stopped", "stop_string", "finished")

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True):
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._decode = _decoder(tokenizer, skip_special_tokens)
        self.stop = tuple(stop)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._ids: list[int] = [int(t) for t in list(prompt_ids)[-_PROMPT_CONTEXT:]]
        self._prefix, self._read = 0, len(self._ids)     # ids[prefix:read]: context; ids[read:]: not yet text
        self._prefix_text: str | None = None if self._ids else ""
        self._pending = ""        # decoded, not returned yet (may start a stop string)
        self._parts: list[str] = []     # what was returned
        self._text: str | None = ""
        self.stopped = False
        self.stop_string: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        """Everything returned so far (the final text once stopped or finished)."""
        if self._text is None:
            self._text = "".join(self._parts)
            self._parts = [self._text]
        return self._text

    @property
    def held_back(self) -> str:
        """Decoded text not returned yet: a tail that may be the start of a stop string."""
        return self._pending

    # ---- one request -----------------------------------------------------------------------------
    def push(self, new_ids: Sequence[int]) -> tuple[str, bool]:
        """Adds the request's new tokens; returns (the text that can be streamed now, stopped).
        Once stopped or finished, further tokens are ignored (-> ('', stopped))."""
        return push_many((self,), (new_ids,))[0]

    def finish(self) -> str:
        """The request ended for another reason (EOS, a stop id, its length, an abort): decodes any
        tokens still waiting for the rest of a character (they stay U+FFFD, as a full decode
        shows them), applies the stop strings to that text and returns all that was held back."""
        if self.finished:
            return ""
        self.finished = True
        if self._read < len(self._ids):
            prefix_text = self._prefix_text
            if prefix_text is None:
                self._set_context(self._decode([self._ids[self._prefix:self._read]])[0])
                prefix_text = self._prefix_text
            new_text = self._decode([self._ids[self._prefix:]])[0]
            self._append(new_text[len(prefix_text):])
            self._prefix, self._read = self._read, len(self._ids)
        return self._emit(hold=False)

    # ---- internals -------------------------------------------------------------------------------
    def _set_context(self, text: str) -> None:
        if text.endswith(_INCOMPLETE):       # the prompt ends inside a character: no context
            del self._ids[:self._read]
            self._prefix = self._read = 0
            text = ""
        self._prefix_text = text

    def _advance(self, texts: list[str]) -> tuple[str, bool]:
        """`texts`: the decodes of `push_many`'s jobs: [context, if not known yet,] ids[prefix:]
        (the new text with its context), ids[read:] (the next context, if this step emits)."""
        if self._prefix_text is None:
            self._set_context(texts[0])
            texts = texts[1:] if self._read else texts[2:] * 2   # context dropped: ids[read:] is the new text
        new_text = texts[0]
        prefix_len = len(self._prefix_text)
        if len(new_text) <= prefix_len or new_text[-1] == _INCOMPLETE:
            return "", False                   # nothing new yet, or a character still incomplete
        self._append(new_text[prefix_len:])
        ids = self._ids
        if self._read > 64:                    # the ids before the context are never read again
            del ids[:self._read]
            self._read = 0
        self._prefix, self._read = self._read, len(ids)
        self._prefix_text = texts[1]
        if self.stopped:
            self.finished = True
            return self._emit(hold=False), True
        return self._emit(hold=True), False

    def _append(self, delta: str) -> None:
        """Adds decoded text to the held-back tail and cuts it before the stop string that
        completes first (the smallest end; of those ending there, the longest), whatever the
        chunks the text came in. A match that ended earlier was found then, so only matches
        ending in `delta` count; they start in `delta` or in the held-back tail (what was
        returned cannot start a stop: `_emit`)."""
        window = self._pending + delta
        if self.stop and not self.stopped:
            lo = max(0, len(self._pending) - self._longest + 1)
            hits = [(i + len(s), i, s) for s in self.stop if (i := window.find(s, lo)) >= 0]
            if hits:
                _, cut, self.stop_string = min(hits)
                window = window[:cut]
                self.stopped = True
        self._pending = window

    def _emit(self, hold: bool) -> str:
        """Returns the held-back text less (if `hold`) its longest tail that is a proper prefix of
        a stop string (a match starting there may still complete)."""
        w = self._pending
        end = len(w)
        if hold and self.stop:
            for s in self.stop:          # the earliest i with w[i:] a proper prefix of s
                first = s[0]
                i = w.find(first, max(0, len(w) - len(s) + 1))
                while 0 <= i < end:
                    if s.startswith(w[i:]):
                        end = i
                        break
                    i = w.find(first, i + 1)
        if end == 0:
            return ""
        delta, self._pending = w[:end], w[end:]
        self._parts.append(delta)
        self._text = None
        return delta


def push_many(streams: Sequence[IncrementalText], new_ids: Sequence[Sequence[int]]) -> list[tuple[str, bool]]:
    """`IncrementalText.push` of many requests in one call (the engine calls it once per step for
    the rows that want text): streams[i] gets new_ids[i] (a list of ints, or anything `int()`
    takes); returns (delta, stopped) per stream. Each stream decodes two short windows (three on
    its first tokens)."""
    if len(streams) != len(new_ids):
        raise ValueError(f"{len(streams)} streams for {len(new_ids)} id lists")
    out: list[tuple[str, bool]] = []
    for st, ids in zip(streams, new_ids):
        if st.finished or not len(ids):
            out.append(("", st.stopped))
            continue
        sid = st._ids
        before = len(sid)
        sid.extend(ids if type(ids) is list else [int(t) for t in ids])
        p, r = st._prefix, st._read
        jobs = [sid[p:], sid[r:]] if st._prefix_text is not None else [sid[p:r], sid[p:], sid[r:]]
        try:
            texts = st._decode(jobs)
        except BaseException:
            del sid[before:]            # the stream is as before the call: a retry is safe
            raise
        out.append(st._advance(texts))
    return out


IncrementalText.push_many = staticmethod(push_many)
