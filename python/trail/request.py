"""What a user hands the engine and what comes back: `SamplingParams` (validated once, at
`add_request`), `Request` (the engine's record of one request: tokens, text, metrics) and
`RequestOutput` (one step's news about one request: new tokens, text delta, finish reason).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Sequence

from trail.sampling import _is_int, validate_params

MAX_NEW_TOKENS = 2**31 - 1       # an int32 column of the step buffers


class FinishReason(str, Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_new_tokens reached
    ABORT = "abort"      # abort(id)
    ERROR = "error"      # a fault this request caused (its text decoding failed) or a dead device


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. `temperature == 0` is greedy; `top_k = 0` and
    `top_p = 1` disable those filters; `seed` fixes the request's draws whatever its batch.
    `stop_token_ids` end the request in addition to the model's EOS ids (unless `ignore_eos`,
    which ignores only the EOS ids); `stop` strings end it when they appear in the text (the
    returned text stops before them; streamed text never runs past a stop string's start).
    `detokenize`: produce text (False: token ids only, no decoding cost).
    `replay_length`: stop after exactly this many tokens, EOS ignored (a benchmark
    replaying recorded output lengths, so every policy does the same work); the predictor and the
    scheduler still see `max_new_tokens` as the cap, so the replayed length never leaks into
    predictions.
    Ranges (checked at construction, types strict: no bool or str for a number, no float for an
    integer): temperature 0 or in [1e-6, 1e6], top_p in [1e-6, 1], repetition_penalty in
    [1e-6, 1e6] (float32 on the device: `trail.sampling.MIN_TEMPERATURE` says why), top_k in
    [0, 2**31), seed in [0, 2**63), max_new_tokens in [1, 2**31)."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    detokenize: bool = True
    replay_length: int | None = None

    def __post_init__(self):
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if isinstance(value, str) and name == "stop":
                value = (value,)
            elif isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
                raise ValueError(f"SamplingParams: {name} must be a sequence of "
                                 f"{'integers' if name == 'stop_token_ids' else 'strings'}, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self.validate()
        # numpy scalars as the Python numbers they equal exactly (after the checks: no coercion)
        for name in ("max_new_tokens", "top_k", "seed", "replay_length"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def validate(self) -> None:
        """Raises ValueError naming the first bad field, its value and the allowed range. Types are
        strict: integers are int (or numpy integers), never bool or float; numbers are int or
        float, never bool or str; flags are bool. Temperature, top_p and repetition_penalty are
        bounded where float32 on the device keeps them finite (`trail.sampling.validate_params`)."""
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")

        def got(value):
            return f"got {value!r} ({type(value).__name__})"

        if not (_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS):
            bad(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], {got(self.max_new_tokens)}")
        validate_params(self, "SamplingParams")
        for i, t in enumerate(self.stop_token_ids):
            if not (_is_int(t) and t >= 0):
                bad(f"stop_token_ids[{i}] must be a non-negative integer (a token id), {got(t)}")
        for i, s in enumerate(self.stop):
            if not (isinstance(s, str) and s):
                bad(f"stop[{i}] must be a non-empty string, {got(s)}")
        for name in ("ignore_eos", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a bool (True or False), {got(getattr(self, name))}")
        if self.replay_length is not None and not (_is_int(self.replay_length)
                                                   and 1 <= self.replay_length <= self.max_new_tokens):
            bad(f"replay_length must be None or an integer in [1, max_new_tokens={self.max_new_tokens}], "
                f"{got(self.replay_length)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestMetrics:
    """Times are seconds on the engine's clock (0 = the engine's start)."""
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    preemptions: dict[str, int] = field(default_factory=lambda: {"keep": 0, "swap": 0, "recompute": 0})
    forced_preemptions: int = 0
    swapped_out_blocks: int = 0
    recomputed_tokens: int = 0
    prompt_prediction: float | None = None
    # (generated, predicted remaining) after each step the filter updated; true remaining = final - generated
    predictions: list[tuple[int, float]] = field(default_factory=list)

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def prediction_mae(self, final_length: int) -> float | None:
        """Mean |predicted remaining - true remaining| over the steps the request was predicted."""
        if not self.predictions:
            return None
        return sum(abs(p - (final_length - g)) for g, p in self.predictions) / len(self.predictions)

    def as_dict(self, final_length: int | None = None) -> dict:
        # shallow copies of the per-token lists: dataclasses.asdict deep-copies every (g, value)
        # tuple, ~3 ms per finished 128-token request on a slow CPU, inside the engine's step
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["token_times"], d["predictions"] = list(self.token_times), list(self.predictions)
        d["preemptions"] = dict(self.preemptions)
        d["latency"], d["ttft"] = self.latency, self.ttft
        if final_length is not None:
            d["prediction_mae"] = self.prediction_mae(final_length)
        return d


@dataclass(eq=False)
class Request:
    """The engine's record of one request (host side; the hot path reads the engine's per-slot
    numpy arrays, not these objects)."""
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    prompt_text: str | None = None
    true_length: int | None = None
    slot: int = -1
    serial: int = -1                   # the id the scheduler knows it by (never reused)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    stream: object | None = None       # its detokenize.IncrementalText (None: no text)
    error: str | None = None           # why it ended with FinishReason.ERROR
    sent_tokens: int = 0
    sent_chars: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TokenPrefix(Sequence):
    """The first `n` tokens of a request's growing output list, as a read-only sequence: built in
    O(1) each step (the engine never copies a request's tokens per step); it compares equal to a
    list or tuple of the same ids; `list(...)` makes a copy. Appends after `n` never show."""
    __slots__ = ("_ids", "_n")

    def __init__(self, ids: list[int], n: int):
        self._ids, self._n = ids, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._ids[:self._n][i]
        if not -self._n <= i < self._n:
            raise IndexError("token index out of range")
        return self._ids[i % self._n]

    def __iter__(self):
        return iter(self._ids[:self._n])

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, TokenPrefix)):
            return len(other) == self._n and list(self) == list(other)
        return NotImplemented

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class RequestOutput:
    """One step's news about one request. `token_ids` / `text` are everything so far (a streaming
    output's `token_ids` is a `TokenPrefix` view, the final output's a list); `new_token_ids` /
    `text_delta` what this step added: the deltas concatenate to the final ids and text."""
    request_id: int
    new_token_ids: list[int]
    text_delta: str
    token_ids: Sequence[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    prompt_ids: Sequence[int] = ()
    error: str | None = None     # set with FinishReason.ERROR

    def as_dict(self) -> dict:
        return {"request_id": self.request_id, "token_ids": list(self.token_ids), "text": self.text,
                "finish_reason": None if self.finish_reason is None else self.finish_reason.value,
                "error": self.error,
                "metrics": self.metrics.as_dict(len(self.token_ids))}
