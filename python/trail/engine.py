"""The engine: the one generation loop. It ties the scheduler, the KV cache, the model runner and
the length predictor together (the only module that does).

    engine = LLMEngine.from_pretrained(folder_or_gguf_or_preset, EngineConfig(policy="trail"))
    rid = engine.add_request("Hello", SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for out in engine.step(): ...

One step is one straight walk (DESIGN.md "Data flow of one engine step"):
  schedule    Scheduler.step(predictions, generated counts, free blocks, now) -> plan (trail._C)
  preempt     keep: nothing; swap: one batched copy to pinned host; recompute: free the blocks
  KV          swap-ins (one batched copy, the compute stream waits for it), allocations; the
              runner commits the block tables
  execute     forward with the layer tap -> probe (pool / MLP / Bayes filter by slot) -> sample
              (a decode-only step on CUDA: one replay of a graph captured at start-up)
  sync        predictions, then tokens, copied to pinned host; ONE sync (the tokens)
  postprocess append tokens, stop checks (EOS, stop ids / strings, max_new_tokens), outputs,
              finish + free (scheduler and KV cache)
Per-request state the hot path needs lives in per-slot numpy arrays (slots come from the
scheduler at add and stay until finish), so the plan is applied by numpy over its columns.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trail.detokenize import find_stop, text_delta
from trail.engine_config import EngineConfig
from trail.kv_cache import KVCache, KVCacheSpec
from trail.model_runner import BatchPlan, ModelRunner, graph_batch_sizes, mixed_token_sizes
from trail.request import FinishReason, Request, RequestMetrics, RequestOutput, SamplingParams
from trail.scheduler import PREEMPT, SCHED, Mode, Resume, Scheduler, State
from trail.telemetry import Telemetry
from trail_kernels import row_flags
from trail_kernels.probe import ProbeParams, ProbeState, probe_step

logger = logging.getLogger(__name__)

# prompt ids -> expected total output tokens, one per prompt (the prompt predictor's contract)
PromptPredictorFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


class LLMEngine:
    """Serves requests with a policy of `trail.scheduler.POLICIES` over a paged KV cache.

    model: a `trail.models.LlamaModel` (its device and dtype are the engine's); tokenizer: for text
    prompts, text output and stop strings (None: token ids only); probe / probe_layer: the length
    probe (`ProbeParams`) and the layer it reads (required by `trail`, optional otherwise: it then
    only feeds telemetry); probe_max_new: the output cap the probe was trained with;
    prompt_predictor: ordering before prefill (required by `sjf_prompt`); eos_token_ids: stop ids
    of the model (default: the tokenizer's eos id); clock: the engine's time source (seconds);
    profile_phases: record each step's phase times (host: perf_counter; device: CUDA events, read
    after the step's own sync, so no extra sync) in `telemetry.phases`.
    """

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, *,
                 probe: ProbeParams | None = None, probe_layer: int | None = None,
                 probe_max_new: int | None = None, prompt_predictor: PromptPredictorFn | None = None,
                 eos_token_ids: Iterable[int] | None = None, seed: int = 0, clock: Callable[[], float] | None = None,
                 profile_phases: bool = False):
        self.config = config = config or EngineConfig()
        self.profile_phases = profile_phases
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.model, self.tokenizer = model, tokenizer
        mcfg = model.config
        if config.policy == "trail" and probe is None:
            raise ValueError("the trail policy needs a length probe (probe=..., probe_layer=...)")
        if config.policy == "sjf_prompt" and prompt_predictor is None:
            raise ValueError("the sjf_prompt policy needs a prompt predictor")
        if probe is not None and (probe_layer is None or not 0 <= probe_layer < mcfg.num_layers):
            raise ValueError(f"probe_layer must be a layer index in [0, {mcfg.num_layers}), got {probe_layer!r}")
        if config.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                             f"max_position_embeddings={mcfg.max_position_embeddings}")
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_ids = np.array(sorted(set(int(e) for e in eos_token_ids)), np.int64)
        if (self.eos_ids < 0).any():
            raise ValueError(f"eos_token_ids must be non-negative token ids, got {sorted(eos_token_ids)}")
        self._is_eos = np.zeros(max(mcfg.vocab_size, int(self.eos_ids.max(initial=-1)) + 1), bool)
        self._is_eos[self.eos_ids] = True           # a lookup per sampled token (np.isin: ~1 us per row)

        # ---- memory: one config -> KV layout + scheduler config ----
        self.kv_spec = KVCacheSpec(mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, dtype=self.dtype,
                                   block_size=config.block_size)
        self.layout = config.kv_layout(self.kv_spec, self._free_device_bytes(mcfg.vocab_size))
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
        rate = config.prefill_tokens_per_s or self._measure_prefill_rate()
        self.prefill_tokens_per_s = rate
        self.scheduler_config = config.scheduler_config(self.kv_spec, self.layout, 1.0 / rate)
        self.scheduler = Scheduler(self.scheduler_config)
        if self.device.type == "cuda" and not config.enforce_eager:
            sizes = graph_batch_sizes(config.max_batch, config.cuda_graph_sizes)
            tokens = mixed_token_sizes(config.max_tokens_per_step, rows, config.cuda_graph_tokens)
            logger.info("engine: capturing CUDA graphs: decode batch sizes %s; mixed steps of %d rows, token "
                        "sizes %s", sizes, rows, tokens)
            self.runner.capture_graphs(sizes, tokens, mixed_rows=rows)
        logger.info("engine: %s, %d GPU + %d host KV blocks of %d tokens, prefill %.0f tok/s, policy %s",
                    self.device, self.layout.num_gpu_blocks, self.layout.num_host_blocks, config.block_size,
                    rate, config.policy)

        # ---- per-slot host state (numpy: the hot path never touches Request objects) ----
        n, width = config.max_slots, config.max_model_len + 1
        self._tokens = np.zeros((n, width), np.int64)     # prompt + output ids
        self._seq_len = np.zeros(n, np.int64)
        self._prompt_len = np.zeros(n, np.int64)
        self._max_new = np.zeros(n, np.int64)
        self._stop_len = np.zeros(n, np.int64)             # max_new_tokens, or a replayed length
        self._ignore_eos = np.zeros(n, bool)
        self._custom_stop = np.zeros(n, bool)              # stop ids beyond EOS, or stop strings
        self._slot_req: list[Request | None] = [None] * n
        self._recorded: list[np.ndarray | None] = [None] * n     # add_request(recorded_predictions=)
        self._recorded_value = np.full(n, math.nan)             # the slot's current recorded value
        self._num_recorded = 0
        self._slot_rid = np.full(n, -1, np.int64)           # the request bound to each slot
        self._pending_rid = np.full(n, -1, np.int64)        # request whose token is in flight, by slot,
        self._pending_step = np.full(n, -1, np.int64)       # and the step drawing it
        self._has_readout = np.zeros(n, bool)               # the probe has read the request out
        self._prompt_pred = np.zeros(n, np.float32)
        # what the scheduler reads: predictions by slot (see _refresh_predictions), generated counts
        self._pred_sched = torch.zeros(n, dtype=torch.float32)
        self._gen_host = torch.zeros(n, dtype=torch.int32)
        self._gen = self._gen_host.numpy()
        # pinned landing buffers of the device's predictions and tokens, one per step in flight
        self._host_buffers = [_HostBuffers(n, rows, self.device.type == "cuda") for _ in range(2)]
        self._compute_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._pending_timing: tuple | None = None
        self._in_flight: _InFlight | None = None

        self._requests: dict[int, Request] = {}
        self._aborted: list[RequestOutput] = []
        self._next_id = 0
        self._step_index = 0
        self._warned_probe_range = False
        self._clock = clock or time.perf_counter
        self._t0 = self._clock()
        self.telemetry = Telemetry()

    # ---- construction helpers ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source, config: EngineConfig | None = None, *, probe: str | None = "shipped",
                        prompt_predictor: str | None = "boe", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, seed: int = 0) -> "LLMEngine":
        """`source`: an HF folder, a .gguf file, or `random:<preset>` (no tokenizer). `probe`:
        'shipped' (the probe shipped for this model, if any), a probe file path, or None.
        `prompt_predictor`: 'boe' / 'minilm' (the one beside a probe given by path, else the shipped
        one), a file path, or None."""
        from trail.models.loader import default_dtype, load_model, load_tokenizer
        from trail.predictor.probe_file import load_probe_params, shipped_probe_dir

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or default_dtype(device)
        model = load_model(source, device, dtype)
        random = str(source).startswith("random:")
        tokenizer = None if random else load_tokenizer(source)
        probe_params = layer = max_new = predictor = None
        folder = None
        if probe == "shipped" or prompt_predictor in ("boe", "minilm"):
            try:      # shipped files are found by the model folder's name (probes/<name>/)
                folder = shipped_probe_dir(Path(str(source)).with_suffix("").name.split(".")[0])
            except FileNotFoundError:
                logger.warning("no shipped probe for %s", source)
        if probe is not None:
            path = (folder / "probe") if probe == "shipped" and folder is not None else (None if probe == "shipped" else probe)
            if path is not None:
                probe_params, spec = load_probe_params(path, expect_d=model.config.hidden_size)
                layer, max_new = spec.layer, spec.max_new_tokens
        if prompt_predictor in ("boe", "minilm"):
            # beside a probe given by path (trained together), else the shipped one
            name = f"prompt_{prompt_predictor}"
            beside = Path(str(probe)).parent if probe not in (None, "shipped") else None
            found = [d for d in (beside, folder) if d is not None and (d / f"{name}.json").is_file()]
            if found:
                predictor = prompt_predictor_fn(found[0] / name, model, tokenizer)
            else:
                logger.warning("no %s prompt predictor beside the probe or shipped for %s", prompt_predictor, source)
        elif prompt_predictor is not None:
            predictor = prompt_predictor_fn(prompt_predictor, model, tokenizer)
        eos = generation_eos_ids(source, tokenizer)
        return cls(model, tokenizer, config, probe=probe_params, probe_layer=layer, probe_max_new=max_new,
                   prompt_predictor=predictor, eos_token_ids=eos, seed=seed)

    def _free_device_bytes(self, vocab: int) -> int | None:
        if self.device.type != "cuda" or self.config.num_gpu_blocks is not None:
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = self.config.max_slots * (vocab + 4 * self.config.max_model_len // self.config.block_size)
        return max(0, int(total * self.config.gpu_memory_utilization) - (total - free) - reserve)

    def _measure_prefill_rate(self) -> float:
        """Tokens per second of one prefill (the recompute cost), timed on a warm model."""
        n = min(256, self.config.max_tokens_per_step, self.config.max_model_len)
        slot = 0
        ids = np.random.default_rng(0).integers(0, self.model.config.vocab_size, n)
        plan = BatchPlan(np.array([slot]), np.array([row_flags.PREFILL | row_flags.FIRST_CHUNK]), np.array([0]),
                         np.array([n]), ids)
        self.kv.allocate({slot: n})
        try:
            times = []
            for _ in range(2):
                t = time.perf_counter()
                self.runner.forward(self.runner.prepare_plan(plan))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t)
        finally:
            self.kv.free(slot)
        return n / min(times)

    # ---- requests ------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the engine started (the clock of arrivals, metrics and the scheduler)."""
        return self._clock() - self._t0

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    request_id: int | None = None, arrival: float | None = None,
                    true_length: int | None = None, replay_length: int | None = None,
                    recorded_predictions: Sequence[float] | np.ndarray | None = None) -> int:
        """Queues a request; returns its id. Everything is validated here (a bad request raises
        ValueError and changes nothing). `true_length`: the real output length, known only to the
        oracle policy. `replay_length`: stop after exactly this many tokens (EOS ignored), as a
        benchmark replaying recorded lengths does; it is also the request's true length. The
        predictor and the scheduler still see `params.max_new_tokens` as the cap, so a replayed
        length never leaks into trail's predictions. `recorded_predictions`: a benchmark's
        recorded per-step predictions (element g: predicted remaining output tokens once g output
        tokens were fed; the last one holds beyond the end); the scheduler gets them instead of
        the probe's readout for this request (the probe still runs, for its cost), and so does
        telemetry."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            text = prompt
            ids = [int(t) for t in self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        limit = self.config.max_model_len
        if len(ids) + params.max_new_tokens > limit:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                             f"max_model_len={limit}")
        if replay_length is not None:
            if not (isinstance(replay_length, int) and 1 <= replay_length <= params.max_new_tokens):
                raise ValueError(f"replay_length must be an integer in [1, max_new_tokens={params.max_new_tokens}], "
                                 f"got {replay_length!r}")
            true_length = replay_length
        if true_length is not None and not (isinstance(true_length, int) and true_length >= 1):
            raise ValueError(f"true_length must be an integer >= 1, got {true_length!r}")
        recorded = None
        if recorded_predictions is not None:
            recorded = np.asarray(recorded_predictions, dtype=np.float64).reshape(-1)
            if recorded.size == 0 or not np.isfinite(recorded).all() or (recorded < 0).any():
                raise ValueError("recorded_predictions must be a non-empty sequence of finite values >= 0")
        if self.config.policy == "oracle" and true_length is None:
            raise ValueError("the oracle policy needs each request's true_length")
        rid = self._next_id if request_id is None else int(request_id)
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already in use")
        arrival = self.now() if arrival is None else float(arrival)
        prediction = self._prompt_prediction(ids, params.max_new_tokens)
        self._warn_probe_range(params.max_new_tokens)
        slot = self.scheduler.add(rid, arrival, len(ids), params.max_new_tokens, prediction, true_length)
        # from here on nothing can fail
        self._next_id = max(self._next_id, rid + 1)
        req = Request(rid, ids, params, frozenset(self.eos_ids.tolist()) | frozenset(params.stop_token_ids),
                      text, true_length, slot, metrics=RequestMetrics(arrival, prompt_prediction=prediction))
        self._requests[rid] = req
        self._slot_req[slot] = req
        self._slot_rid[slot] = rid
        self._has_readout[slot] = False
        self._prompt_pred[slot] = self._pred_sched[slot] = prediction
        self._tokens[slot, :len(ids)] = ids
        self._seq_len[slot] = self._prompt_len[slot] = len(ids)
        self._max_new[slot] = params.max_new_tokens
        self._stop_len[slot] = params.max_new_tokens if replay_length is None else replay_length
        self._gen[slot] = 0
        self._ignore_eos[slot] = params.ignore_eos or replay_length is not None
        self._custom_stop[slot] = bool(params.stop_token_ids or params.stop)
        self._recorded[slot] = recorded
        self._recorded_value[slot] = math.nan
        self._num_recorded += recorded is not None
        self.runner.set_sampling(slot, params)
        return rid

    def _prompt_prediction(self, ids: Sequence[int], max_new: int) -> float:
        if self.prompt_predictor is not None:
            value = float(np.asarray(self.prompt_predictor([ids])).reshape(-1)[0])
            if not math.isfinite(value) or value < 0:
                logger.warning("prompt predictor returned %r; using the prior mean", value)
                value = self._default_prediction
        else:
            value = self._default_prediction
        return min(value, float(max_new))

    def _warn_probe_range(self, max_new: int) -> None:
        if self.probe is None or self.probe_max_new is None or max_new <= self.probe_max_new or self._warned_probe_range:
            return
        self._warned_probe_range = True
        logger.warning("max_new_tokens=%d exceeds the %d tokens the probe was trained on: predicted remaining "
                       "lengths saturate near its largest bin (%.0f tokens) and stay within [0, max_new - generated]",
                       max_new, self.probe_max_new, float(self.probe.bin_values.max()))

    def abort(self, request_id: int) -> bool:
        """Removes a request in any state (waiting, prefilling, running, kept, swapped, dropped
        for recompute); its blocks and slot are freed at once and its final output (reason
        'abort') comes with the next `step()`. False if it is unknown or already finished."""
        req = self._requests.get(request_id)
        if req is None or req.finished:
            return False
        self._release(req, self.scheduler.cancel(request_id))
        self._aborted.append(self._finish(req, FinishReason.ABORT))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._aborted) or self._in_flight is not None

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of every request that got a token, finished or was
        aborted since the last step. With `EngineConfig.overlap` the step launched here is
        completed (synced, postprocessed) by the next call, after that call has launched its own:
        the CPU schedules and prepares step n+1 while the GPU runs step n, and outputs arrive
        one call later."""
        outputs, self._aborted = self._aborted, []
        launched = self._launch() if self._requests else None
        if self.config.overlap:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        if done is not None:
            outputs += self._complete(done)
        return outputs

    def _launch(self) -> "_InFlight | None":
        """schedule -> apply preemptions -> KV (swap-ins, allocations) -> stage -> execute, and the
        copies of predictions then tokens to pinned host; nothing waits for the device."""
        clock = _PhaseClock(self.device if self.profile_phases else None)
        now = self.now()
        self._collect_device_time()
        self.kv.reclaim()
        plan = self.scheduler.step(self._pred_sched, self._gen_host, self.kv.num_free_blocks,
                                   self.kv.num_free_host_blocks, now)
        clock.mark("schedule")
        counts = self._apply_preemptions(plan.preempted.numpy())
        rows = self._drop_finishing(plan.scheduled.numpy())
        if len(rows) == 0:
            logger.debug("step %d: nothing runnable (stop reason %d)", self._step_index, plan.stop_reason)
            return None
        swap_in_bytes = self._prepare_kv(rows, now)
        batch = self.runner.prepare_plan(self._batch_plan(rows))
        clock.mark("prepare", device=True)
        t_dev = self._record_event()
        next_tokens, expected = self._execute(batch, rows, clock)
        host = self._host_buffers[self._step_index % 2]     # the step in flight owns the other one
        preds = None
        if expected is not None:
            preds = host.preds
            preds.copy_(expected[:self.config.max_slots], non_blocking=True)
        n = len(batch.sampled)
        tokens = host.tokens[:n]
        tokens.copy_(next_tokens[:n], non_blocking=True)
        end = self._record_event()
        sampled_rows = rows[batch.sampled]
        self._pending_rid[sampled_rows[:, SCHED.SLOT]] = sampled_rows[:, SCHED.ID]
        self._pending_step[sampled_rows[:, SCHED.SLOT]] = self._step_index
        step = _InFlight(self._step_index, now, rows, sampled_rows, tokens, preds, t_dev, end, clock, counts,
                         swap_in_bytes)
        self._step_index += 1
        return step

    def _complete(self, step: "_InFlight") -> list[RequestOutput]:
        """The one sync (the step's tokens; its predictions were copied before them on the same
        stream), then postprocess and telemetry."""
        clock, rows = step.clock, step.rows
        clock.resume()
        self._sync(step)
        clock.mark("sync")
        slots = step.sampled_rows[:, SCHED.SLOT]
        self._pending_rid[slots[self._pending_step[slots] == step.index]] = -1
        preds = None if step.preds is None else step.preds.numpy()
        outputs = self._postprocess(step.sampled_rows, step.tokens.numpy(), preds)
        self._refresh_predictions(preds)
        clock.mark("postprocess")
        counts = step.counts
        recompute = (rows[:, SCHED.FLAGS] & row_flags.RECOMPUTE) != 0
        prefill = rows[:, SCHED.KIND] == 1
        self.telemetry.add_step(
            step.index, step.now, len(rows), int(rows[:, SCHED.TOKENS].sum()), int(rows[prefill, SCHED.TOKENS].sum()),
            int((~prefill).sum()), counts[Mode.KEEP], counts[Mode.SWAP], counts[Mode.RECOMPUTE], counts["forced"],
            counts["swap_out_bytes"], step.swap_in_bytes, int(rows[recompute, SCHED.TOKENS].sum()),
            clock.total() - clock.get("sync"), clock.get("sync"), math.nan)
        if step.t_dev is not None:
            self._pending_timing = (step.t_dev, step.end, len(self.telemetry.steps) - 1)
        if self.profile_phases:
            self.telemetry.phases.append(clock.report(len(rows), int(rows[:, SCHED.TOKENS].sum())))
        return outputs

    def _drop_finishing(self, rows: np.ndarray) -> np.ndarray:
        """Sampling rows of requests whose token in flight is their last (they reached their length
        and finish when that step completes; only with overlap) are not run."""
        if not self.config.overlap or self._in_flight is None or len(rows) == 0:
            return rows
        slots = rows[:, SCHED.SLOT]
        finishing = ((self._pending_rid[slots] == rows[:, SCHED.ID])
                     & (self._gen[slots] + 1 >= self._stop_len[slots])
                     & ((rows[:, SCHED.FLAGS] & row_flags.SAMPLE) != 0))
        return rows[~finishing] if finishing.any() else rows

    def _execute(self, batch, rows: np.ndarray, clock: "_PhaseClock"):
        """-> (next tokens, the probe's expected remaining by slot or None). A step with a captured
        CUDA graph (decode, or mixed within the token buckets) is one replay of forward + probe +
        sample (its phases read as 'forward'); any other step runs them eagerly."""
        if batch.graph is not None:
            next_tokens, expected, _ = self.runner.replay(batch)
            clock.mark("forward", device=True)
            return next_tokens, (expected if self.probe is not None else None)
        logits, tap = self.runner.forward(batch)
        clock.mark("forward", device=True)
        expected = None
        if self.probe is not None:
            expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                                  tap.max_new_tokens, self.probe, self.probe_state,
                                  has_prefill=bool((rows[:, SCHED.FLAGS] & row_flags.PREFILL).any()))
        clock.mark("probe", device=True)
        next_tokens = self.runner.sample(logits, batch)
        clock.mark("sample", device=True)
        return next_tokens, expected

    def _apply_preemptions(self, pre: np.ndarray) -> dict:
        """keep: nothing; swap: one batched copy to host (its GPU blocks usable by this step's
        work at once: the compute stream waits for the copy); recompute: free the blocks."""
        counts = {Mode.KEEP: 0, Mode.SWAP: 0, Mode.RECOMPUTE: 0, "forced": 0, "swap_out_bytes": 0}
        if len(pre) == 0:
            return counts
        modes = pre[:, PREEMPT.MODE]
        for mode in (Mode.KEEP, Mode.SWAP, Mode.RECOMPUTE):
            counts[mode] = int((modes == mode).sum())
        counts["forced"] = int(pre[:, PREEMPT.FORCED].sum())
        name = {Mode.KEEP: "keep", Mode.SWAP: "swap", Mode.RECOMPUTE: "recompute"}
        for rid, mode, forced in zip(pre[:, PREEMPT.ID].tolist(), modes.tolist(), pre[:, PREEMPT.FORCED].tolist()):
            m = self._requests[rid].metrics
            m.preemptions[name[Mode(mode)]] += 1
            m.forced_preemptions += forced
        swap_slots = pre[modes == Mode.SWAP, PREEMPT.SLOT].tolist()
        if swap_slots:
            handles = self.kv.swap_out(swap_slots)
            for slot, handle in zip(swap_slots, handles):
                req = self._slot_req[slot]
                req.swapped = handle
                req.metrics.swapped_out_blocks += handle.num_blocks
                counts["swap_out_bytes"] += handle.num_blocks * self.kv_spec.bytes_per_block
            self.kv.reclaim(stream=self._compute_stream)
        for slot in pre[modes == Mode.RECOMPUTE, PREEMPT.SLOT].tolist():
            self.kv.free(slot)
        return counts

    def _prepare_kv(self, rows: np.ndarray, now: float) -> int:
        """Swap-ins (one batched copy; the compute stream waits for it), then allocations."""
        swap_in = np.flatnonzero(rows[:, SCHED.RESUME] == Resume.SWAP_IN)
        moved = 0
        if swap_in.size:
            items = []
            for slot in rows[swap_in, SCHED.SLOT].tolist():
                req = self._slot_req[slot]
                items.append((slot, req.swapped))
                moved += req.swapped.num_blocks * self.kv_spec.bytes_per_block
                req.swapped = None
            event = self.kv.swap_in(items)
            self.kv.wait(event, self._compute_stream)
            self.kv.reclaim(stream=self._compute_stream)
        self.kv.allocate_many(rows[:, SCHED.SLOT], rows[:, SCHED.CTX_START] + rows[:, SCHED.TOKENS])
        recompute = np.flatnonzero(rows[:, SCHED.FLAGS] & row_flags.RECOMPUTE)
        for rid, n in zip(rows[recompute, SCHED.ID].tolist(), rows[recompute, SCHED.TOKENS].tolist()):
            self._requests[rid].metrics.recomputed_tokens += n
        first = rows[:, SCHED.CTX_START] == 0
        if first.any():
            for rid in rows[first, SCHED.ID].tolist():
                m = self._requests[rid].metrics
                if m.first_scheduled is None:
                    m.first_scheduled = now
        return moved

    def _batch_plan(self, rows: np.ndarray) -> BatchPlan:
        """The plan's rows as the runner's BatchPlan. A decode row's token is the slot's last
        sampled token, which the runner reads on the device (-1 here): with overlap the host has
        not seen it yet."""
        slots, starts, ntok, flags = (rows[:, SCHED.SLOT], rows[:, SCHED.CTX_START], rows[:, SCHED.TOKENS],
                                      rows[:, SCHED.FLAGS])
        cu = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(ntok, out=cu[1:])
        positions = np.repeat(starts - cu[:-1], ntok) + np.arange(cu[-1])
        prefill = (flags & row_flags.PREFILL) != 0
        unknown = prefill & (starts + ntok > self._seq_len[slots])
        if unknown.any():      # a recompute re-feeding a token still in flight: never planned so
            raise RuntimeError(f"step {self._step_index}: prefill rows of requests "
                               f"{rows[unknown, SCHED.ID].tolist()} need tokens the host has not seen yet")
        token_ids = np.where(np.repeat(prefill, ntok), self._tokens[np.repeat(slots, ntok), positions], -1)
        # the probe's count: output tokens fed up to this row (0 for a prompt chunk)
        gen = self._gen[slots].astype(np.int64) + (self._pending_rid[slots] == rows[:, SCHED.ID])
        num_generated = np.where(prefill, np.where((flags & row_flags.RECOMPUTE) != 0, gen, 0), gen)
        return BatchPlan(slots, flags, starts, ntok, token_ids, num_generated, self._max_new[slots])

    def _record_event(self):
        if self.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _sync(self, step: "_InFlight") -> None:
        """The step's one host-device sync: its tokens (the predictions were copied before them
        on the same stream, so they are in too)."""
        if step.end is not None:
            step.end.synchronize()

    def _collect_device_time(self) -> None:
        if self._pending_timing is None:
            return
        start, end, index = self._pending_timing
        self._pending_timing = None
        if index < len(self.telemetry.steps):
            row = list(self.telemetry.steps[index])
            row[-1] = start.elapsed_time(end) / 1e3
            self.telemetry.steps[index] = tuple(row)

    def _postprocess(self, rows: np.ndarray, tokens: np.ndarray, preds: np.ndarray | None) -> list[RequestOutput]:
        """`rows`: the step's sampling rows, `tokens` their tokens, `preds` the probe's readout by
        slot. Rows of requests that finished or were aborted since the step launched (with
        overlap) are dropped."""
        live = self._slot_rid[rows[:, SCHED.SLOT]] == rows[:, SCHED.ID]
        if not live.all():
            rows, tokens = rows[live], tokens[live]
        flags = rows[:, SCHED.FLAGS]
        slots = rows[:, SCHED.SLOT]
        fed = self._gen[slots].astype(np.int64)        # output tokens the model had read before this token
        self._tokens[slots, self._seq_len[slots]] = tokens
        self._seq_len[slots] += 1
        self._gen[slots] += 1
        gen = self._gen[slots]
        eos = self._is_eos[tokens] & ~self._ignore_eos[slots]
        length = gen >= self._stop_len[slots]
        predicted = (flags & row_flags.RECOMPUTE) == 0
        readout = None
        if preds is not None:
            readout = preds[slots].astype(np.float64)
            self._has_readout[slots[predicted]] = True
            self._apply_recorded(slots, fed, predicted, readout)
        now = self.now()
        outputs, finished = [], []
        custom = self._custom_stop[slots]
        for i, slot in enumerate(slots.tolist()):
            req = self._slot_req[slot]
            tok = int(tokens[i])
            req.output_ids.append(tok)
            m = req.metrics
            m.token_times.append(now)
            if m.first_token is None:
                m.first_token = now
            if readout is not None and predicted[i]:
                m.predictions.append((int(fed[i]), float(readout[i])))
            reason = FinishReason.STOP if eos[i] else FinishReason.LENGTH if length[i] else None
            if custom[i] and reason is None and tok in req.params.stop_token_ids:
                reason = FinishReason.STOP
            before = len(req.text)
            text_delta(self.tokenizer, req)
            if custom[i] and req.params.stop:
                cut = find_stop(req.text, req.params.stop, len(req.text) - before)
                if cut >= 0:
                    req.text = req.text[:cut]
                    reason = FinishReason.STOP
            if reason is not None:
                req.finish_reason = reason
                finished.append(req)
            else:
                outputs.append(self._output(req))
        if finished:
            outputs += self._finish_many(finished)
        return outputs

    def _apply_recorded(self, slots: np.ndarray, fed: np.ndarray, predicted: np.ndarray, readout: np.ndarray) -> None:
        """Recorded predictions (add_request(recorded_predictions=)) replace the probe's readout
        of the requests that carry them."""
        if not self._num_recorded:
            return
        for i, (slot, g, ok) in enumerate(zip(slots.tolist(), fed.tolist(), predicted.tolist())):
            rec = self._recorded[slot]
            if rec is not None:
                if ok:
                    self._recorded_value[slot] = rec[min(g, len(rec) - 1)]
                readout[i] = self._recorded_value[slot]

    def _refresh_predictions(self, preds: np.ndarray | None) -> None:
        """What the scheduler reads next: the probe's readout by slot; a slot whose request has no
        readout yet (its prefill not completed) keeps its prompt-time prediction; recorded
        predictions where a request carries them."""
        sched = self._pred_sched.numpy()
        if preds is not None:
            np.copyto(sched, preds)
        waiting = ~self._has_readout
        sched[waiting] = self._prompt_pred[waiting]
        if self._num_recorded:
            held = np.flatnonzero(~np.isnan(self._recorded_value))
            sched[held] = self._recorded_value[held]

    def _output(self, req: Request) -> RequestOutput:
        new_ids = req.output_ids[req.sent_tokens:]
        delta = req.text[req.sent_chars:]
        req.sent_tokens, req.sent_chars = len(req.output_ids), len(req.text)
        return RequestOutput(req.id, new_ids, delta, list(req.output_ids), req.text, req.finished,
                             req.finish_reason, req.metrics, req.prompt_ids)

    def _finish_many(self, reqs: list[Request]) -> list[RequestOutput]:
        """Requests that stopped: removed from the scheduler in whatever state it now holds them
        (with overlap a request may have been preempted after its last token was drawn), their
        blocks (GPU, or host if swapped out) and slots released."""
        states = self.scheduler.cancel_many([r.id for r in reqs]).tolist()
        outputs = []
        for req, state in zip(reqs, states):
            self._release(req, State(state))
            outputs.append(self._finish(req, req.finish_reason))
        return outputs

    def _release(self, req: Request, state: State) -> None:
        if state == State.SWAPPED:
            self.kv.discard(req.swapped)
            req.swapped = None
        else:
            self.kv.free(req.slot)

    def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
        """Marks `req` finished and unbinds its slot (its scheduler entry and blocks are already
        released: `_finish_many`, `abort`)."""
        req.finish_reason = reason
        req.metrics.finished = self.now()
        slot = req.slot
        self._slot_req[slot] = None
        self._slot_rid[slot] = -1
        self._num_recorded -= self._recorded[slot] is not None
        self._recorded[slot] = None
        self._recorded_value[slot] = math.nan
        del self._requests[req.id]
        self.telemetry.add_request(req.id, len(req.prompt_ids), len(req.output_ids), reason.value, req.metrics)
        return self._output(req)

    # ---- whole batches -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, progress: bool = True, true_lengths: Sequence[int] | None = None,
                 replay_lengths: Sequence[int] | None = None) -> list[RequestOutput]:
        """Runs `prompts` to completion; returns their final outputs in prompt order
        (`true_lengths` / `replay_lengths`: per prompt, see `add_request`)."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp, true_length=None if true_lengths is None else true_lengths[i],
                                replay_length=None if replay_lengths is None else replay_lengths[i])
               for i, (p, sp) in enumerate(zip(prompts, plist))]
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
        assert not self._requests and self.scheduler.num_active == 0, "requests still active"
        assert self._in_flight is None and (self._pending_rid == -1).all(), "a step is still in flight"
        self.kv.reclaim(wait=True)
        assert self.kv.num_free_blocks == self.kv.num_blocks, "GPU KV blocks leaked"
        assert self.kv.num_free_host_blocks == self.kv.num_host_blocks, "host KV blocks leaked"
        assert all(r is None for r in self._slot_req), "a slot is still bound"
        self.kv.gpu_allocator.check()
        self.kv.host_allocator.check()


class _HostBuffers:
    """Pinned landing buffers of one step's device results: predictions by slot, tokens by
    sampling row."""

    def __init__(self, slots: int, rows: int, pinned: bool):
        self.preds = torch.zeros(slots, dtype=torch.float32, pin_memory=pinned)
        self.tokens = torch.zeros(rows, dtype=torch.int64, pin_memory=pinned)


@dataclass
class _InFlight:
    """A launched step, until `_complete` syncs and postprocesses it."""
    index: int
    now: float
    rows: np.ndarray              # the plan's rows
    sampled_rows: np.ndarray      # the rows that draw a token, in token order
    tokens: torch.Tensor          # pinned host, filled by the step's copy
    preds: torch.Tensor | None    # pinned host, the probe's readout by slot
    t_dev: object                 # CUDA events around the step's device work (None on CPU)
    end: object
    clock: "_PhaseClock"
    counts: dict
    swap_in_bytes: int


class _PhaseClock:
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


def prompt_predictor_fn(path, model, tokenizer) -> PromptPredictorFn:
    """A prompt predictor file (kind prompt_boe / prompt_minilm) as the engine's callable."""
    from trail.predictor.prompt_predictors import PromptPredictor

    emb = model.embed_tokens.weight.detach().float().cpu()
    predictor = PromptPredictor(path, embeddings=emb)

    def predict(prompts: Sequence[Sequence[int]]) -> np.ndarray:
        if predictor.spec.kind == "prompt_minilm":
            if tokenizer is None:
                raise ValueError("the MiniLM prompt predictor needs text: load a tokenizer")
            texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
            return predictor.expected_total(texts=texts).cpu().numpy()
        return predictor.expected_total(prompt_ids=[list(p) for p in prompts]).cpu().numpy()

    return predict


def generation_eos_ids(source, tokenizer) -> list[int]:
    """Stop ids of a model: its generation_config.json eos_token_id(s) and the tokenizer's."""
    import json

    ids = set()
    folder = Path(str(source))
    cfg = folder / "generation_config.json" if folder.is_dir() else None
    if cfg is not None and cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
