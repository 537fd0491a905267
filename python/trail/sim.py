"""Discrete-event simulator of serving under each policy (DESIGN.md "How scheduling results are
judged"). It drives the engine's serving core (`trail.serving_core.ServingCore`: the real policy
step over trail._C and the same plan application) over a host-only block ledger
(`trail.block_ledger.HostBlockLedger`), sizing memory through `EngineConfig` (`kv_layout`,
`scheduler_config`); only the model is replaced, by a step-time model

    t = base + per_decode * decode_rows + per_prefill_token * prefill_tokens
          + per_ctx_token * sum(context after the step) + swapped_bytes / (pcie_gbps * 1e9)
          [+ mixed_base + mixed_per_row * rows   when the step has a prefill / recompute row]

(the bracket: an engine whose decode-only steps replay a CUDA graph while steps with a prefill row
run eagerly pays a fixed launch cost for every admission; `fit_step_model` fits both classes from
an engine's per-step telemetry; mixed_* = 0 is the single-class model of the committed fit)

(recomputed tokens are prefill tokens, so recompute costs what prefill costs), optionally times a
lognormal noise factor. A trace is arrivals + per request prompt length, true output length,
max_new_tokens, a prompt-time prediction of the total and per-step predictions of the remaining
length (exact, noisy, or recorded from the probe filter). `SimInput` (trace + engine limits +
step model) round-trips through JSON: the hook for validating against the GPU serving benchmark.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from trail.engine_config import EngineConfig
from trail.block_ledger import HostBlockLedger
from trail.kv_cache_spec import KVCacheSpec
from trail.scheduler import PREEMPT, SCHED, Mode
from trail.serving_core import ServingCore
from trail.sim_workload import (DEFAULT_RECORDED, LengthPool, SimTrace, burst_arrivals,  # noqa: F401
                                 load_recorded, make_trace, poisson_arrivals)
from trail_kernels import row_flags

logger = logging.getLogger(__name__)

STEP_LOG_FIELDS = ("t", "rows", "prefill_rows", "prefill_tokens", "preempted", "dt")


# ------------------------------------------------------------------------------------------------
# Step-time model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTimeModel:
    """Seconds per engine step from the batch's shape (see the module docstring)."""
    base_s: float
    per_decode_s: float
    per_prefill_token_s: float
    per_ctx_token_s: float
    pcie_gbps: float = 25.0
    source: str = ""
    mixed_base_s: float = 0.0       # extra per step with any prefill / recompute row (eager vs graph)
    mixed_per_row_s: float = 0.0    # extra per row (decode or prefill) of such a step

    def step_time(self, decode_rows: int, prefill_tokens: int, ctx_sum: int, swap_bytes: float = 0.0,
                  prefill_rows: int = 0) -> float:
        """`prefill_rows`: rows of the step that prefill or recompute (0: a decode-only step; when
        omitted a step with prefill_tokens > 0 counts as mixed with one prefill row)."""
        t = (self.base_s + self.per_decode_s * decode_rows + self.per_prefill_token_s * prefill_tokens
             + self.per_ctx_token_s * ctx_sum + swap_bytes / (self.pcie_gbps * 1e9))
        if prefill_rows > 0 or prefill_tokens > 0:
            t += self.mixed_base_s + self.mixed_per_row_s * (decode_rows + max(prefill_rows, 1))
        return t

    @classmethod
    def from_json(cls, path: str | Path) -> "StepTimeModel":
        d = json.loads(Path(path).read_text())
        d = d.get("model", d)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# package data (python/trail/data/sim/, shipped in the wheel): the committed step-time fit
# (bench/sim_fit.py) and the recorded probe predictions (bench/sim_record_predictions.py)
DATA_DIR = Path(__file__).resolve().parent / "data" / "sim"
DEFAULT_FIT = DATA_DIR / "step_fit.json"


def default_step_model() -> StepTimeModel:
    """The committed fit (trail/data/sim/step_fit.json, written by bench/sim_fit.py)."""
    return StepTimeModel.from_json(DEFAULT_FIT)


def llama3_8b_kv_spec(block_size: int = 16) -> KVCacheSpec:
    """KV of Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token): the shape the
    committed step-time fit was measured at."""
    return KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=block_size)


# ------------------------------------------------------------------------------------------------
# The simulated engine
# ------------------------------------------------------------------------------------------------
@dataclass
class SimResult:
    policy: str
    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    output_len: np.ndarray
    preempt: dict           # counts by kind: policy_keep, policy_swap, policy_recompute, forced_swap, ...
    swapped_bytes: float
    recomputed_tokens: int
    steps: int
    max_preemptions_of_one: int
    config: dict = field(default_factory=dict)
    step_log: np.ndarray | None = None     # [steps, len(STEP_LOG_FIELDS)] when simulate(record_steps=True)
    in_batch_s: np.ndarray | None = None   # per request: seconds in the running batch (steps it was in)

    def waiting(self) -> dict:
        """Where the latency goes, mean over requests: in the running batch (every step a request
        was in, its prefill included) and out of it (queued before its first step, or preempted:
        kept / swapped / dropped), beside the TTFT."""
        lat = self.finish - self.arrival
        busy = self.in_batch_s if self.in_batch_s is not None else np.full(len(lat), np.nan)
        return {"latency_s": float(lat.mean()), "ttft_s": float((self.first_token - self.arrival).mean()),
                "in_batch_s": float(busy.mean()), "not_in_batch_s": float((lat - busy).mean())}

    def step_summary(self) -> dict:
        """Steps with a prefill row ('mixed') against decode-only ones: counts and time shares."""
        if self.step_log is None:
            raise ValueError("simulate(..., record_steps=True) keeps the per-step log")
        lg = self.step_log
        col = {name: lg[:, i] for i, name in enumerate(STEP_LOG_FIELDS)}
        mixed, dt = col["prefill_rows"] > 0, col["dt"]
        total = float(dt.sum())
        return {"steps": int(len(lg)), "mixed_steps": int(mixed.sum()), "decode_steps": int((~mixed).sum()),
                "mixed_time_s": float(dt[mixed].sum()), "decode_time_s": float(dt[~mixed].sum()),
                "mixed_time_share": float(dt[mixed].sum()) / total if total > 0 else math.nan,
                "mean_rows": float(col["rows"].mean()) if len(lg) else math.nan}

    def metrics(self) -> dict:
        lat = self.finish - self.arrival
        ttft = self.first_token - self.arrival
        span = float(self.finish.max() - self.arrival.min()) if len(lat) else math.nan
        return {"mean_latency": float(lat.mean()), "p50_latency": float(np.percentile(lat, 50)),
                "p99_latency": float(np.percentile(lat, 99)), "mean_ttft": float(ttft.mean()),
                "p99_ttft": float(np.percentile(ttft, 99)),
                "throughput_rps": len(lat) / span, "throughput_tok_s": float(self.output_len.sum()) / span,
                "preemptions": dict(self.preempt), "preemptions_total": int(sum(self.preempt.values())),
                "swapped_bytes": self.swapped_bytes, "recomputed_tokens": self.recomputed_tokens,
                "max_preemptions_of_one": self.max_preemptions_of_one, "steps": self.steps}


@dataclass(frozen=True)
class SimInput:
    """Everything one run needs, as JSON: trace, engine limits (EngineConfig fields), KV spec,
    step-time model, step-time noise. The GPU serving benchmark can read the same file."""
    trace: SimTrace
    engine: EngineConfig
    spec: KVCacheSpec
    step_model: StepTimeModel
    noise_sd: float = 0.0

    def to_json(self) -> dict:
        eng = asdict(self.engine)
        eng["policy_options"] = dict(self.engine.policy_options)
        return {"trace": self.trace.to_json(), "engine": eng,
                "kv_spec": {"num_layers": self.spec.num_layers, "num_kv_heads": self.spec.num_kv_heads,
                            "head_dim": self.spec.head_dim, "dtype": str(self.spec.dtype).replace("torch.", ""),
                            "block_size": self.spec.block_size},
                "step_model": asdict(self.step_model), "noise_sd": self.noise_sd}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SimInput":
        ks = dict(d["kv_spec"])
        ks["dtype"] = getattr(torch, ks.get("dtype", "bfloat16"))
        return cls(SimTrace.from_json(d["trace"]), EngineConfig(**d["engine"]), KVCacheSpec(**ks),
                   StepTimeModel(**d["step_model"]), float(d.get("noise_sd", 0.0)))


def simulate(trace: SimTrace, engine: EngineConfig, spec: KVCacheSpec, step_model: StepTimeModel,
             noise_sd: float = 0.0, seed: int = 0, max_steps: int | None = None,
             record_steps: bool = False, admission=None) -> SimResult:
    """Runs `trace` to completion under `engine.policy`. Each step: arrivals up to now are added,
    the policy step plans, preempted rows are applied (swap out / free), scheduled rows swap in and
    allocate, the clock advances by the step-time model, sampled rows gain a token, requests that
    reached their true length finish. `record_steps`: keep one row per step in
    `SimResult.step_log` (STEP_LOG_FIELDS). `admission`: a hook that changes when a waiting
    request's key leaves the prompt prediction and charges the work that takes
    (`trail.sim_admission.ProbeAdmission`: bind / added / after_plan)."""
    step_log: list | None = [] if record_steps else None
    trace.validate()
    n = len(trace)
    layout = engine.kv_layout(spec)
    sc = engine.scheduler_config(spec, layout, recompute_s_per_token=step_model.per_prefill_token_s)
    core = ServingCore(sc, HostBlockLedger(layout.num_gpu_blocks, layout.num_host_blocks, sc.max_slots))
    sched = core.scheduler
    if admission is not None:
        admission.bind(core, trace, sc)
    bpb = spec.bytes_per_block
    rng = np.random.default_rng(seed + 1)
    ms = sc.max_slots
    pred_t, gen_t = torch.zeros(ms, dtype=torch.float32), torch.zeros(ms, dtype=torch.int32)
    pred_np, gen_np = pred_t.numpy(), gen_t.numpy()
    order = np.argsort(trace.arrival, kind="stable")
    arr_sorted = trace.arrival[order]
    L, cu, predv = trace.output_len, trace.pred_cu, trace.pred
    true_len = L if sc.policy == "oracle" else None
    gen = np.zeros(n, np.int64)
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    npre = np.zeros(n, np.int64)
    in_batch = np.zeros(n)          # seconds each request spent in the running batch
    kinds = {(0, Mode.KEEP): "policy_keep", (0, Mode.SWAP): "policy_swap", (0, Mode.RECOMPUTE): "policy_recompute",
             (1, Mode.SWAP): "forced_swap", (1, Mode.RECOMPUTE): "forced_recompute"}
    counts = {k: 0 for k in kinds.values()}
    swapped = 0.0
    recomputed = 0
    now, nxt, steps, done_n = 0.0, 0, 0, 0
    cap_active = ms
    while done_n < n:
        if nxt < n and sched.num_active < cap_active:
            j = min(int(np.searchsorted(arr_sorted, now, side="right")), nxt + cap_active - sched.num_active)
            if j > nxt:
                ids = order[nxt:j]
                slots = core.add(ids, trace.arrival[ids], trace.prompt_len[ids], trace.max_new[ids],
                                 trace.prompt_pred[ids], None if true_len is None else true_len[ids])
                gen_np[slots] = 0
                if admission is not None:
                    admission.added(ids, slots)
                pred_np[slots] = 0.0
                nxt = j
        if sched.num_active == 0:
            now = max(now, float(arr_sorted[nxt]))
            continue
        plan = core.schedule(pred_t, gen_t, now)
        steps += 1
        if max_steps is not None and steps > max_steps:
            raise RuntimeError(f"simulation exceeded {max_steps} steps ({done_n}/{n} finished)")
        P, S = plan.preempted, plan.rows
        for rid, forced, mode in P[:, [PREEMPT.ID, PREEMPT.FORCED, PREEMPT.MODE]].tolist():
            counts[kinds[(forced, mode)]] += 1
            npre[rid] += 1
        swap_bytes = float((plan.swap_out_blocks + plan.swap_in_blocks) * bpb)
        if len(S) == 0:
            # nothing fits yet and nothing runs (cannot happen with a validated config): jump time
            if nxt < n:
                now = max(now, float(arr_sorted[nxt]))
                continue
            raise RuntimeError("simulation stalled: nothing scheduled and no arrivals left")
        rids = S[:, SCHED.ID]
        tokens, flags = S[:, SCHED.TOKENS], S[:, SCHED.FLAGS]
        prefill = (flags & row_flags.PREFILL) != 0
        recomputed += int(tokens[(flags & row_flags.RECOMPUTE) != 0].sum())
        extra_tokens, extra_rows = 0.0, 0      # the admission hook's own prefill work in this step
        if admission is not None:
            prefill, extra_tokens, extra_rows = admission.after_plan(S, prefill)
        pf_tokens = int(tokens[prefill].sum())
        n_pf = int(prefill.sum())
        dt = step_model.step_time(int(len(S) - n_pf), pf_tokens + extra_tokens,
                                  int((S[:, SCHED.CTX_START] + tokens).sum()), swap_bytes,
                                  prefill_rows=n_pf + extra_rows)
        if noise_sd > 0:
            dt *= math.exp(rng.normal(0.0, noise_sd))
        if step_log is not None:
            step_log.append((now, len(S), n_pf + extra_rows, pf_tokens + extra_tokens, len(P), dt))
        now += dt
        in_batch[rids] += dt
        swapped += swap_bytes
        samp = (flags & row_flags.SAMPLE) != 0
        sr = rids[samp]
        if len(sr):
            gen[sr] += 1
            g = gen[sr]
            new = np.isnan(first[sr])
            first[sr[new]] = now
            ss = S[samp, SCHED.SLOT]
            gen_np[ss] = g
            pred_np[ss] = np.maximum(predv[np.minimum(cu[sr] + g - 1, cu[sr + 1] - 1)] - 1.0, 0.0)
            fin = sr[g >= L[sr]]
            if len(fin):
                core.release(fin, S[samp, SCHED.SLOT][g >= L[sr]])
                finish[fin] = now
                done_n += len(fin)
    cfg = {k: v for k, v in asdict(sc).items()}
    if admission is not None:
        cfg["admission"] = admission.summary()
    return SimResult(sc.policy, trace.arrival.copy(), first, finish, L.copy(), counts, swapped, recomputed, steps,
                     int(npre.max()) if n else 0, cfg,
                     None if step_log is None else np.asarray(step_log, np.float64).reshape(-1, len(STEP_LOG_FIELDS)),
                     in_batch)


# ------------------------------------------------------------------------------------------------
# Regimes, saturation, comparisons
# ------------------------------------------------------------------------------------------------
def regime_engine(regime: str, pool: LengthPool, policy: str = "fcfs", max_batch: int = 48,
                  block_size: int = 16, kv_requests: float = 24.0, host_blocks: int = 128,
                  max_tokens_per_step: int = 2048, **policy_options) -> EngineConfig:
    """`ample`: a batch cap (max_batch) with KV for every running request at max length, no host
    swap space needed. `kv`: a pool for `kv_requests` average requests (mean prompt + output tokens)
    + `host_blocks` host blocks, so memory binds before the batch cap."""
    max_len = int(pool.prompt_len.max()) + pool.max_new_tokens
    max_len = -(-max_len // block_size) * block_size
    per_req = float((pool.prompt_len + pool.output_len).mean()) / block_size
    if regime == "ample":
        gpu, host = max_batch * (max_len // block_size) + 64, 0
    elif regime == "kv":
        gpu, host = max(int(round(kv_requests * per_req)), max_len // block_size + 1), host_blocks
    else:
        raise ValueError(f"regime must be ample or kv, got {regime!r}")
    return EngineConfig(policy=policy, policy_options=policy_options, max_batch=max_batch, max_slots=4096,
                        max_tokens_per_step=max_tokens_per_step, max_model_len=max_len, block_size=block_size,
                        num_gpu_blocks=gpu, num_host_blocks=host)


def saturation_rate(pool: LengthPool, engine: EngineConfig, spec: KVCacheSpec, step_model: StepTimeModel,
                    n: int = 2000, seed: int = 0) -> float:
    """Requests per second FCFS serves with an infinite backlog (all arrive at 0): the rate above
    which queues grow without bound."""
    tr = make_trace(pool, np.zeros(n), "exact", seed=seed)
    res = simulate(tr, engine.with_policy("fcfs"), spec, step_model)
    return n / float(res.finish.max())


def compare(results: Mapping[str, Sequence[dict]]) -> dict:
    """`results[policy]` = metrics per seed (same seeds, same requests). Per policy: mean and
    spread (std over seeds) of each metric, and per seed the ratio to fcfs (mean / p99 latency,
    TTFT), the ratio to sjf_prompt, and the fraction of the oracle's mean-latency gain over fcfs
    (only where the oracle gains >= 10%)."""
    keys = ("mean_latency", "p50_latency", "p99_latency", "mean_ttft", "throughput_rps", "recomputed_tokens",
            "swapped_bytes", "preemptions_total", "max_preemptions_of_one")
    out: dict[str, dict] = {}
    fc, orc, sj = results.get("fcfs"), results.get("oracle"), results.get("sjf_prompt")
    for pol, runs in results.items():
        d: dict[str, Any] = {}
        for k in keys:
            v = np.array([r[k] for r in runs], dtype=float)
            d[k] = float(v.mean())
            d[k + "_sd"] = float(v.std())
        if fc:
            for k in ("mean_latency", "p99_latency", "mean_ttft"):
                v = np.array([r[k] / f[k] for r, f in zip(runs, fc)])
                d[f"{k}_vs_fcfs"] = float(v.mean())
                d[f"{k}_vs_fcfs_sd"] = float(v.std())
        if sj:
            v = np.array([r["mean_latency"] / s["mean_latency"] for r, s in zip(runs, sj)])
            d["mean_latency_vs_sjf_prompt"] = float(v.mean())
        if fc and orc:
            fr = []
            for r, f, o in zip(runs, fc, orc):
                gain = f["mean_latency"] - o["mean_latency"]
                fr.append((f["mean_latency"] - r["mean_latency"]) / gain if gain >= 0.1 * f["mean_latency"] else math.nan)
            fr = np.array(fr)
            d["oracle_fraction"] = float(np.nanmean(fr)) if np.isfinite(fr).any() else math.nan
            d["oracle_fraction_sd"] = float(np.nanstd(fr)) if np.isfinite(fr).any() else math.nan
        d["preemptions"] = {k: float(np.mean([r["preemptions"][k] for r in runs])) for k in runs[0]["preemptions"]}
        out[pol] = d
    return out


def run_policies(pool: LengthPool, engine: EngineConfig, spec: KVCacheSpec, step_model: StepTimeModel,
                 arrivals_fn, seeds: Sequence[int], policies: Mapping[str, Mapping[str, Any]],
                 predictions: str = "recorded", n: int = 2000, noise_sd: float = 0.0) -> dict:
    """Every policy (name -> (policy, options)) on the same requests per seed. `arrivals_fn(n,
    seed)` gives arrival times. Returns {name: [metrics per seed]}."""
    out: dict[str, list] = {name: [] for name in policies}
    for seed in seeds:
        tr = make_trace(pool, arrivals_fn(n, seed), predictions, seed=seed)
        for name, spec_ in policies.items():
            opts = dict(spec_)
            pol = opts.pop("policy", name)
            res = simulate(tr, engine.with_policy(pol, **opts), spec, step_model, noise_sd=noise_sd, seed=seed)
            out[name].append(res.metrics())
    return out
