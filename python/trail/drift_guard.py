"""The drift guard: the length probe's online error against the prompt predictor's, over the last
finished requests. While the probe is worse (its traffic drifted from what it was trained on),
ranking falls back to the prompt-time prediction (`ProbePredictions.fallback`: a request's
predicted remaining becomes max(prompt prediction - tokens fed, 0)); each switch is logged and
kept in `Telemetry.prediction_fallbacks`.

Both errors are measured on the same requests and steps: for each step the probe predicted (the
request's `RequestMetrics.predictions`, (tokens fed g, predicted remaining)), |prediction - (final
length - g)| for the probe and |max(prompt prediction - g, 0) - (final length - g)| for the prompt
predictor, averaged per request, then over the window. Aborted and failed requests do not count
(their final length is not their true length). A margin keeps the guard from flapping when the
two are close.
"""
from __future__ import annotations

import logging
from collections import deque

logger = logging.getLogger(__name__)


def request_errors(metrics, final_length: int) -> tuple[float, float] | None:
    """(probe, prompt-only) mean |predicted - true remaining| of one finished request over the
    steps the probe predicted; None without such steps or a prompt prediction."""
    if not metrics.predictions or metrics.prompt_prediction is None:
        return None
    prompt = float(metrics.prompt_prediction)
    prior = sum(abs(max(prompt - g, 0.0) - (final_length - g)) for g, _ in metrics.predictions)
    return metrics.prediction_mae(final_length), prior / len(metrics.predictions)


class DriftGuard:
    """`window` finished requests (0: off); no decision before `min_requests`; the fallback turns on
    when the probe's mean error exceeds the prompt predictor's by more than `margin` (a fraction),
    and off when it is below it by more than `margin`. `events` (a list, e.g. the telemetry's)
    gets (engine time, fallback on, probe MAE, prompt MAE) at each switch."""

    def __init__(self, window: int = 256, min_requests: int = 64, margin: float = 0.05, events: list | None = None):
        if window < 0 or min_requests < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(f"DriftGuard: window >= 0, min_requests >= 1, margin in [0, 1); got {window}, "
                             f"{min_requests}, {margin}")
        self.window, self.margin = window, margin
        self.min_requests = min(min_requests, window) if window else min_requests
        self.events = [] if events is None else events
        self.fallback = False
        self._probe: deque[float] = deque(maxlen=max(window, 1))
        self._prompt: deque[float] = deque(maxlen=max(window, 1))

    def add(self, metrics, final_length: int, now: float) -> bool:
        """One request that finished (stop or length); returns whether ranking falls back."""
        errs = None if self.window == 0 else request_errors(metrics, final_length)
        if errs is None:
            return self.fallback
        self._probe.append(errs[0])
        self._prompt.append(errs[1])
        if len(self._probe) < self.min_requests:
            return self.fallback
        probe = sum(self._probe) / len(self._probe)
        prompt = sum(self._prompt) / len(self._prompt)
        switch = (probe > prompt * (1 + self.margin)) if not self.fallback else (probe < prompt * (1 - self.margin))
        if switch:
            self.fallback = not self.fallback
            self.events.append((now, self.fallback, probe, prompt))
            logger.warning("drift guard: the probe's error over the last %d requests is %.1f tokens, the prompt "
                           "predictor's %.1f: ranking %s", len(self._probe), probe, prompt,
                           "falls back to the prompt prediction" if self.fallback else "uses the probe again")
        return self.fallback
