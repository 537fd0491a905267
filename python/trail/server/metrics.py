"""What the engine core reports and how `/metrics` shows it.

`WindowTelemetry` replaces an `LLMEngine`'s `Telemetry` in the engine core process: a server runs
for days, so per-step rows are folded into running totals once they leave a window of recent
steps (the window keeps step-time quantiles) and finished requests are not kept (their online
prediction error is still accumulated). `prometheus_text(stats)` renders the core's stats
snapshot (trail.server.core) and the front end's counters as Prometheus text (format 0.0.4).
"""
from __future__ import annotations

import math

from trail.telemetry import STEP_FIELDS, Telemetry

_SUMMED = ("tokens", "prefill_tokens", "keep", "swap", "recompute", "forced", "swap_out_bytes", "swap_in_bytes",
           "recomputed_tokens", "host_s", "sync_wait_s", "device_s")
_IDX = {name: i for i, name in enumerate(STEP_FIELDS)}


class _StepWindow:
    """A list of step rows indexed by absolute step-row number (as `Telemetry.steps` is: the
    engine writes a row's device time later, by index) that folds rows older than the window
    into `fold(row)`. The newest `keep` rows are always retained."""

    def __init__(self, keep: int, fold):
        self._rows: list[tuple] = []
        self._offset = 0
        self._keep = max(1, keep)
        self._fold = fold

    def append(self, row: tuple) -> None:
        self._rows.append(row)
        if len(self._rows) >= 2 * self._keep:
            old, self._rows = self._rows[:self._keep], self._rows[self._keep:]
            for r in old:
                self._fold(r)
            self._offset += len(old)

    def _index(self, i: int) -> int:
        j = (i + len(self) if i < 0 else i) - self._offset
        if not 0 <= j < len(self._rows):
            raise IndexError(f"step row {i} is no longer in the window")
        return j

    def __len__(self) -> int:
        return self._offset + len(self._rows)

    def __getitem__(self, i: int) -> tuple:
        return self._rows[self._index(i)]

    def __setitem__(self, i: int, row: tuple) -> None:
        self._rows[self._index(i)] = row

    def __iter__(self):
        return iter(self._rows)

    def retained(self) -> list[tuple]:
        return list(self._rows)


class WindowTelemetry(Telemetry):
    """`Telemetry` with bounded memory: totals over every step, rows of the last `window` to
    2 x `window` steps, no per-request records."""

    def __init__(self, window: int = 1024):
        super().__init__(keep_requests=False)
        self._folded = {name: 0.0 for name in _SUMMED}
        self._folded_steps = 0
        self.steps = _StepWindow(window, self._fold)

    def _fold(self, row: tuple) -> None:
        self._folded_steps += 1
        for name in _SUMMED:
            value = row[_IDX[name]]
            if not (isinstance(value, float) and math.isnan(value)):
                self._folded[name] += value

    def totals(self) -> dict:
        out = dict(self._folded)
        for row in self.steps:
            for name in _SUMMED:
                value = row[_IDX[name]]
                if not (isinstance(value, float) and math.isnan(value)):
                    out[name] += value
        out["steps"] = len(self.steps)
        out["online_prediction_mae"] = self.online_mae
        out["predicted_requests"] = self.mae_count
        out.update(self.fallback_totals())
        return out

    def recent_step_seconds(self) -> list[float]:
        """Host seconds (CPU time of the step + its sync wait) of the steps in the window that ran
        rows, oldest first."""
        return [r[_IDX["host_s"]] + r[_IDX["sync_wait_s"]] for r in self.steps.retained() if r[_IDX["rows"]] > 0]


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def _num(value) -> str:
    if value is None:
        return "NaN"
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples) -> None:
        """samples: a value, or a list of (labels dict, value) / (suffix, labels, value)."""
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        if not isinstance(samples, list):
            samples = [({}, samples)]
        for sample in samples:
            suffix, labels, value = sample if len(sample) == 3 else ("", *sample)
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            self.lines.append(f"{name}{suffix}{'{' + lab + '}' if lab else ''} {_num(value)}")


def prometheus_text(stats: dict | None, front: dict) -> str:
    """The /metrics page: the engine core's `stats` (None if the core is gone) and the front
    end's counters `front` (queued, in_engine, rejected, up)."""
    t = _Text()
    t.metric("trail_up", "gauge", "1 while the engine core runs", 1 if front.get("up") and stats else 0)
    t.metric("trail_requests_queued", "gauge", "requests waiting in the server for an engine slot (backpressure)",
             front.get("queued", 0))
    t.metric("trail_requests_rejected_total", "counter", "requests refused with 503 because the queue was full",
             front.get("rejected", 0))
    if stats:
        t.metric("trail_requests", "gauge", "requests in the engine by scheduler state",
                 [({"state": s}, stats[s]) for s in ("waiting", "running", "kept", "swapped")])
        t.metric("trail_requests_unfinished", "gauge", "requests the engine holds (any state)", stats["unfinished"])
        t.metric("trail_requests_finished_total", "counter", "finished requests by reason",
                 [({"reason": r}, n) for r, n in sorted(stats["finished"].items())])
        t.metric("trail_preemptions_total", "counter", "preemptions by mode",
                 [({"mode": m}, stats["totals"][m]) for m in ("keep", "swap", "recompute")])
        t.metric("trail_forced_preemptions_total", "counter", "preemptions forced by KV memory",
                 stats["totals"]["forced"])
        t.metric("trail_recomputed_tokens_total", "counter", "tokens prefilled again after a recompute preemption",
                 stats["totals"]["recomputed_tokens"])
        t.metric("trail_swap_bytes_total", "counter", "KV bytes swapped, by direction",
                 [({"direction": "out"}, stats["totals"]["swap_out_bytes"]),
                  ({"direction": "in"}, stats["totals"]["swap_in_bytes"])])
        t.metric("trail_prompt_tokens_total", "counter", "prompt tokens of accepted requests", stats["prompt_tokens"])
        t.metric("trail_generation_tokens_total", "counter", "tokens generated", stats["generation_tokens"])
        recent = stats["recent_step_s"]
        t.metric("trail_step_seconds", "summary",
                 "host time of an engine step (CPU work + its one sync); quantiles over the recent window",
                 [("", {"quantile": "0.5"}, _quantile(recent, 0.5)), ("", {"quantile": "0.99"}, _quantile(recent, 0.99)),
                  ("_sum", {}, stats["totals"]["host_s"] + stats["totals"]["sync_wait_s"]),
                  ("_count", {}, stats["totals"]["steps"])])
        t.metric("trail_step_device_seconds_total", "counter", "device time of the steps (CUDA events; 0 on CPU)",
                 stats["totals"]["device_s"])
        t.metric("trail_probe_online_mae_tokens", "gauge",
                 "mean over finished requests of mean |predicted - true remaining tokens| (NaN before any)",
                 stats["totals"]["online_prediction_mae"])
        t.metric("trail_probe_predicted_requests_total", "counter", "finished requests the probe predicted",
                 stats["totals"]["predicted_requests"])
        t.metric("trail_prediction_fallback", "gauge", "1 while the drift guard ranks by the prompt prediction "
                 "(the probe's recent error is worse than the prompt predictor's)",
                 int(stats["totals"]["prediction_fallback"]))
        t.metric("trail_kv_blocks_free", "gauge", "free KV blocks",
                 [({"pool": "gpu"}, stats["kv_free"]), ({"pool": "host"}, stats["host_free"])])
        t.metric("trail_kv_blocks", "gauge", "KV blocks in the pool",
                 [({"pool": "gpu"}, stats["kv_total"]), ({"pool": "host"}, stats["host_total"])])
    return "\n".join(t.lines) + "\n"
