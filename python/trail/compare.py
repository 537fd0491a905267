"""The same requests under several policies, judged as DESIGN.md "How scheduling results are
judged" says: per policy mean / p50 / p99 latency, mean TTFT, throughput and preemptions; the ratio
to fcfs, the fraction of the oracle's gain (only where the oracle gains >= 10%), the ratio to
sjf_prompt; and whether a difference is within noise (a paired bootstrap over the requests: the
same requests ran under every policy, so each request's latency pairs across policies).

Used by `trail demo` (CPU) and the serving benchmark (GPU). `run_policy` serves in real time (open
loop); `run_interleaved` steps one engine per policy in turn, each on a clock that runs only while
it steps, so that on a shared machine every policy meets the same background load. A request's
recorded output length is replayed capped at the run's max_new_tokens (`replay_length`), so any cap
works and every policy still does the same work. Nothing here prints (progress bars aside).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from trail.predictions import RecordedPredictions
from trail.request import SamplingParams

logger = logging.getLogger(__name__)

ORACLE_MIN_GAIN = 0.10


@dataclass(frozen=True)
class ReplayRequest:
    """A request with its recorded output length (replayed: stop there, EOS ignored; a length over
    the run's max_new_tokens is capped there, see `replay_length`)."""
    prompt_ids: Sequence[int]
    output_len: int
    arrival: float = 0.0          # seconds after the run's start
    recorded_predictions: Sequence[float] | None = None   # fed to the scheduler instead of the probe's


def replay_length(request: ReplayRequest, params: SamplingParams) -> int:
    """The tokens `request` generates under `params`: its recorded length, capped at
    params.max_new_tokens (a recorded length above the cap would be an invalid replay_length)."""
    return max(1, min(int(request.output_len), params.max_new_tokens))


class EngineClock:
    """A clock that advances only while its engine steps: the sum of the engine's own step times
    (plus jumps to the next arrival when it is idle). Engines stepped in turn on one machine then
    each see only their own work, and share whatever else the machine does evenly."""

    def __init__(self):
        self.busy = 0.0
        self._since: float | None = None

    def __call__(self) -> float:
        return self.busy + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        self.busy += time.perf_counter() - self._since
        self._since = None


class _Replay:
    """One engine serving `requests`: arrivals due by a time are added (arrival + `offset` on the
    engine's clock), finished outputs collected by request index."""

    def __init__(self, engine, requests: Sequence[ReplayRequest], params: SamplingParams, offset: float = 0.0):
        self.engine, self.requests, self.params, self.offset = engine, requests, params, offset
        self.pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
        self.ids: dict[int, int] = {}
        self.finals: dict[int, object] = {}

    @property
    def done(self) -> bool:
        return len(self.finals) == len(self.requests)

    def next_arrival(self) -> float | None:
        return self.requests[self.pending[0]].arrival if self.pending else None

    def admit(self, now: float) -> None:
        while self.pending and self.requests[self.pending[0]].arrival <= now:
            i = self.pending.pop(0)
            r = self.requests[i]
            if r.recorded_predictions is not None:
                source = self.engine.predictions
                if not isinstance(source, RecordedPredictions):
                    raise ValueError("requests carry recorded predictions: build the engine with "
                                     "predictions=trail.predictions.RecordedPredictions()")
                source.record(i, r.recorded_predictions)
            rid = self.engine.add_request(list(r.prompt_ids), replace(self.params, replay_length=replay_length(r, self.params)),
                                          arrival=self.offset + r.arrival, request_id=i)
            self.ids[rid] = i

    def collect(self, outs) -> tuple[int, int]:
        """Keeps the finished outputs; -> (requests finished, tokens generated) in `outs`."""
        finished = tokens = 0
        for out in outs:
            tokens += len(out.new_token_ids)
            if out.finished:
                self.finals[self.ids[out.request_id]] = out
                finished += 1
        return finished, tokens

    def result(self, policy: str, makespan: float) -> dict:
        return _run_result(policy, self.engine, [self.finals[i] for i in range(len(self.requests))], makespan)


def run_interleaved(make_engine: Callable[[str, EngineClock], object], policies: Sequence[str],
                    requests: Sequence[ReplayRequest], params: SamplingParams, progress: bool = False) -> dict:
    """Serves the same `requests` under every policy, one step of each engine in turn, each on its
    own EngineClock (arrivals are on that clock). Returns {policy: run} as `run_policy` does.
    `progress`: a tqdm bar in generated tokens (all policies together; the total is known because
    lengths are replayed), with the finished requests beside it, so a slow machine shows life
    from the first step."""
    from tqdm.auto import tqdm

    policies = list(dict.fromkeys(policies))          # a policy named twice runs once
    clocks = {policy: EngineClock() for policy in policies}
    replays = {policy: _Replay(make_engine(policy, clocks[policy]), requests, params) for policy in policies}
    total_tokens = sum(replay_length(r, params) for r in requests) * len(policies)
    total_requests = len(requests) * len(policies)
    finished = 0
    with tqdm(total=total_tokens, desc="+".join(policies), unit="tok", disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        bar.set_postfix_str(f"requests 0/{total_requests}")
        while not all(rp.done for rp in replays.values()):
            for policy, rp in replays.items():
                if rp.done:
                    continue
                clock = clocks[policy]
                nxt = rp.next_arrival()
                if not rp.engine.has_unfinished() and nxt is not None and nxt > clock():
                    clock.busy = nxt                      # idle: jump to the next arrival
                rp.admit(clock())
                clock.start()
                outs = rp.engine.step()
                clock.stop()
                done, tokens = rp.collect(outs)
                if done:
                    finished += done
                    bar.set_postfix_str(f"requests {finished}/{total_requests}", refresh=False)
                bar.update(tokens)
    return {policy: rp.result(policy, clocks[policy].busy) for policy, rp in replays.items()}


def run_policy(make_engine: Callable[[str], object], policy: str, requests: Sequence[ReplayRequest],
               params: SamplingParams, progress: bool = False) -> dict:
    """Serves `requests` on `make_engine(policy)` in real time (arrivals relative to the start:
    open-loop); returns the per-request latency / TTFT arrays, throughput, preemptions and the
    engine's telemetry totals."""
    from tqdm.auto import tqdm

    engine = make_engine(policy)
    start = engine.now()
    rp = _Replay(engine, requests, params, offset=start)
    with tqdm(total=len(requests), desc=policy, unit="req", disable=not progress, leave=False) as bar:
        while not rp.done:
            now = engine.now() - start
            rp.admit(now)
            if not engine.has_unfinished():
                time.sleep(max(0.0, min(0.01, rp.next_arrival() - now)))
                continue
            bar.update(rp.collect(engine.step())[0])
    return rp.result(policy, engine.now() - start)


def _run_result(policy: str, engine, outs: list, makespan: float) -> dict:
    latency = np.array([o.metrics.latency for o in outs])
    ttft = np.array([o.metrics.ttft for o in outs])
    tokens = sum(len(o.token_ids) for o in outs)
    totals = engine.telemetry.totals()
    tbt, stall = token_gaps([o.metrics.token_times for o in outs])
    return {"policy": policy, "latency": latency, "ttft": ttft, "tbt": tbt, "stall": stall, "tokens": tokens,
            "makespan_s": makespan, "throughput_tok_s": tokens / makespan, "telemetry": totals,
            "preemptions": int(totals["keep"] + totals["swap"] + totals["recompute"])}


def token_gaps(token_times: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Time between tokens: (every gap between two consecutive tokens of a request, pooled over
    the requests; each request's longest gap, its worst stall, 0 for fewer than two tokens)."""
    gaps = [np.diff(np.asarray(t, float)) for t in token_times]
    pooled = np.concatenate(gaps) if gaps else np.zeros(0)
    return pooled, np.array([g.max() if len(g) else 0.0 for g in gaps])


def summarize(run: dict) -> dict:
    lat, ttft = run["latency"], run["ttft"]
    out = {"mean_latency_s": float(lat.mean()), "p50_latency_s": float(np.percentile(lat, 50)),
           "p90_latency_s": float(np.percentile(lat, 90)), "p99_latency_s": float(np.percentile(lat, 99)),
           "mean_ttft_s": float(ttft.mean()), "p99_ttft_s": float(np.percentile(ttft, 99)),
           "throughput_tok_s": float(run["throughput_tok_s"]), "preemptions": run["preemptions"],
           "swaps": int(run["telemetry"]["swap"]), "recomputed_tokens": int(run["telemetry"]["recomputed_tokens"]),
           "prediction_mae": float(run["telemetry"]["online_prediction_mae"])}
    if len(run.get("tbt", ())):
        out.update(tbt_p50_s=float(np.percentile(run["tbt"], 50)), tbt_p99_s=float(np.percentile(run["tbt"], 99)),
                   stall_mean_s=float(run["stall"].mean()), stall_p99_s=float(np.percentile(run["stall"], 99)))
    return out


def paired_ratio_ci(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) / mean(b) over paired requests."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (resamples, len(a)))
    ratios = a[idx].mean(1) / b[idx].mean(1)
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


INTERVAL_COVERS = ("95% paired bootstrap over this run's requests: request sampling only, not the run-to-run "
                   "noise of the engine (that is the noise floor: fcfs_repeat against fcfs)")


def compare(runs: dict[str, dict]) -> dict:
    """Ratios to fcfs (with a 95% paired-bootstrap interval and a within-noise verdict), the
    fraction of the oracle's mean-latency gain, and the ratio to sjf_prompt. With a run named
    `fcfs_repeat` (fcfs again, its own engine), the noise floor |log(mean latency ratio)| between
    the two, and per policy whether its ratio to fcfs lies beyond it."""
    out = {name: summarize(run) for name, run in runs.items()}
    base = runs.get("fcfs")
    oracle = out.get("oracle")
    gain_oracle = None
    if base is not None and oracle is not None:
        gain_oracle = 1.0 - oracle["mean_latency_s"] / out["fcfs"]["mean_latency_s"]
    for name, s in out.items():
        run = runs[name]
        if base is not None:
            s["latency_ratio_to_fcfs"] = s["mean_latency_s"] / out["fcfs"]["mean_latency_s"]
            s["ttft_ratio_to_fcfs"] = s["mean_ttft_s"] / max(out["fcfs"]["mean_ttft_s"], 1e-12)
            s["p99_ratio_to_fcfs"] = s["p99_latency_s"] / out["fcfs"]["p99_latency_s"]
            if "tbt_p99_s" in s and out["fcfs"].get("tbt_p99_s", 0) > 0:
                s["tbt_p99_ratio_to_fcfs"] = s["tbt_p99_s"] / out["fcfs"]["tbt_p99_s"]
            if name != "fcfs":
                lo, hi = paired_ratio_ci(run["latency"], base["latency"])
                s["latency_ratio_ci95"] = [lo, hi]
                s["within_noise"] = lo <= 1.0 <= hi
                if base["ttft"].mean() > 0:
                    s["ttft_ratio_ci95"] = list(paired_ratio_ci(run["ttft"], base["ttft"]))
        if gain_oracle is not None and gain_oracle >= ORACLE_MIN_GAIN and name != "fcfs":
            s["oracle_gain_fraction"] = (1.0 - s["mean_latency_s"] / out["fcfs"]["mean_latency_s"]) / gain_oracle
        if "sjf_prompt" in out:
            s["latency_ratio_to_sjf_prompt"] = s["mean_latency_s"] / out["sjf_prompt"]["mean_latency_s"]
    noise = None
    if base is not None and "fcfs_repeat" in out:
        noise = abs(float(np.log(out["fcfs_repeat"]["mean_latency_s"] / out["fcfs"]["mean_latency_s"])))
        for name, s in out.items():
            if name not in ("fcfs", "fcfs_repeat"):
                s["beyond_noise_floor"] = abs(float(np.log(s["latency_ratio_to_fcfs"]))) > noise
    return {"policies": out, "oracle_gain": gain_oracle, "noise_floor_log_ratio": noise,
            "interval_covers": INTERVAL_COVERS}
