"""Where the scheduler's predicted remaining lengths come from, chosen when the engine is built:
`ProbePredictions` (the probe's readout, by slot; the prompt predictor's estimate until a
request's prefill is done) or `RecordedPredictions` (values recorded in an earlier run, by request
id, replacing the probe's readout: a benchmark replaying a run; the probe still runs, for its cost).

The engine calls, per request: `bind(slot, request_id, prompt_prediction)` / `unbind(slot)`; per
step, after the tokens arrive: `observe(slots, fed, predicted, readout)` (the per-row values for
telemetry) and `refresh(readout)` (what the scheduler reads next: `values`, float32 by slot).
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


class ProbePredictions:
    """The probe's readout by slot; a slot whose request has no readout yet (its prefill not
    completed) keeps its prompt-time prediction. While `fallback` is set (the engine's drift guard,
    trail.drift_guard) every slot reads max(prompt prediction - tokens fed, 0) instead."""

    fallback = False

    def attach(self, max_slots: int) -> "ProbePredictions":
        self.values = torch.zeros(max_slots, dtype=torch.float32)   # what the scheduler reads
        self._prompt = np.zeros(max_slots, np.float32)
        self._fed = np.zeros(max_slots, np.float32)
        self._has_readout = np.zeros(max_slots, bool)
        return self

    def bind(self, slot: int, request_id: int, prompt_prediction: float) -> None:
        self._has_readout[slot] = False
        self._fed[slot] = 0
        self._prompt[slot] = self.values[slot] = prompt_prediction

    def unbind(self, slot: int) -> None:
        pass

    def observe(self, slots: np.ndarray, fed: np.ndarray, predicted: np.ndarray,
                readout: np.ndarray | None) -> np.ndarray | None:
        """`readout`: the probe's expected remaining by slot (None: no probe). `predicted`: rows
        the probe read (not recomputes). Returns the per-row value the scheduler will use."""
        self._fed[slots] = fed
        if readout is None:
            return None
        self._has_readout[slots[predicted]] = True
        return readout[slots].astype(np.float64)

    def refresh(self, readout: np.ndarray | None) -> None:
        sched = self.values.numpy()
        if self.fallback:
            np.subtract(self._prompt, self._fed, out=sched)
            np.maximum(sched, 0.0, out=sched)
            return
        if readout is not None:
            np.copyto(sched, readout)
        waiting = ~self._has_readout
        sched[waiting] = self._prompt[waiting]


class RecordedPredictions(ProbePredictions):
    """`values[request_id]`: element g is the predicted remaining output tokens once g output
    tokens were fed (the last one holds beyond the end). Requests without an entry use the probe."""

    def __init__(self, values: Mapping[int, Sequence[float]] | None = None):
        self._table: dict[int, np.ndarray] = {}
        for rid, vals in (values or {}).items():
            self.record(rid, vals)

    def record(self, request_id: int, values: Sequence[float]) -> None:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size == 0 or not np.isfinite(arr).all() or (arr < 0).any():
            raise ValueError(f"recorded predictions of request {request_id}: need a non-empty sequence of finite "
                             f"values >= 0")
        self._table[int(request_id)] = arr

    def attach(self, max_slots: int) -> "RecordedPredictions":
        super().attach(max_slots)
        self._by_slot: list[np.ndarray | None] = [None] * max_slots
        self._current = np.full(max_slots, math.nan)
        return self

    def bind(self, slot: int, request_id: int, prompt_prediction: float) -> None:
        super().bind(slot, request_id, prompt_prediction)
        self._by_slot[slot] = self._table.get(int(request_id))
        self._current[slot] = math.nan

    def unbind(self, slot: int) -> None:
        self._by_slot[slot] = None
        self._current[slot] = math.nan

    def observe(self, slots, fed, predicted, readout):
        out = super().observe(slots, fed, predicted, readout)
        if out is None:
            out = np.full(len(slots), math.nan)
        for i, (slot, g, ok) in enumerate(zip(slots.tolist(), fed.tolist(), predicted.tolist())):
            rec = self._by_slot[slot]
            if rec is not None:
                if ok:
                    self._current[slot] = rec[min(g, len(rec) - 1)]
                out[i] = self._current[slot]
        return out

    def refresh(self, readout) -> None:
        super().refresh(readout)
        held = np.flatnonzero(~np.isnan(self._current))
        self.values.numpy()[held] = self._current[held]


class PrefillOnlyPredictions(ProbePredictions):
    """The probe's first readout of a request (right after its prefill) only, counted down as
    tokens are fed: max(first readout + tokens fed then - tokens fed now, 0). The control that
    isolates the per-step filter (the simulator's `--predictions prefill`)."""

    def attach(self, max_slots: int) -> "PrefillOnlyPredictions":
        super().attach(max_slots)
        self._total = np.full(max_slots, math.nan)         # first readout + tokens fed when it came
        return self

    def bind(self, slot: int, request_id: int, prompt_prediction: float) -> None:
        super().bind(slot, request_id, prompt_prediction)
        self._total[slot] = math.nan

    def observe(self, slots, fed, predicted, readout):
        out = super().observe(slots, fed, predicted, readout)
        if out is None:
            return None
        first = predicted & np.isnan(self._total[slots])
        self._total[slots[first]] = readout[slots[first]] + fed[first]
        held = ~np.isnan(self._total[slots])
        out[held] = np.maximum(self._total[slots[held]] - fed[held], 0.0)
        return out

    def refresh(self, readout) -> None:
        super().refresh(readout)
        if self.fallback:
            return
        held = np.flatnonzero(~np.isnan(self._total))
        self.values.numpy()[held] = np.maximum(self._total[held] - self._fed[held], 0.0)


def prompt_prediction(predictor, ids, max_new: int, default: float) -> float:
    """The expected total output of one prompt from a prompt predictor (prompt ids -> one value
    per prompt), capped at max_new; `default` without a predictor or when it returns a value that
    is not finite and >= 0 (logged). A predictor that returns other than one value is an error."""
    if predictor is None:
        return min(default, float(max_new))
    got = np.asarray(predictor([ids]), dtype=np.float64).reshape(-1)
    if got.size != 1:
        raise ValueError(f"prompt_predictor returned {got.size} values for one prompt (want 1): {got[:4]!r}")
    value = float(got[0])
    if not math.isfinite(value) or value < 0:
        logger.warning("prompt predictor returned %r; using the prior mean", value)
        value = default
    return min(value, float(max_new))
