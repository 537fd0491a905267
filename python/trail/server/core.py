"""The engine core process of `trail.AsyncEngine`: one `LLMEngine` and its step loop, alone in
its interpreter (as vLLM V1's EngineCore and SGLang's scheduler process are), so the HTTP layer
never takes the step loop's GIL and the step loop never waits for a client.

The process: `python -c "from trail.server.core import main; main()" IN_FD OUT_FD`, started by
`AsyncEngine.start` with two OS pipes (no multiprocessing spawn, so a caller's unguarded main
module is never imported again); the first message is the `CoreSpec`.

Channel: the two one-way pipes as `multiprocessing.connection.Connection`s (pickled messages).
Parent -> core:
  ("add", rid, prompt_ids, SamplingParams, opts)   opts: hint (expected output tokens: replaces the
                                                   prompt-time prediction), predictions (return
                                                   the per-step predictions in the final output)
  ("abort", [rid, ...])   ("stats", token)   ("idle", token)   ("exit",)
Core -> parent: one list of events per loop turn (so one step's deltas travel together):
  ("ready", info) | ("failed", message)           the first message, alone
  ("acc", rid, prompt_len) | ("err", rid, message)  an add accepted / refused (a ValueError)
  ("out", rid, new_ids, text_delta, finish_reason or None, final info or None)
  ("stats", token, stats) | ("idle", token, stats + check_idle's verdict) | ("dead", message) | ("bye",)

Loop turn: block on the pipe while the engine is idle; take every pending message; one
`engine.step()`; send the turn's events. Deltas of a request are held until `stream_interval`
tokens have gathered or it finishes (vLLM's --stream-interval). "idle" is answered once the
engine has nothing unfinished (no request, no step in flight), with `LLMEngine.check_idle`'s
verdict. "exit" aborts whatever is left, drains, answers "bye" and returns. The core exits when
the parent's pipe closes (the parent died). It ignores SIGINT: the server decides how to stop.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np

from trail.engine_config import EngineConfig

logger = logging.getLogger(__name__)

MAX_STEP_FAILURES = 3      # consecutive failed (rolled back) steps before every request ends with an error


@dataclass(frozen=True)
class CoreSpec:
    """How the core builds its engine (`trail.server.random_parts.engine_parts`, then
    `LLMEngine`) and serves: picklable, sent to the spawned process."""
    source: str
    config: EngineConfig
    probe: str | None = "shipped"
    prompt_predictor: str | None = "boe"
    device: str | None = None
    dtype: str | None = None          # a torch dtype name (float32, float64, bfloat16, float16)
    seed: int = 0
    stream_interval: int = 1
    threads: int | None = None
    log_level: int = logging.WARNING
    window: int = 1024                 # recent step rows kept for quantiles (trail.server.metrics)


def build_engine(spec: CoreSpec):
    """-> (LLMEngine with a WindowTelemetry, info dict for the parent)."""
    import torch

    from trail.engine import LLMEngine
    from trail.server.metrics import WindowTelemetry
    from trail.server.random_parts import engine_parts

    if spec.threads:
        torch.set_num_threads(spec.threads)
    dtype = getattr(torch, spec.dtype) if spec.dtype else None
    parts = engine_parts(spec.source, probe=spec.probe, prompt_predictor=spec.prompt_predictor,
                         device=spec.device, dtype=dtype, seed=spec.seed)
    engine = LLMEngine(config=spec.config, seed=spec.seed, **parts)
    engine.telemetry = WindowTelemetry(spec.window)
    engine.drift.events = engine.telemetry.prediction_fallbacks      # the drift guard's switches land there
    info = {"pid": os.getpid(), "vocab_size": engine.model.config.vocab_size,
            "max_model_len": spec.config.max_model_len, "max_slots": spec.config.max_slots,
            "policy": spec.config.policy, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "has_probe": engine.probe is not None, "has_prompt_predictor": engine.prompt_predictor is not None,
            "eos_token_ids": [int(i) for i in engine.eos_ids], "kv_blocks": engine.kv.num_blocks,
            "host_blocks": engine.kv.num_host_blocks, "prefill_tokens_per_s": engine.prefill_tokens_per_s}
    return engine, info


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def spawn_core():
    """Starts a core process: -> (Popen, inbox Connection, outbox Connection). It imports this
    very trail package (its folder first on PYTHONPATH); the caller sends the CoreSpec first."""
    import subprocess
    from multiprocessing.connection import Connection
    from pathlib import Path

    to_core_r, to_core_w = os.pipe()
    from_core_r, from_core_w = os.pipe()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = subprocess.Popen([sys.executable, "-c", "from trail.server.core import main; main()", str(to_core_r),
                                 str(from_core_w)], pass_fds=(to_core_r, from_core_w), env=env)
    except BaseException:
        for fd in (to_core_w, from_core_r):
            os.close(fd)
        raise
    finally:
        os.close(to_core_r)
        os.close(from_core_w)
    return proc, Connection(from_core_r, writable=False), Connection(to_core_w, readable=False)


def stop_core(proc, timeout: float) -> None:
    """Waits up to `timeout` s for a core process to exit, then terminates, then kills it."""
    import subprocess

    for stop, wait in ((None, timeout), (proc.terminate, 5.0), (proc.kill, 5.0)):
        if stop is not None:
            logger.warning("engine core %d still running: %s", proc.pid, stop.__name__)
            stop()
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> None:
    """The core process's entry: pipes from argv (IN_FD OUT_FD), the spec from the first message."""
    from multiprocessing.connection import Connection

    _ignore_stop_signals()
    inbox, outbox = Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    try:
        spec = inbox.recv()
    except EOFError:
        return
    core_main(inbox, outbox, spec)


def core_main(inbox, outbox, spec: CoreSpec) -> None:
    """Build the engine, say ready (or why not), run the loop."""
    _ignore_stop_signals()
    logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s [engine core]: %(message)s")
    try:
        engine, info = build_engine(spec)
    except BaseException as exc:          # the parent raises it from start()
        logger.debug("engine core failed to start", exc_info=True)
        outbox.send([("failed", f"{type(exc).__name__}: {exc}")])
        return
    outbox.send([("ready", info)])
    _Core(engine, inbox, outbox, spec.stream_interval).run()


class _Core:
    def __init__(self, engine, inbox, outbox, stream_interval: int):
        self.engine, self.inbox, self.outbox = engine, inbox, outbox
        self.interval = stream_interval
        self.events: list = []
        self.held: dict[int, tuple[list, list]] = {}     # rid -> (token ids, text pieces) not sent yet
        self.live: set[int] = set()
        self.want_predictions: set[int] = set()
        self.errors: dict[int, str] = {}                  # rid -> why it is being ended with an error
        self.idle_waiters: list = []
        self.finished: Counter = Counter()
        self.prompt_tokens = self.generation_tokens = 0
        self.exiting = False
        self.failures = 0

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished():
                    self._answer_idle()
                    if self.exiting:
                        self.events.append(("bye",))
                        self._flush()
                        return
                    self._flush()
                    self.inbox.poll(None)          # sleep until a message (or EOF: the parent is gone)
                self._take_messages()
                if engine.has_unfinished() and not self._step():
                    self._flush()
                    return
                self._flush()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            logger.warning("the server closed the channel; the engine core exits")

    def _take_messages(self) -> None:
        while self.inbox.poll(0):
            msg = self.inbox.recv()
            getattr(self, "_on_" + msg[0])(*msg[1:])

    def _flush(self) -> None:
        if self.events:
            events, self.events = self.events, []
            self.outbox.send(events)

    def _step(self) -> bool:
        """One engine step and its outputs; False when the engine is dead."""
        from trail.faults import EngineDeadError

        try:
            outs = self.engine.step()
        except EngineDeadError as exc:
            logger.error("engine dead: %s", exc)
            self._outputs(exc.outputs)
            self.events.append(("dead", str(exc)))
            return False
        except Exception as exc:               # rolled back by the engine; its requests wait again
            self.failures += 1
            logger.exception("engine step failed (%d in a row)", self.failures)
            if self.failures >= MAX_STEP_FAILURES:
                for rid in list(self.live):
                    self.errors[rid] = f"{MAX_STEP_FAILURES} engine steps failed in a row; last: " \
                                       f"{type(exc).__name__}: {exc}"
                    self.engine.abort(rid)
                self.failures = 0
            return True
        self.failures = 0
        self._outputs(outs)
        return True

    def _outputs(self, outs) -> None:
        for out in outs:
            rid = out.request_id
            ids, text = self.held.setdefault(rid, ([], []))
            ids.extend(out.new_token_ids)
            if out.text_delta:
                text.append(out.text_delta)
            self.generation_tokens += len(out.new_token_ids)
            if out.finished:
                del self.held[rid]
                self.live.discard(rid)
                reason = out.finish_reason.value
                error = out.error
                if rid in self.errors:
                    reason, error = "error", self.errors.pop(rid)
                self.finished[reason] += 1
                self.events.append(("out", rid, ids, "".join(text), reason, self._final(out, error)))
            elif len(ids) >= self.interval:
                del self.held[rid]
                self.events.append(("out", rid, ids, "".join(text), None, None))

    def _final(self, out, error: str | None) -> dict:
        m = out.metrics
        final = {"prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.token_ids), "error": error,
                 "ttft_s": m.ttft, "latency_s": m.latency, "prompt_prediction": m.prompt_prediction,
                 "preemptions": dict(m.preemptions), "recomputed_tokens": m.recomputed_tokens}
        if out.request_id in self.want_predictions:
            self.want_predictions.discard(out.request_id)
            final["predictions"] = [list(p) for p in m.predictions]
        return final

    # ---- messages ----------------------------------------------------------------------------
    def _on_add(self, rid: int, ids: list, params, opts: dict) -> None:
        if self.exiting:
            self.events.append(("err", rid, "the engine is shutting down"))
            return
        engine = self.engine
        hint = opts.get("hint")
        saved = engine.prompt_predictor
        if hint is not None:      # the client's expected output length replaces the prompt-time prediction
            engine.prompt_predictor = lambda prompts, value=float(hint): np.array([value])
        try:
            engine.add_request(ids, params, request_id=rid)
        except (ValueError, TypeError) as exc:
            self.events.append(("err", rid, str(exc)))
            return
        except Exception as exc:      # e.g. the engine is dead
            self.events.append(("err", rid, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            engine.prompt_predictor = saved
        self.live.add(rid)
        if opts.get("predictions"):
            self.want_predictions.add(rid)
        self.prompt_tokens += len(ids)
        self.events.append(("acc", rid, len(ids)))

    def _on_abort(self, rids) -> None:
        for rid in rids:
            self.engine.abort(rid)       # False for a request already finished: its final is on its way

    def _on_stats(self, token) -> None:
        self.events.append(("stats", token, self.stats()))

    def _on_idle(self, token) -> None:
        self.idle_waiters.append(token)

    def _on_exit(self) -> None:
        self.exiting = True
        for rid in list(self.live):
            self.engine.abort(rid)

    def _answer_idle(self) -> None:
        if not self.idle_waiters:
            return
        try:
            self.engine.check_idle()
            check = "ok"
        except AssertionError as exc:
            check = f"not idle: {exc}"
        stats = dict(self.stats(), check=check)
        self.events += [("idle", token, stats) for token in self.idle_waiters]
        self.idle_waiters = []

    def stats(self) -> dict:
        from trail.scheduler_types import SNAP, State

        engine = self.engine
        snap = engine.scheduler.snapshot().numpy()
        states = snap[:, SNAP.STATE].astype(np.int64) if len(snap) else np.zeros(0, np.int64)
        kv = engine.kv
        return {"waiting": int((states == State.WAITING).sum()), "running": int((states == State.RUNNING).sum()),
                "kept": int((states == State.KEPT).sum()), "swapped": int((states == State.SWAPPED).sum()),
                "unfinished": engine.num_unfinished, "finished": dict(self.finished),
                "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                "totals": engine.telemetry.totals(), "recent_step_s": engine.telemetry.recent_step_seconds(),
                "kv_free": kv.num_free_blocks, "kv_total": kv.num_blocks, "host_free": kv.num_free_host_blocks,
                "host_total": kv.num_host_blocks, "policy": engine.config.policy}
