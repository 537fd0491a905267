"""One engine step on the model: a batch plan in (numpy columns), next tokens and the layer-L tap
out.

The batch contract is `trail.batch`: a `BatchPlan` holds one row per request of the step. Rows
with the SAMPLE flag draw a next token (in row order); their sampling parameters are per slot,
written once when a request is admitted (`set_sampling`), never per step. No per-request Python
objects are touched on this path.

    runner = ModelRunner(model, kv_cache, tap_layer=L)
    runner.set_sampling(slot, params)               # at admission
    out = runner.execute(plan)                      # commits the block tables itself
    out.next_tokens   int64 [R] on the device, one per SAMPLE row (out.sampled: their row indices)
    out.tap           LayerTap(states [T, d], cu_seqlens int32 [S+1], slot_ids int32 [S], ...)

`step(segments)` is the same path for callers that think in `Segment`s (`trail.segments`).

The runner commits the KV block tables before the forward and checks, on the host, that every
row's positions are mapped (a forgotten allocation would otherwise read block 0). The batch is
staged in the runner's persistent buffers (`trail.step_buffers`: numpy writes into a pinned area,
one copy to the device per step); the slot mapping is computed on the device; nothing in
`forward` or `sample` reads device memory back, so the engine's one sync is its own read of
`next_tokens`. A `StepBatch` holds views of those buffers: it is valid until the next
`prepare_plan`.

CUDA graphs (`capture_graphs`, never on CPU; buckets: `trail.graph_buckets`): decode-only steps run
as one graph per batch bucket, steps with prefill work as one graph per token bucket of
`mixed_rows` rows (slot mapping -> forward -> layer tap -> the attached probe -> sampler, greedy
and sampling variants). A step is padded to its bucket with pad rows that touch nothing real (see
`StepStaging.stage`); a mixed graph's last pad row also holds the spare tokens. Larger steps run
eager.

Repetition penalty needs every token a request has fed to the model; the runner keeps a
`[max_slots, vocab]` bool mask on the device, set as tokens pass through `forward` and cleared when
a slot starts over (a row starting at position 0: a new request or a recompute, which re-feeds
prompt + generated tokens). Requests never move between slots.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

import trail
from trail.batch import BatchPlan, LayerTap, StepBatch, StepOutput
from trail.graph_buckets import bucket_for
from trail.models.llama import LlamaModel
from trail.sampling import MAX_CANDIDATES, apply_repetition_penalty, sample, sample_reference
from trail.segments import Segment, segments_to_plan, validate_plan
from trail.step_buffers import SlotSampling, StepBuffers, StepStaging
from trail_kernels import row_flags
from trail_kernels.probe import probe_step

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def gc_paused():
    """No garbage-collection pass while CUDA graphs are captured: a pass can free the CUDA objects
    of unreachable engines (their graphs, events, pinned buffers), which is illegal while a stream
    captures and invalidates the capture (seen on the H100 when a process builds engines one after
    another, as the GPU test suite does). One collection first, then none until the end."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _no_mark(phase: str, device: bool = False) -> None:
    pass


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache, tap_layer: int | None = None, seed: int = 0, *,
                 max_tokens: int = 256, max_rows: int | None = None):
        cfg = model.config
        spec = kv_cache.spec
        if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
            raise ValueError(f"KV cache spec {spec} does not fit the model (layers={cfg.num_layers}, "
                             f"kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim})")
        if tap_layer is not None and not 0 <= tap_layer < cfg.num_layers:
            raise ValueError(f"tap_layer={tap_layer} out of range [0, {cfg.num_layers})")
        self.model, self.kv_cache, self.config = model, kv_cache, cfg
        self.device = kv_cache.device
        self.tap_layer = tap_layer
        self.block_size = kv_cache.block_size
        self.max_slots, self.max_blocks = kv_cache.block_tables.shape
        self.max_context = self.max_blocks * self.block_size
        # row max_slots is a scratch row for padded rows (CUDA-graph buckets)
        self.seen = torch.zeros(self.max_slots + 1, cfg.vocab_size, dtype=torch.bool, device=self.device)
        # each slot's last sampled token (row max_slots: pads), the input of its next decode
        self.last_tokens = torch.zeros(self.max_slots + 1, dtype=torch.int64, device=self.device)
        # per-slot sampling parameters, written at admission (set_sampling); index max_slots = pads
        self.sampling = SlotSampling(self.max_slots, seed)
        self.staging = StepStaging(kv_cache, self.sampling, max_tokens, max_rows, self._drop_graphs)
        model.rope().ensure(self.max_context)      # RoPE table sized once, for every position
        # CUDA graphs (capture_graphs); the probe they run
        self.probe = self.probe_state = None
        self.graph_sizes: list[int] = []            # decode graphs: batch buckets
        self.mixed_token_sizes: list[int] = []      # mixed graphs: token buckets, of mixed_rows rows
        self.mixed_rows = 0
        self._graphs: dict[tuple[str, int, bool], tuple] = {}
        self._graph_batches: dict[tuple[str, int], StepBatch] = {}

    def attach_probe(self, params, state) -> None:
        """The length probe (ProbeParams, ProbeState) that every step runs after the forward, in
        a captured graph or eagerly (`execute`)."""
        if self._graphs:
            raise RuntimeError("attach the probe before capturing graphs")
        self.probe, self.probe_state = params, state

    # ---- per-slot sampling parameters ---------------------------------------------------------
    def set_sampling(self, slot: int, params=None) -> None:
        """The slot's sampling parameters until the next call (None: greedy). A request without
        a seed gets one drawn here, so its draws do not depend on its batch."""
        self.sampling.set(slot, params)

    # ---- host side ------------------------------------------------------------------------
    def plan_from_segments(self, segments: Sequence[Segment]) -> BatchPlan:
        """Checks `segments` (nothing changes on a bad one) and turns them into a BatchPlan,
        setting each sampling segment's slot parameters."""
        plan = segments_to_plan(segments)
        self.check_plan(plan)
        for s in segments:
            if s.sample:
                self.set_sampling(s.slot, s.params)
        return plan

    def check_plan(self, plan: BatchPlan) -> None:
        """Shapes, ranges and block mappings (host state only: no device reads)."""
        validate_plan(plan, self.max_slots, self.max_context, self.config.vocab_size, self.config.sliding_window)

    def _check_mapped(self, plan: BatchPlan) -> None:
        need = -(-(plan.starts + plan.num_tokens) // self.block_size)
        short = np.flatnonzero(self.kv_cache.mapped_blocks(plan.slots) < need)
        if short.size:
            i = int(short[0])
            raise RuntimeError(f"slot {int(plan.slots[i])}: positions up to {int(plan.starts[i] + plan.num_tokens[i])} "
                               f"need {int(need[i])} KV blocks but {int(self.kv_cache.mapped_blocks(plan.slots[i:i + 1])[0])} "
                               f"are mapped (allocate before the step)")

    # ---- host side: the step's batch in the persistent buffers (step_buffers) -------------------
    @property
    def buffers(self) -> StepBuffers:
        return self.staging.buffers

    def _drop_graphs(self, tokens: int, rows: int) -> None:
        """Before the step buffers grow: the graphs captured over them can no longer run."""
        b = self.buffers
        if self._graphs:
            logger.warning("a step of %d tokens / %d rows exceeds the step buffers (%d / %d): CUDA graphs dropped, "
                           "steps run eager", tokens, rows, b.max_tokens, b.max_rows)
            self._graphs.clear()
            self._graph_batches.clear()
            self.graph_sizes, self.mixed_token_sizes, self.mixed_rows = [], [], 0

    def graph_eligible(self, plan: BatchPlan) -> bool:
        """A decode-only step that a captured graph can run: every row one token, SAMPLE only (no
        prefill, no recompute), a cached context, and a bucket large enough."""
        return (bool(self.graph_sizes) and plan.num_rows <= self.graph_sizes[-1]
                and len(plan.token_ids) == plan.num_rows and bool((plan.flags == row_flags.SAMPLE).all())
                and int(plan.starts.min()) > 0)

    def _graph_for(self, plan: BatchPlan, greedy: bool) -> tuple | None:
        """The captured graph that runs `plan`: ('decode', rows bucket, greedy) for a decode-only
        step, ('mixed', tokens bucket, greedy) for any other step that fits (mixed graphs have
        `mixed_rows` rows: the plan's, then pads, the last pad holding the spare tokens)."""
        if self.graph_eligible(plan):
            return ("decode", bucket_for(plan.num_rows, self.graph_sizes), greedy)
        if self.mixed_token_sizes and plan.num_rows < self.mixed_rows:
            need = len(plan.token_ids) + self.mixed_rows - plan.num_rows
            bucket = bucket_for(need, self.mixed_token_sizes)
            if bucket is not None:
                return ("mixed", bucket, greedy)
        return None

    def prepare_plan(self, plan: BatchPlan, pad_to: int | None = None, pad_tokens_to: int | None = None) -> StepBatch:
        """Commits the block tables, checks the plan's blocks are mapped, and stages the batch in
        the persistent buffers (one host-to-device copy). A step with a captured graph is padded
        to its bucket (`batch.graph` set); `pad_to` / `pad_tokens_to` pad an eager step the same
        way (tests: rows, and tokens as a mixed graph pads them)."""
        self.kv_cache.commit_block_tables()
        self._check_mapped(plan)
        S = plan.num_rows
        sample_slots = plan.slots[(plan.flags & row_flags.SAMPLE) != 0]
        all_greedy = bool((self.sampling.temperature[sample_slots] <= 0).all())
        exact = not all_greedy and bool((self.sampling.top_k[sample_slots] > MAX_CANDIDATES).any())
        graph = None
        if pad_to is None and pad_tokens_to is None and not exact:
            graph = self._graph_for(plan, all_greedy)
        if graph is not None:
            kind, size, _ = graph
            rows, tokens = (size, None) if kind == "decode" else (self.mixed_rows, size)
            _, sampled, _, _ = self.staging.stage(plan, rows, tokens)
            return replace(self._graph_batches[kind, size], sampled=sampled.tolist(), all_greedy=all_greedy,
                           graph=graph, num_real_rows=S)
        rows = S if pad_to is None else pad_to
        if rows < S:
            raise ValueError(f"pad_to={pad_to} is below the plan's {S} rows")
        tokens, sampled, samples, resets = self.staging.stage(plan, rows, pad_tokens_to)
        lens, ends = plan.num_tokens, plan.starts + plan.num_tokens
        batch = self.staging.views(tokens, rows, samples, resets, max(int(lens.max()), tokens - len(plan.token_ids)),
                                   int(ends.max()), bool((lens == 1).all()) and tokens == rows, slot_mapping=True)
        batch.sampled, batch.all_greedy, batch.exact_sampler, batch.num_real_rows = sampled.tolist(), all_greedy, exact, S
        return batch

    # ---- CUDA graphs --------------------------------------------------------------------------
    def capture_graphs(self, decode_sizes: Sequence[int], mixed_token_sizes: Sequence[int] = (),
                       mixed_rows: int | None = None) -> int:
        """Captures CUDA graphs over the persistent buffers, each with every row a pad (nothing
        real is touched): per batch size in `decode_sizes`, the decode step; per token count in
        `mixed_token_sizes`, a step of `mixed_rows` rows (default: the step buffers' rows) of any
        kind (prefill chunks, recomputes and decodes: varlen attention, the probe's pooling pass).
        Each graph runs slot mapping, forward with the layer tap, the attached probe and sampling,
        in a greedy and a sampling variant. Attention is captured at the static bound
        `max_context` (grids then never change). On CPU nothing is captured. Returns the number
        of graphs."""
        if self.device.type != "cuda":
            logger.info("CUDA graphs: not on CPU (every step runs eager)")
            return 0
        sizes = sorted({int(b) for b in decode_sizes})
        tsizes = sorted({int(t) for t in mixed_token_sizes})
        if (sizes and sizes[0] < 1) or not (sizes or tsizes):
            raise ValueError(f"graph batch sizes must be >= 1, got {sizes}")
        mrows = int(mixed_rows or self.buffers.max_rows) if tsizes else 0
        if tsizes and tsizes[0] <= mrows:
            raise ValueError(f"mixed graph token sizes must exceed mixed_rows={mrows}, got {tsizes}")
        max_rows = max(sizes[-1] if sizes else 0, mrows)
        if self.probe_state is not None and max_rows > self.probe_state.max_rows:
            raise ValueError(f"graph rows {max_rows} exceed the probe state's max_rows {self.probe_state.max_rows}")
        self._graphs.clear()
        self._graph_batches.clear()
        self.graph_sizes, self.mixed_token_sizes, self.mixed_rows = [], [], 0
        self.staging.ensure_capacity(max(sizes[-1] if sizes else 0, tsizes[-1] if tsizes else 0), max_rows)
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        empty = BatchPlan(*(np.zeros(0, np.int64) for _ in range(5)))
        graphs, batches = {}, {}
        # largest first: the pool's blocks get reused by the smaller ones
        todo = [("mixed", t) for t in reversed(tsizes)] + [("decode", b) for b in reversed(sizes)]
        with gc_paused():
            for i, (kind, size) in enumerate(todo):
                if kind == "decode":
                    self.staging.stage(empty, size)
                    batch = self.staging.views(size, size, size, 0, 1, self.max_context, True, slot_mapping=False)
                else:
                    self.staging.stage(empty, mrows, size)
                    batch = self.staging.views(size, mrows, mrows, mrows, size, self.max_context, False, slot_mapping=False)
                batches[kind, size] = batch
                for greedy in (True, False):
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):            # warm-up: Triton compiles, workspaces settle
                        self._graph_body(batch, greedy, kind == "mixed")
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self._graph_body(batch, greedy, kind == "mixed")
                    graphs[kind, size, greedy] = (graph, out)
                logger.info("CUDA graphs: captured %s %s %d (%d/%d, %.1f s)", kind, "tokens" if kind == "mixed" else "batch",
                            size, i + 1, len(todo), time.perf_counter() - t0)
        torch.cuda.synchronize(self.device)
        self._graphs, self._graph_batches = graphs, batches
        self.graph_sizes, self.mixed_token_sizes, self.mixed_rows = sizes, tsizes, mrows
        return len(graphs)

    def _graph_body(self, batch: StepBatch, greedy: bool, has_prefill: bool):
        """What a graph runs: slot mapping (on the device), forward + tap, probe, sampling."""
        slot_mapping = trail.ops.slot_mapping(self.kv_cache.block_tables, batch.token_slots, batch.meta.positions,
                                              self.block_size)
        batch = replace(batch, meta=replace(batch.meta, slot_mapping=slot_mapping))
        logits, tap = self.forward(batch)
        expected = None
        if self.probe is not None and tap is not None:
            expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                                  tap.max_new_tokens, self.probe, self.probe_state, has_prefill=has_prefill)
        return self._sample(logits, batch, greedy, exact=False), expected, tap

    def replay(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor | None, LayerTap | None]:
        """Runs a staged graph step: -> (next tokens [sampling rows] int64, the probe's
        expected_remaining by slot or None, the tap (padded to the bucket))."""
        graph, (tokens, expected, tap) = self._graphs[batch.graph]
        graph.replay()
        return tokens[:len(batch.sampled)], expected, tap

    def prepare(self, segments: Sequence[Segment]) -> StepBatch:
        return self.prepare_plan(self.plan_from_segments(segments))

    # ---- device side -----------------------------------------------------------------------
    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, LayerTap | None]:
        """-> (logits fp32 [R, vocab] of the sampling rows' last tokens, layer tap or None)."""
        # a token id of -1 is the slot's last sampled token, read here on the device
        slots = batch.token_slots.long()
        ids = torch.where(batch.input_ids >= 0, batch.input_ids, self.last_tokens.index_select(0, slots.clamp(min=0)))
        self.seen.index_fill_(0, batch.reset_slots, False)
        # a flat scatter: indexed assignment (index_put_) checks its indices with a host sync
        self.seen.view(-1).scatter_(0, torch.where(slots >= 0, slots, self.max_slots) * self.config.vocab_size + ids,
                                    True)
        logits, states = self.model(ids, batch.meta, self.kv_cache,
                                    logits_indices=batch.logits_indices, tap_layer=self.tap_layer)
        tap = None
        if states is not None:
            tap = LayerTap(self.tap_layer, states, batch.meta.cu_seqlens_q, batch.probe_slots,
                           batch.starts, batch.is_decode, batch.sampled_mask, batch.flags,
                           batch.num_generated, batch.max_new_tokens)
        return logits, tap

    def sample(self, logits: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Next tokens of the sampling rows (pads included when the batch is padded)."""
        return self._sample(logits, batch, batch.all_greedy, batch.exact_sampler)

    def _sample(self, logits: torch.Tensor, batch: StepBatch, greedy: bool, exact: bool) -> torch.Tensor:
        """Next tokens of the sampling entries, also kept by slot in `last_tokens` (the next
        decode's input)."""
        seen = self.seen.index_select(0, batch.sample_slots)
        if greedy:                # argmax only when no row samples
            tokens = torch.argmax(apply_repetition_penalty(logits.float(), seen, batch.repetition_penalty), dim=-1)
        else:
            fn = sample_reference if exact else sample    # exact: a row's top_k exceeds the candidates
            tokens = fn(logits, batch.temperature, batch.top_k, batch.top_p, batch.repetition_penalty, batch.uniforms,
                        seen)
        self.last_tokens.index_copy_(0, batch.sample_slots, tokens)
        return tokens

    def execute(self, plan: BatchPlan, clock=None) -> StepOutput:
        """The whole step on the device: stage -> forward with the layer tap -> the attached probe
        -> sample; one replay where a captured graph fits, else eagerly. Nothing syncs. `clock`:
        an optional phase clock (`mark(phase, device)`), marked after each phase."""
        mark = clock.mark if clock is not None else _no_mark
        batch = self.prepare_plan(plan)
        mark("prepare", True)
        if batch.graph is not None:
            tokens, expected, tap = self.replay(batch)
            mark("forward", True)
            return StepOutput(tokens, batch.sampled, tap, batch, expected)
        logits, tap = self.forward(batch)
        mark("forward", True)
        expected = None
        if self.probe is not None and tap is not None:
            expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                                  tap.max_new_tokens, self.probe, self.probe_state,
                                  has_prefill=bool((plan.flags & row_flags.PREFILL).any()))
        mark("probe", True)
        tokens = self.sample(logits, batch)[:len(batch.sampled)]
        mark("sample", True)
        return StepOutput(tokens, batch.sampled, tap, batch, expected)

    def step(self, segments: Sequence[Segment]) -> StepOutput:
        return self.execute(self.plan_from_segments(segments))
