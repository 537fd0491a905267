"""The engine: the one generation loop. It ties the serving core (scheduler + KV ledger), the
model runner and the prediction source together (the only module that does).

    engine = LLMEngine.from_pretrained(folder_or_gguf_or_preset, EngineConfig(policy="trail"))
    rid = engine.add_request("Hello", SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for out in engine.step(): ...

One step is one straight walk (docs/DESIGN.md "The step"):
  schedule     ServingCore.schedule: the policy step (trail._C) and its plan applied to the KV
               cache (preemptions, swap-ins, allocations by the plan's BLOCKS column)
  run          ModelRunner.execute: stage -> forward + layer tap -> probe -> sample (a captured
               CUDA graph where one fits); predictions then tokens copied to pinned host
  postprocess  the step's one sync, tokens appended, stop checks, text, outputs, finished requests
               released through the core
With `EngineConfig.overlap` the step launched by one `step()` call is completed by the next.

A step is atomic: if any phase fails (an error, a device OOM, Ctrl-C), every request holding KV
goes back to waiting, to be prefilled again over what the host confirmed (`ServingCore.requeue`),
and the exception propagates. A request whose text decoding fails ends alone (FinishReason.ERROR);
a sticky device error ends every request and the engine (trail.faults)."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trail.detokenize import IncrementalText
from trail.drift_guard import DriftGuard
from trail.engine_config import EngineConfig
from trail.engine_loading import (PromptPredictorFn, free_device_bytes, load_engine_parts, measure_prefill_rate,
                                  warn_probe_range)
from trail.engine_output import account_plan, record_plan_without_rows, record_step, request_output, stream_text
from trail.faults import EngineDeadError, is_sticky_device_error
from trail.graph_buckets import graph_batch_sizes, mixed_token_sizes
from trail.kv_cache import KVCache, KVCacheSpec
from trail.model_runner import ModelRunner
from trail.predictions import ProbePredictions, prompt_prediction
from trail.request import FinishReason, Request, RequestMetrics, RequestOutput, SamplingParams
from trail.request_checks import (check_arrival, check_engine_parts, check_request, check_request_id,
                                  deprecated_replay, eos_lookup)
from trail.scheduler import SCHED
from trail.serving_core import ServingCore
from trail.slot_table import SlotTable
from trail.step_clock import HostBuffers, InFlight, PhaseClock, collect_device_time, record_event
from trail.telemetry import Telemetry
from trail_kernels import row_flags
from trail_kernels.probe import ProbeParams, ProbeState

logger = logging.getLogger(__name__)


class LLMEngine:
    """Serves requests with a policy of `trail.scheduler_types.POLICIES` over a paged KV cache.

    model: a `trail.models.LlamaModel` (its device and dtype are the engine's); tokenizer: for text
    prompts, text output and stop strings (None: token ids only); probe / probe_layer: the length
    probe (`ProbeParams`) and the layer it reads (required by `trail`, optional otherwise: it then
    only feeds telemetry); probe_max_new: the output cap the probe was trained with;
    prompt_predictor: ordering before prefill (required by `sjf_prompt`); eos_token_ids: stop ids
    of the model (default: the tokenizer's eos id); clock: the engine's time source (seconds);
    profile_phases: record each step's phase times (host: perf_counter; device: CUDA events, read
    after the step's own sync, so no extra sync) in `telemetry.phases`; predictions: where the
    scheduler's predicted remaining lengths come from (`trail.predictions.ProbePredictions`, the
    default, or `RecordedPredictions` for a benchmark replaying recorded values).
    """

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, *,
                 probe: ProbeParams | None = None, probe_layer: int | None = None,
                 probe_max_new: int | None = None, prompt_predictor: PromptPredictorFn | None = None,
                 eos_token_ids: Iterable[int] | None = None, seed: int = 0, clock: Callable[[], float] | None = None,
                 profile_phases: bool = False, predictions: ProbePredictions | None = None):
        self.config = config = config or EngineConfig()
        self.profile_phases = profile_phases
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.model, self.tokenizer = model, tokenizer
        mcfg = model.config
        check_engine_parts(config, mcfg, probe, probe_layer, prompt_predictor)
        self.eos_ids, is_eos = eos_lookup(tokenizer, eos_token_ids, mcfg.vocab_size)

        # ---- memory: one config -> KV layout + scheduler config; the core owns both ----
        self.kv_spec = KVCacheSpec(mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, dtype=self.dtype,
                                   block_size=config.block_size)
        self.layout = config.kv_layout(self.kv_spec, free_device_bytes(self.device, config, mcfg.vocab_size))
        self.kv = KVCache(self.kv_spec, self.layout.num_gpu_blocks, config.max_slots,
                          self.layout.max_blocks_per_request, self.device,
                          num_host_blocks=self.layout.num_host_blocks)
        rows = config.max_batch + 1          # a mixed-step graph's rows: every real row + >= 1 pad
        self.runner = ModelRunner(model, self.kv, tap_layer=probe_layer if probe is not None else None, seed=seed,
                                  max_tokens=max(config.max_tokens_per_step, config.max_batch) + rows,
                                  max_rows=rows)
        self.probe = None
        if probe is not None:
            self.probe = probe.to(self.device, self.dtype if self.device.type == "cuda" else None)
            self.probe_state = ProbeState.for_params(self.probe, max_slots=config.max_slots,
                                                     max_rows=rows, device=self.device)
            self.runner.attach_probe(self.probe, self.probe_state)
        self.probe_max_new = probe_max_new
        self.prompt_predictor = prompt_predictor
        self._default_prediction = (float(probe.bin_values @ probe.log_prior.exp()) if probe is not None else 0.0)
        self._compute_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        rate = config.prefill_tokens_per_s or measure_prefill_rate(self.runner, self.kv, config)  # the recompute cost
        self.prefill_tokens_per_s = rate
        self.scheduler_config = config.scheduler_config(self.kv_spec, self.layout, 1.0 / rate)
        self.core = ServingCore(self.scheduler_config, self.kv, compute_stream=self._compute_stream)
        if self.device.type == "cuda" and not config.enforce_eager:
            sizes = graph_batch_sizes(config.max_batch, config.cuda_graph_sizes)
            tokens = mixed_token_sizes(config.max_tokens_per_step, rows, config.cuda_graph_tokens)
            logger.info("engine: capturing CUDA graphs: decode batch sizes %s; mixed steps of %d rows, token "
                        "sizes %s", sizes, rows, tokens)
            self.runner.capture_graphs(sizes, tokens, mixed_rows=rows)
        logger.info("engine: %s, %d GPU + %d host KV blocks of %d tokens, prefill %.0f tok/s, policy %s",
                    self.device, self.layout.num_gpu_blocks, self.layout.num_host_blocks, config.block_size,
                    rate, config.policy)

        self.slots = SlotTable(config.max_slots, config.max_model_len, is_eos)
        self.predictions = (predictions or ProbePredictions()).attach(config.max_slots)
        # pinned landing buffers of the device's predictions and tokens, one per step in flight
        self._host_buffers = [HostBuffers(config.max_slots, rows, self.device.type == "cuda") for _ in range(2)]
        self._pending_timing: tuple | None = None
        self._in_flight: InFlight | None = None
        self._requests: dict[int, Request] = {}
        self._aborted: list[RequestOutput] = []
        self._ending: set[int] = set()       # request ids whose end (`_end`) a fault interrupted
        self._next_id = self._next_serial = self._step_index = 0
        self._dead: str | None = None
        self._warned_probe_range = False
        self._clock = clock or time.perf_counter
        self._t0 = self._clock()
        self.telemetry = Telemetry()
        self.drift = DriftGuard(config.drift_window, events=self.telemetry.prediction_fallbacks)

    @classmethod
    def from_pretrained(cls, source, config: EngineConfig | None = None, *, probe: str | None = "shipped",
                        prompt_predictor: str | None = "boe", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, seed: int = 0) -> "LLMEngine":
        """`source`: an HF folder, a .gguf file, or `random:<preset>` (no tokenizer). `probe`:
        'shipped' (the probe shipped for this model, if any), a probe file path, or None.
        `prompt_predictor`: 'boe' / 'minilm' (the one beside a probe given by path, else the shipped
        one), a file path, or None."""
        parts = load_engine_parts(source, probe=probe, prompt_predictor=prompt_predictor, device=device, dtype=dtype)
        return cls(config=config, seed=seed, **parts)

    # ---- requests ------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the engine started (the clock of arrivals, metrics and the scheduler)."""
        return self._clock() - self._t0

    def add_request(self, prompt: str | Sequence[int] | Sequence[dict], params: SamplingParams | None = None, *,
                    request_id: int | None = None, arrival: float | None = None,
                    true_length: int | None = None, replay_length: int | None = None, chat: bool = False) -> int:
        """Queues a request; returns its id. `prompt`: text (tokenized as is), token ids, or a list
        of {"role", "content"} messages; `chat=True`: text or messages go through the model's chat
        template (what an instruct model expects). Everything is validated here (a bad request raises
        ValueError and changes nothing). `true_length`: the real output length, known only to the
        oracle policy. `replay_length`: deprecated, use `SamplingParams(replay_length=...)`."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if replay_length is not None:
            params = deprecated_replay(params, replay_length, "add_request(replay_length=)")
        self._check_alive()
        ids, text, true_length = check_request(prompt, params, true_length, self.tokenizer,
                                               self.model.config.vocab_size, self.config, chat)
        rid = self._next_id if request_id is None else check_request_id(request_id)
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already in use")
        arrival = self.now() if arrival is None else check_arrival(arrival)
        prediction = prompt_prediction(self.prompt_predictor, ids, params.max_new_tokens, self._default_prediction)
        if not self._warned_probe_range:
            self._warned_probe_range = warn_probe_range(self.probe, self.probe_max_new, params.max_new_tokens)
        stream = None
        if self.tokenizer is not None and params.detokenize:
            stream = IncrementalText(self.tokenizer, ids, params.stop)
        serial = self._next_serial
        slot = int(self.core.add([serial], [arrival], [len(ids)], [params.max_new_tokens], [prediction],
                                 None if true_length is None else [true_length])[0])
        # from here on nothing can fail
        self._next_id, self._next_serial = max(self._next_id, rid + 1), serial + 1
        req = Request(rid, ids, params, frozenset(self.eos_ids.tolist()) | frozenset(params.stop_token_ids),
                      text, true_length, slot, serial, stream=stream,
                      metrics=RequestMetrics(arrival, prompt_prediction=prediction))
        self._requests[rid] = req
        replay = params.replay_length
        self.slots.bind(slot, serial, req, ids, params.max_new_tokens, replay or params.max_new_tokens,
                        params.ignore_eos or replay is not None, bool(params.stop_token_ids or params.stop))
        self.predictions.bind(slot, rid, prediction)
        self.runner.set_sampling(slot, params)
        return rid

    def abort(self, request_id: int) -> bool:
        """Removes a request in any state (waiting, prefilling, running, kept, swapped, dropped
        for recompute); its blocks and slot are freed at once and its final output (reason
        'abort') comes with the next `step()`. False if it is unknown or already finished. Its id
        may be reused at once: a token still in flight for it never reaches the new request."""
        req = self._requests.get(request_id)
        if req is None or req.finished:
            return False
        self._aborted += self._end([req], [FinishReason.ABORT])
        return True

    @property
    def scheduler(self):
        """The core's scheduler (read-only use: every plan is applied through `self.core`)."""
        return self.core.scheduler

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._aborted) or self._in_flight is not None

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after a device error ({self._dead}); build a new engine")

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of every request that got a token, finished or was
        aborted since the last step. With `EngineConfig.overlap` the step launched here is
        completed (synced, postprocessed) by the next call: the CPU schedules and prepares step
        n+1 while the GPU runs step n, and outputs arrive one call later. If the step fails it is
        rolled back (see the module docstring) and the exception propagates."""
        self._check_alive()
        if self._ending:                     # an abort() cut short (Ctrl-C inside it)
            self._complete_ending()
        outputs, self._aborted = self._aborted, []
        try:
            launched = self._launch() if self._requests else None
            done, self._in_flight = (self._in_flight, launched) if self.config.overlap else (launched, None)
            if done is not None:
                outputs += self._complete(done)
        except BaseException as exc:
            self._aborted = outputs + self._aborted
            self._roll_back(exc)
            if self._dead is not None:
                dead = EngineDeadError(f"the engine stopped after a device error ({self._dead}); the outputs "
                                       f"of the requests it ended are in .outputs")
                dead.outputs, self._aborted = self._aborted, []
                raise dead from exc
            raise
        return outputs

    def _launch(self) -> InFlight | None:
        """schedule -> run, and the copies of predictions then tokens to pinned host; nothing waits
        for the device."""
        clock = PhaseClock(self.device if self.profile_phases else None)
        now = self.now()
        self._pending_timing = collect_device_time(self.telemetry, self._pending_timing)
        plan = self.core.schedule(self.predictions.values, self.slots.gen_host, now)
        clock.mark("schedule")
        account_plan(plan, self.slots.req, now)
        rows = plan.rows
        rows = self.slots.drop_finishing(rows) if self.config.overlap and self._in_flight is not None else rows
        if len(rows) == 0:
            logger.debug("step %d: nothing runnable (stop reason %d)", self._step_index, plan.stop_reason)
            record_plan_without_rows(self.telemetry, self._step_index, now, plan, self.kv_spec.bytes_per_block)
            return None
        t_dev = record_event(self.device)
        out = self.runner.execute(self.slots.batch_plan(rows, self._step_index), clock)
        host = self._host_buffers[self._step_index % 2]     # the step in flight owns the other one
        preds = None
        if out.expected is not None:
            preds = host.preds
            preds.copy_(out.expected[:self.config.max_slots], non_blocking=True)
        n = len(out.sampled)
        tokens = host.tokens[:n]
        tokens.copy_(out.next_tokens[:n], non_blocking=True)
        sampled_rows = rows[out.sampled]
        self.slots.mark_in_flight(sampled_rows, self._step_index)
        step = InFlight(self._step_index, now, plan, rows, sampled_rows, tokens, preds, t_dev, record_event(self.device),
                        clock)
        self._step_index += 1
        return step

    def _complete(self, step: InFlight) -> list[RequestOutput]:
        """The one sync (the step's tokens; its predictions were copied before them on the same
        stream), then postprocess and telemetry."""
        clock = step.clock
        clock.resume()
        self._sync(step)
        clock.mark("sync")
        self.slots.clear_in_flight(step.sampled_rows, step.index)
        preds = None if step.preds is None else step.preds.numpy()
        outputs = self._postprocess(step.sampled_rows, step.tokens.numpy(), preds)
        try:
            self.predictions.refresh(preds)
            clock.mark("postprocess")
            self._pending_timing = record_step(self.telemetry, step, self.kv_spec.bytes_per_block,
                                               self.profile_phases)
        except BaseException:
            self._aborted += outputs          # delivered by the next step(): no request is lost
            raise
        return outputs

    def _postprocess(self, rows: np.ndarray, tokens: np.ndarray, readout: np.ndarray | None) -> list[RequestOutput]:
        """The step's sampling rows and tokens, the probe's readout by slot (rows of requests that
        ended since the step launched are dropped): per-row Python only for appends and finishes."""
        live = self.slots.live(rows)
        if not live.all():
            rows, tokens = rows[live], tokens[live]
        slots = rows[:, SCHED.SLOT]
        predicted = (rows[:, SCHED.FLAGS] & row_flags.RECOMPUTE) == 0
        values = self.predictions.observe(slots, self.slots.gen[slots].astype(np.int64), predicted, readout)
        # from the commit to the last append below nothing can fail: the host's tokens and the
        # requests' output lists advance together (a rollback requeues over the former)
        fed, eos, length = self.slots.commit(slots, tokens)
        now = self.now()
        reqs = [self.slots.req[s] for s in slots.tolist()]
        toks = tokens.tolist()
        for req, tok in zip(reqs, toks):
            req.output_ids.append(tok)
            m = req.metrics
            m.token_times.append(now)
            if m.first_token is None:
                m.first_token = now
        if values is not None:
            for i, g, v in zip(np.flatnonzero(predicted).tolist(), fed[predicted].tolist(), values[predicted].tolist()):
                reqs[i].metrics.predictions.append((g, v))
        reasons: list[FinishReason | None] = [None] * len(reqs)
        custom = self.slots.custom_stop[slots]
        for i in np.flatnonzero(eos | length | custom).tolist():     # rows that may finish
            if eos[i] or (custom[i] and toks[i] in reqs[i].params.stop_token_ids):
                reasons[i] = FinishReason.STOP
            elif length[i]:
                reasons[i] = FinishReason.LENGTH
        stream_text(reqs, tokens, reasons)
        outputs = [request_output(req) for req, reason in zip(reqs, reasons) if reason is None]
        try:
            ending = [(req, reason) for req, reason in zip(reqs, reasons) if reason is not None]
            if ending:
                outputs += self._end(*zip(*ending))
        except BaseException:
            self._aborted += outputs          # the outputs made so far are delivered by the next step()
            raise
        return outputs

    def _end(self, reqs, reasons) -> list[RequestOutput]:
        """Ends requests: reasons set, released through the core, then finished. A fault part-way
        leaves requests with a reason set but not finished (`_ending`); the next step or
        `_roll_back` completes them."""
        for req, reason in zip(reqs, reasons):
            req.finish_reason = reason
            self._ending.add(req.id)
        self.core.release([r.serial for r in reqs], [r.slot for r in reqs])
        return [self._finish(r, r.finish_reason) for r in reqs]

    def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
        """Marks `req` finished and unbinds its slot (its scheduler entry and blocks are already
        released through the core)."""
        req.finish_reason = reason
        req.metrics.finished = self.now()
        self._ending.discard(req.id)
        self.slots.unbind(req.slot)
        self.predictions.unbind(req.slot)
        del self._requests[req.id]
        self.telemetry.add_request(req.id, len(req.prompt_ids), len(req.output_ids), reason.value, req.metrics)
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.predictions.fallback = self.drift.add(req.metrics, len(req.output_ids), req.metrics.finished)
        return request_output(req)

    # ---- faults ----------------------------------------------------------------------------------
    def _roll_back(self, exc: BaseException) -> None:
        """Undoes a failed step: the steps in flight are dropped, every request holding KV goes
        back to waiting over the outputs the host confirmed (a recompute later gives the same
        tokens). A sticky device error ends every request and the engine instead."""
        self._in_flight = None
        self._pending_timing = None
        if not is_sticky_device_error(exc):
            try:
                self._complete_ending()
                ids, slots = self.core.holders()
                self.core.requeue(ids, slots, self.slots.gen[slots], self.now())
                self.slots.clear_in_flight()
                logger.warning("step %d failed (%s: %s); rolled back, %d requests requeued", self._step_index,
                               type(exc).__name__, exc, len(ids))
                return
            except Exception as again:       # the rollback itself failed: nothing can be trusted
                exc = again
        self._dead = f"{type(exc).__name__}: {exc}"
        logger.error("engine stopped: %s", self._dead)
        for req in list(self._requests.values()):
            req.error = self._dead
            self._aborted.append(self._finish(req, FinishReason.ERROR))

    def _complete_ending(self) -> None:
        """Finishes the requests a fault caught inside `_end` (reason set, maybe not released)."""
        ending = [self._requests[i] for i in sorted(self._ending)]      # `_finish` takes each out
        known = [r for r in ending if self.core.knows(r.serial)]
        if known:
            self.core.release([r.serial for r in known], [r.slot for r in known])
        self._aborted += [self._finish(r, r.finish_reason) for r in ending]

    def _sync(self, step: InFlight) -> None:
        """The step's one host-device sync: its tokens (the predictions were copied before them
        on the same stream, so they are in too)."""
        if step.end is not None:
            step.end.synchronize()

    # ---- whole batches -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, progress: bool = True, true_lengths: Sequence[int] | None = None,
                 replay_lengths: Sequence[int] | None = None, chat: bool = False) -> list[RequestOutput]:
        """Runs `prompts` to completion; returns their final outputs in prompt order (`chat`,
        `true_lengths`: see `add_request`; `replay_lengths`: deprecated, use
        `SamplingParams(replay_length=...)` per prompt)."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        if replay_lengths is not None:
            plist = [deprecated_replay(p, n, "generate(replay_lengths=)") for p, n in zip(plist, replay_lengths)]
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, plist)):
                ids.append(self.add_request(p, sp, true_length=None if true_lengths is None else true_lengths[i],
                                            chat=chat))
        except BaseException:          # all or nothing: the prompts queued before a bad one leave again
            for rid in ids:
                req = self._requests.pop(rid)
                self.core.release([req.serial], [req.slot])
                self.slots.unbind(req.slot)
                self.predictions.unbind(req.slot)
            raise
        want, final = set(ids), {}
        with tqdm(total=len(ids), disable=not progress, desc=f"generate ({self.config.policy})", unit="req") as bar:
            while want - final.keys():
                for out in self.step():
                    if out.finished and out.request_id in want:
                        final[out.request_id] = out
                        bar.update(1)
        while self._in_flight is not None and not self._requests:     # a step of finished requests only
            self.step()
        return [final[i] for i in ids]

    def check_idle(self) -> None:
        """Asserts that no request holds anything (every block and slot returned)."""
        assert not self._requests and self.core.scheduler.num_active == 0, "requests still active"
        assert self._in_flight is None and (self.slots.pending == -1).all(), "a step is still in flight"
        self.kv.reclaim(wait=True)
        assert self.kv.num_free_blocks == self.kv.num_blocks, "GPU KV blocks leaked"
        assert self.kv.num_free_host_blocks == self.kv.num_host_blocks, "host KV blocks leaked"
        assert all(r is None for r in self.slots.req), "a slot is still bound"
        self.kv.gpu_allocator.check()
        self.kv.host_allocator.check()
