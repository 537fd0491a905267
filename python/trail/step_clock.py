"""Bookkeeping of one engine step: the pinned buffers its device results land in, the record of a
step in flight (launched, not yet synced), and the clock of its phases (host time per phase; with
`profile_phases` on CUDA, device time from events recorded between phases, read after the step's
own sync)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch


class HostBuffers:
    """Pinned landing buffers of one step's device results: predictions by slot, tokens by
    sampling row."""

    def __init__(self, slots: int, rows: int, pinned: bool):
        self.preds = torch.zeros(slots, dtype=torch.float32, pin_memory=pinned)
        self.tokens = torch.zeros(rows, dtype=torch.int64, pin_memory=pinned)


@dataclass
class InFlight:
    """A launched step, until `_complete` syncs and postprocesses it."""
    index: int
    now: float
    plan: object                  # the core's AppliedPlan
    rows: np.ndarray              # the plan's rows that run
    sampled_rows: np.ndarray      # the rows that draw a token, in token order
    tokens: torch.Tensor          # pinned host, filled by the step's copy
    preds: torch.Tensor | None    # pinned host, the probe's readout by slot
    t_dev: object                 # CUDA events around the step's device work (None on CPU)
    end: object
    clock: "PhaseClock"


class PhaseClock:
    """Host time per phase of one step and, on CUDA when profiling, device time of the device
    phases (events recorded between them; read once the step has synced)."""

    def __init__(self, device):
        self.cuda = device is not None and device.type == "cuda"
        self.profiling = device is not None
        self.t = time.perf_counter()
        self.host: dict[str, float] = {}
        self.events: list[tuple[str, torch.cuda.Event]] = []

    @staticmethod
    def _event():
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def mark(self, phase: str, device: bool = False) -> None:
        t = time.perf_counter()
        self.host[phase] = t - self.t
        self.t = t
        if device and self.cuda and self.profiling:
            self.events.append((phase, self._event()))

    def resume(self) -> None:
        """Host time from here on counts for this step again (with overlap, other steps' work
        ran in between)."""
        self.t = time.perf_counter()

    def get(self, phase: str) -> float:
        return self.host.get(phase, 0.0)

    def total(self) -> float:
        return sum(self.host.values())

    def report(self, rows: int, tokens: int) -> dict:
        out = {"rows": rows, "tokens": tokens, **{f"host_{k}_s": v for k, v in self.host.items()}}
        for (_, a), (name, b) in zip(self.events, self.events[1:]):
            out[f"device_{name}_s"] = a.elapsed_time(b) / 1e3
        return out


def record_event(device: torch.device):
    """A timing event on the current CUDA stream (None off CUDA)."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def collect_device_time(telemetry, pending: tuple | None) -> None:
    """Fills the device time of a completed step's telemetry row from its events (start, end,
    row index), read after a later sync so no sync of its own. Returns None (nothing pending)."""
    if pending is None:
        return None
    start, end, index = pending
    if index < len(telemetry.steps):
        row = list(telemetry.steps[index])
        row[-1] = start.elapsed_time(end) / 1e3
        telemetry.steps[index] = tuple(row)
    return None
