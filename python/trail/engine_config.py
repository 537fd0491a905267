"""One engine configuration from which both the scheduler's `SchedulerConfig` and the `KVCache`
sizes are derived, so block size, GPU and host block counts and the swap / recompute cost model
can never disagree between them. The simulator (sim.py) derives its limits from the same object.

    cfg = EngineConfig(policy="trail", max_batch=48, num_gpu_blocks=512, num_host_blocks=128)
    layout = cfg.kv_layout(spec)                    # KVLayout: blocks on GPU / host, table width
    sched = cfg.scheduler_config(spec, layout, recompute_s_per_token=...)

Cost model (DESIGN.md "What we remove from TRAIL's costs"): swapping n tokens out and back costs
2 * n * spec.bytes_per_token / (pcie_gbps * 1e9) seconds; recomputing them costs
n / prefill_tokens_per_s. The prefill rate is measured by the engine at start-up unless given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from trail.kv_cache_spec import KVCacheSpec
from trail.sampling import _is_int, _is_real
from trail.scheduler_types import POLICIES, POLICY_DEFAULTS, SchedulerConfig, check_field

# Fields of SchedulerConfig that EngineConfig owns (derived, never set through policy_options).
_DERIVED = ("policy", "max_slots", "max_batch", "max_tokens_per_step", "max_prefill_chunk", "block_size",
            "num_gpu_blocks", "num_host_blocks", "bytes_per_token", "pcie_gbps", "recompute_s_per_token")

# EngineConfig's own fields: (name, lo, hi) of the integers, (name, lo, strict, hi) of the numbers
# (the native scheduler's bounds: int32 counts, block and token counts below 2**53).
_INT_FIELDS = (("max_batch", 1, 2**31 - 1), ("max_slots", 1, 2**31 - 1), ("max_tokens_per_step", 1, 2**31 - 1),
               ("max_prefill_chunk", 1, 2**31 - 1), ("max_model_len", 1, 2**31 - 1), ("block_size", 1, 2**31 - 1),
               ("num_gpu_blocks", 1, 2**53), ("num_host_blocks", 0, 2**53), ("drift_window", 0, 2**31 - 1))
_FLOAT_FIELDS = (("gpu_memory_utilization", 0.0, True, 1.0), ("kv_cache_gib", 0.0, False, None),
                 ("swap_space_gib", 0.0, False, None), ("pcie_gbps", 0.0, True, None),
                 ("prefill_tokens_per_s", 0.0, True, None))
_OPTIONAL = ("max_prefill_chunk", "num_gpu_blocks", "num_host_blocks", "prefill_tokens_per_s")


def _got(value) -> str:
    return f"got {value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class KVLayout:
    """Resolved KV sizes: what the KVCache allocates and what the scheduler counts."""
    block_size: int
    num_gpu_blocks: int
    num_host_blocks: int
    max_blocks_per_request: int


@dataclass(frozen=True)
class EngineConfig:
    """Limits, memory and policy of one engine (or one simulated engine).

    policy / policy_options: the scheduling policy (fcfs, sjf_prompt, trail, oracle) and any other
      SchedulerConfig field that is not a size (c, margin, aging_rate, max_preemptions, allow_keep,
      allow_swap, watermark_blocks, ...).
    max_batch: running requests per step; max_slots: requests held at once (waiting + running);
      max_tokens_per_step: tokens per forward (decodes + prefill chunks); max_model_len: prompt +
      output tokens of one request.
    Memory: num_gpu_blocks, else gpu_memory_utilization on CUDA (vLLM's meaning: the fraction of
      the device this process may use, weights included), else kv_cache_gib on CPU; host swap space
      num_host_blocks, else swap_space_gib.
    Cost model: pcie_gbps (one way, pinned); prefill_tokens_per_s (None: measured at start-up).
    Speed: enforce_eager (no CUDA graphs); cuda_graph_sizes (decode batch buckets captured at
      start-up on CUDA, None: trail.graph_buckets.DEFAULT_GRAPH_SIZES below max_batch, plus
      max_batch); cuda_graph_tokens (token buckets of the graphs that run every other step:
      prefill chunks, recomputes and decodes together, in max_batch + 1 rows; None:
      trail.graph_buckets.mixed_token_sizes up to max_tokens_per_step (at most 8192) +
      max_batch + 1; (): such steps run eager). On CPU every step runs eager.
    overlap: the CPU schedules and prepares step n+1 while the device runs step n (each
      `LLMEngine.step()` launches one step and completes the one before; outputs arrive one call
      later, the scheduler sees predictions and finishes one step later).
    drift_window: finished requests over which the drift guard compares the probe's error with the
      prompt predictor's; while the probe is worse, ranking uses the prompt prediction
      (trail.drift_guard; 0: off).
    """
    policy: str = "trail"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    max_batch: int = 64
    max_slots: int = 1024
    max_tokens_per_step: int = 2048
    max_prefill_chunk: int | None = None
    max_model_len: int = 2048
    block_size: int = 16
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: float = 1.0
    num_host_blocks: int | None = None
    swap_space_gib: float = 1.0
    pcie_gbps: float = 25.0
    prefill_tokens_per_s: float | None = None
    enforce_eager: bool = False
    cuda_graph_sizes: tuple[int, ...] | None = None
    cuda_graph_tokens: tuple[int, ...] | None = None
    overlap: bool = True
    drift_window: int = 256

    def __post_init__(self):
        """Validates every field: types strict (ints are int, never bool or float; numbers are int
        or float, never bool or str; flags are bool), each error naming the field, its value and
        the allowed range (ValueError)."""
        if not (isinstance(self.policy, str) and self.policy in POLICIES):
            raise ValueError(f"EngineConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.policy_options, Mapping):
            raise ValueError(f"EngineConfig.policy_options must be a mapping of SchedulerConfig options, got "
                             f"{self.policy_options!r} ({type(self.policy_options).__name__})")
        known = {f.name for f in fields(SchedulerConfig)}
        for key, value in self.policy_options.items():
            if key in _DERIVED:
                raise ValueError(f"EngineConfig.policy_options: {key!r} is derived from the engine config; "
                                 f"set it on EngineConfig instead")
            if key not in known:
                raise ValueError(f"EngineConfig.policy_options: unknown option {key!r}; known: "
                                 f"{sorted(known - set(_DERIVED))}")
            if value is None and key in POLICY_DEFAULTS[self.policy]:
                continue                      # None: the policy's default
            check_field(key, value, "EngineConfig.policy_options: ")
        for name, lo, hi in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not (_is_int(value) and lo <= value <= hi):
                raise ValueError(f"EngineConfig.{name} must be {'None or ' if name in _OPTIONAL else ''}an integer "
                                 f"(not bool or float) in [{lo}, {'2**53' if hi == 2**53 else hi}], {_got(value)}")
        if self.max_slots < self.max_batch:
            raise ValueError(f"EngineConfig.max_slots ({self.max_slots}) must be >= max_batch ({self.max_batch})")
        for name, lo, strict, hi in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not (_is_real(value) and math.isfinite(value) and (value > lo if strict else value >= lo)
                    and (hi is None or value <= hi)):
                rng = f"({lo:g}, {hi:g}]" if hi is not None else f"{'>' if strict else '>='} {lo:g}"
                raise ValueError(f"EngineConfig.{name} must be {'None or ' if name in _OPTIONAL else ''}a finite "
                                 f"number (int or float) {'in ' if hi is not None else ''}{rng}, {_got(value)}")
        for name in ("enforce_eager", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be a bool (True or False), {_got(getattr(self, name))}")
        mixed = f"[max_batch + 2 = {self.max_batch + 2}, 2**31) (a mixed graph has max_batch + 1 rows)"
        for name, rng, lo, hi in (("cuda_graph_sizes", f"[1, max_batch={self.max_batch}]", 1, self.max_batch),
                                  ("cuda_graph_tokens", mixed, self.max_batch + 2, 2**31 - 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"EngineConfig.{name} must be None or a tuple of integers in {rng}, {_got(value)}")
            for i, b in enumerate(value):
                if not (_is_int(b) and lo <= b <= hi):
                    raise ValueError(f"EngineConfig.{name}[{i}] must be an integer in {rng}, {_got(b)}")

    def with_policy(self, policy: str, **policy_options) -> "EngineConfig":
        """The same limits and memory under another policy (options replace the old ones)."""
        return replace(self, policy=policy, policy_options=dict(policy_options))

    @property
    def max_blocks_per_request(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def kv_layout(self, spec: KVCacheSpec, free_device_bytes: int | None = None) -> KVLayout:
        """Block counts for `spec`. `free_device_bytes`: what the KV pool may take on a CUDA device
        (the engine computes it from gpu_memory_utilization); None sizes the pool by
        `kv_cache_gib` unless `num_gpu_blocks` is set."""
        if spec.block_size != self.block_size:
            raise ValueError(f"KV spec block_size {spec.block_size} != EngineConfig.block_size {self.block_size}")
        per_block = spec.bytes_per_block
        if self.num_gpu_blocks is not None:
            gpu = self.num_gpu_blocks
        elif free_device_bytes is not None:
            gpu = int(free_device_bytes // per_block)
        else:
            gpu = int(self.kv_cache_gib * 2**30 // per_block)
        host = self.num_host_blocks if self.num_host_blocks is not None else int(self.swap_space_gib * 2**30 // per_block)
        if gpu < self.max_blocks_per_request:
            raise ValueError(f"KV pool of {gpu} blocks cannot hold one request of max_model_len={self.max_model_len} "
                             f"({self.max_blocks_per_request} blocks of {self.block_size} tokens); give more memory "
                             f"or a smaller max_model_len")
        return KVLayout(self.block_size, gpu, host, self.max_blocks_per_request)

    def scheduler_config(self, spec: KVCacheSpec, layout: KVLayout, recompute_s_per_token: float) -> SchedulerConfig:
        """The scheduler's config: sizes from `layout`, costs from `spec` and the prefill rate."""
        return SchedulerConfig(
            policy=self.policy, max_slots=self.max_slots, max_batch=self.max_batch,
            max_tokens_per_step=self.max_tokens_per_step, max_prefill_chunk=self.max_prefill_chunk,
            block_size=layout.block_size, num_gpu_blocks=layout.num_gpu_blocks,
            num_host_blocks=layout.num_host_blocks, bytes_per_token=float(spec.bytes_per_token),
            pcie_gbps=self.pcie_gbps, recompute_s_per_token=float(recompute_s_per_token),
            **dict(self.policy_options)).resolved()
