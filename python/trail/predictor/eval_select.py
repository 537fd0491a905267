"""Which requests of a trace `trail eval-probe` evaluates, and whether the trace is comparable
with the probe's training trace.

Default (`split="auto"`): every request the probe never saw. A probe written by this version
records the ids it trained and validated on (`training.seen_ids`, bins.encode_id_set), so on its
own training trace this is exactly the test split, and on any other trace everything it did not
see (a trace it never saw: all of it). A probe without that record (older files) falls back to
the test split when the trace looks like its training trace (same request count and decoding
settings) and to the whole trace otherwise, with a warning. `train|val|test|all` choose by the id
hash split as before; `ids` / `limit` restrict further.
"""
from __future__ import annotations

import logging
from typing import Sequence

from trail.predictor import bins as B
from trail.predictor.eval_probe import select_requests
from trail.predictor.probe_file import ProbeSpec
from trail.predictor.trace import Trace

logger = logging.getLogger(__name__)

SPLITS = ("auto", "all", "train", "val", "test")
# decoding settings that change what the lengths mean
COMPARED = ("model", "max_new_tokens", "temperature", "top_p", "repetition_penalty", "chat_template")


def settings_differences(trace: Trace, spec: ProbeSpec) -> dict:
    """{key: (probe's training trace, this trace)} for the decoding settings that differ (only
    keys the probe recorded)."""
    ref = spec.training.get("trace") or {}
    return {k: (ref[k], trace.settings.get(k)) for k in COMPARED if k in ref and ref[k] != trace.settings.get(k)}


def warn_on_settings(trace: Trace, spec: ProbeSpec) -> dict:
    diff = settings_differences(trace, spec)
    if diff:
        logger.warning("this trace was decoded differently from the probe's training trace (probe's, this): %s; "
                       "lengths may not be comparable", diff)
    return diff


def choose_requests(trace: Trace, spec: ProbeSpec, split: str = "auto", ids: Sequence[str] | None = None,
                    limit: int | None = None) -> tuple[Trace, str]:
    """(sub-trace, a sentence saying what was kept and why)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    recs = trace.records
    if ids is not None:
        want = list(dict.fromkeys(ids))
        have = trace.by_id()
        missing = [i for i in want if i not in have]
        if missing:
            raise ValueError(f"{len(missing)} requested id(s) are not in the trace, e.g. {missing[:3]}")
        recs, how = [have[i] for i in want], f"{len(want)} requests named by id"
    elif split == "auto":
        seen_text = spec.training.get("seen_ids")
        if seen_text:
            seen = B.decode_id_set(seen_text)
            kept = [r for r in recs if B.id_hash32(r.id) not in seen]
            how = (f"{len(kept)} of {len(recs)} requests the probe never saw "
                   f"({len(recs) - len(kept)} train/validation requests excluded)")
            recs = kept
        elif _looks_like_training_trace(trace, spec):
            recs = [r for r in recs if B.split_of(r.id) == "test"]
            how = f"{len(recs)} test-split requests (the trace looks like the probe's training trace)"
        else:
            logger.warning("the probe records no training ids: evaluating the whole trace; if it overlaps the "
                           "probe's training trace, pass --split test")
            how = f"all {len(recs)} requests (a trace the probe did not train on)"
    else:
        recs = [r for r, keep in zip(recs, select_requests([r.id for r in recs], split)) if keep]
        how = f"{len(recs)} requests of split {split!r}"
    if limit is not None and len(recs) > limit:
        recs = recs[:limit]
        how += f", first {limit} kept (--limit)"
    if not recs:
        raise ValueError(f"no requests left to evaluate ({how})")
    logger.info("evaluating %s", how)
    return Trace(trace.settings, list(recs)), how


def _looks_like_training_trace(trace: Trace, spec: ProbeSpec) -> bool:
    n = spec.training.get("trace_requests")
    return n == len(trace) and not settings_differences(trace, spec)
