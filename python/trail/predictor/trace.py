"""Trace files: what a model answered to a set of prompts, the data every later step reads.

A trace is JSON lines (optionally gzip-compressed, `.gz`): a header line
`{"format": "trail-trace", "version": 1, "settings": {...}}` recording the model and decoding
settings, then one line per request:
`{"id", "source", "prompt", "prompt_ids", "output_ids", "output_len", "hit_cap", "finish"}`.
`prompt_ids` is the templated prompt the model saw; `output_ids` the generated tokens including
the final EOS when there is one, so `output_len` counts decode steps and `hit_cap` is True when
the request stopped at `max_new_tokens` without an EOS. Appending is how `trail collect` resumes;
a torn last line (a killed run) is dropped with a warning.

The reader checks what it reads against the header (`validate_records`): the header names
max_new_tokens; every output has 1..max_new_tokens tokens; an "eos" record ends in one of the
header's `eos_token_ids` (when the header lists them) and no record has an EOS id before its last
token; a "length" record has exactly max_new_tokens tokens. A record that breaks a rule is a
ValueError naming its line and id.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

FORMAT, VERSION = "trail-trace", 1


@dataclass
class TraceRecord:
    id: str
    source: str
    prompt: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish: str  # "eos" or "length"
    output_len: int = field(default=-1)
    hit_cap: bool = field(default=False)

    def __post_init__(self):
        if self.output_len < 0:
            self.output_len = len(self.output_ids)
        if self.output_len != len(self.output_ids):
            raise ValueError(f"trace record {self.id}: output_len {self.output_len} != "
                             f"{len(self.output_ids)} output ids")
        if self.finish not in ("eos", "length"):
            raise ValueError(f"trace record {self.id}: finish must be 'eos' or 'length', got {self.finish!r}")
        if not self.prompt_ids:
            raise ValueError(f"trace record {self.id}: empty prompt_ids")
        self.hit_cap = self.finish == "length"


@dataclass
class Trace:
    settings: dict
    records: list[TraceRecord]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def max_new_tokens(self) -> int:
        return int(self.settings["max_new_tokens"])

    def by_id(self) -> dict[str, TraceRecord]:
        return {r.id: r for r in self.records}

    def subset(self, ids: Iterable[str]) -> "Trace":
        keep = set(ids)
        return Trace(self.settings, [r for r in self.records if r.id in keep])


def _open(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def header_line(settings: dict) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "settings": settings})


def record_line(rec: TraceRecord) -> str:
    return json.dumps(asdict(rec), separators=(",", ":"))


def read_trace(path: str | os.PathLike, validate: bool = True) -> Trace:
    """Read a trace; `validate` checks every record against the header (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    lines = []
    try:
        with _open(path, "r") as f:
            for line in f:
                lines.append(line)
    except EOFError:  # a gzip stream cut off by a killed run
        logger.warning("%s: compressed stream is truncated; reading what is complete", path)
    if not lines:
        raise ValueError(f"{path}: empty trace file")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: first line is not a trace header ({exc})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trail trace (header format {head.get('format') if isinstance(head, dict) else head!r})")
    if head.get("version") != VERSION:
        raise ValueError(f"{path}: trace version {head.get('version')} is not supported (want {VERSION})")
    records, seen, lines_of = [], set(), []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = TraceRecord(**json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                logger.warning("%s: dropping a torn last line", path)
                continue
            raise ValueError(f"{path}:{i}: not valid JSON") from None
        except TypeError as exc:
            raise ValueError(f"{path}:{i}: bad record ({exc})") from None
        if rec.id in seen:
            raise ValueError(f"{path}:{i}: duplicate request id {rec.id}")
        seen.add(rec.id)
        records.append(rec)
        lines_of.append(i)
    settings = head.get("settings")
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: trace header has no settings object")
    if validate:
        validate_records(settings, records, str(path), lines_of)
    return Trace(settings, records)


def validate_records(settings: dict, records: list[TraceRecord], where: str = "trace",
                     line_numbers: list[int] | None = None) -> None:
    """The checks of the module docstring; ValueError at the first record that fails one."""
    mnt = settings.get("max_new_tokens")
    if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1:
        raise ValueError(f"{where}: header settings need max_new_tokens (a positive integer), got {mnt!r}")
    eos_ids = settings.get("eos_token_ids")
    if eos_ids is not None and (not isinstance(eos_ids, list) or not all(isinstance(e, int) for e in eos_ids)):
        raise ValueError(f"{where}: header eos_token_ids must be a list of token ids, got {eos_ids!r}")
    eos = set(eos_ids or ())
    for j, r in enumerate(records):
        at = f"{where}:{line_numbers[j]}" if line_numbers else where
        if not 1 <= r.output_len <= mnt:
            raise ValueError(f"{at}: record {r.id} has {r.output_len} output tokens, not in 1..max_new_tokens={mnt}")
        if r.finish == "length" and r.output_len != mnt:
            raise ValueError(f"{at}: record {r.id} finished by 'length' after {r.output_len} tokens, but "
                             f"max_new_tokens is {mnt} (a length stop has exactly max_new_tokens tokens)")
        if eos:
            if r.finish == "eos" and r.output_ids[-1] not in eos:
                raise ValueError(f"{at}: record {r.id} finished by 'eos' but its last token {r.output_ids[-1]} is not "
                                 f"one of the header's eos_token_ids {sorted(eos)}")
            early = next((k for k, t in enumerate(r.output_ids[:-1]) if t in eos), None)
            if early is not None:
                raise ValueError(f"{at}: record {r.id} has EOS id {r.output_ids[early]} at output position {early}, "
                                 f"before its last token (generation should have stopped there)")


class TraceWriter:
    """Appends records to a trace, writing the header first when the file is new. With an
    existing file the settings must match (resume), else a ValueError names the difference."""

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        self.done: set[str] = set()
        if self.path.is_file() and self.path.stat().st_size > 0:
            old = read_trace(self.path)
            diff = {k: (old.settings.get(k), v) for k, v in settings.items()
                    if k in _RESUME_KEYS and old.settings.get(k) != v}
            if diff:
                raise ValueError(f"{self.path}: cannot resume, settings differ (old, new): {diff}")
            self.done = {r.id for r in old.records}
            self._repair_tail()
            self._f = _open(self.path, "a")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = _open(self.path, "w")
            self._f.write(header_line(settings) + "\n")
            self._f.flush()

    def _repair_tail(self) -> None:
        """Cut a torn last line so appended records start on a fresh line (plain files only)."""
        if self.path.suffix == ".gz":
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def write(self, rec: TraceRecord) -> None:
        self._f.write(record_line(rec) + "\n")
        self.done.add(rec.id)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# settings that change what a trace means; others (batch size, backend) may differ on resume
_RESUME_KEYS = ("model", "max_new_tokens", "temperature", "top_p", "repetition_penalty",
                "chat_template", "seed", "eos_token_ids")
