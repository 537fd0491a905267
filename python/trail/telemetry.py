"""What the engine measured: per step (rows, tokens, preemptions by kind, swapped bytes,
recomputed tokens, host and device time) and per finished request (arrival, first token, token
times, finish, preemptions, swaps, and its predicted remaining length over time against the truth,
with an online MAE so a user sees whether the shipped probe fits their traffic). JSON-exportable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from trail.jsonio import write_json

STEP_FIELDS = ("step", "t", "rows", "tokens", "prefill_tokens", "decode_rows", "keep", "swap", "recompute",
               "forced", "swap_out_bytes", "swap_in_bytes", "recomputed_tokens", "host_s", "sync_wait_s",
               "device_s")


@dataclass
class Telemetry:
    steps: list[tuple] = field(default_factory=list)     # rows of STEP_FIELDS
    requests: list[dict] = field(default_factory=list)   # finished requests (RequestMetrics.as_dict + ids)
    phases: list[dict] = field(default_factory=list)     # per step, when the engine profiles phases
    # the drift guard's switches: (engine time, ranking falls back to the prompt prediction, probe
    # MAE, prompt MAE over its window); see trail.drift_guard
    prediction_fallbacks: list[tuple] = field(default_factory=list)
    mae_sum: float = 0.0
    mae_count: int = 0
    keep_requests: bool = True

    def add_step(self, *values) -> None:
        self.steps.append(values)

    def add_request(self, request_id: int, prompt_len: int, output_len: int, finish_reason: str, metrics) -> None:
        mae = metrics.prediction_mae(output_len)
        if mae is not None and finish_reason != "abort":
            self.mae_sum += mae
            self.mae_count += 1
        if self.keep_requests:
            d = metrics.as_dict(output_len)
            d.update(request_id=request_id, prompt_len=prompt_len, output_len=output_len, finish_reason=finish_reason)
            self.requests.append(d)

    @property
    def online_mae(self) -> float:
        """Mean over finished requests of each request's mean |predicted - true remaining|."""
        return self.mae_sum / self.mae_count if self.mae_count else math.nan

    def totals(self) -> dict:
        idx = {name: i for i, name in enumerate(STEP_FIELDS)}
        out = {name: sum(row[idx[name]] for row in self.steps)
               for name in ("tokens", "prefill_tokens", "keep", "swap", "recompute", "forced", "swap_out_bytes",
                            "swap_in_bytes", "recomputed_tokens", "host_s", "sync_wait_s", "device_s")}
        out["steps"] = len(self.steps)
        out["online_prediction_mae"] = self.online_mae
        out["predicted_requests"] = self.mae_count
        out.update(self.fallback_totals())
        return out

    def fallback_totals(self) -> dict:
        """Whether ranking falls back to the prompt prediction now, and how often it switched."""
        on = bool(self.prediction_fallbacks) and bool(self.prediction_fallbacks[-1][1])
        return {"prediction_fallback": on, "prediction_fallback_switches": len(self.prediction_fallbacks)}

    def as_dict(self) -> dict:
        return {"totals": self.totals(), "step_fields": list(STEP_FIELDS), "steps": [list(r) for r in self.steps],
                "requests": self.requests, "phases": self.phases,
                "prediction_fallbacks": [list(e) for e in self.prediction_fallbacks]}

    def export_json(self, path: str | Path) -> Path:
        return write_json(path, self.as_dict())       # strict: NaN (no prediction, no device time) -> null
