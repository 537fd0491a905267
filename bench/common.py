"""What the benchmark scripts share, in one place: the data they read, the policy variants they
compare, the serving workload (held-out trace requests, seeded draws, recorded predictions) and the
memory regimes of a serving engine. Import it as `bench.common` (tests do; scripts run as
`python bench/X.py` put the repository root on sys.path first). The library never imports bench.

Data: the inputs live in tests/data (tests/data/README.md says where each came from) and the
simulator's in trail's package data (trail.sim.DEFAULT_RECORDED, DEFAULT_FIT); bench/results holds
only summaries (bench/results/MANIFEST.md lists what was taken out and the commit holding it).
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from trail import sim
from trail.scheduler_types import POLICIES, POLICY_DEFAULTS, TRAIL_PAPER

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# the default serving pool: the val + test requests of the trace the recorded predictions were made
# on (SmolLM2-135M-Instruct, greedy, repetition penalty 1.1, max 512 new tokens)
TRACE = DATA / "trace_smollm2_val_test.jsonl.gz"
RECORDED = sim.DEFAULT_RECORDED             # the previous probe's predictions on TRACE's requests
# the shipped probe's own held-out requests (test split of its training trace) and its predictions
SHIPPED_PROBE_TRACE = DATA / "trace_smollm2_2026-11-27b_test.jsonl.gz"
SHIPPED_PROBE_RECORDED = DATA / "recorded_predictions_2026-11-27b.npz"
# the prompts the shipped probe's pipeline collected (bench/predictor_gpu_run.py)
PROMPTS = DATA / "prompts_sharegpt_alpaca.jsonl.gz"
# where bench/sim_fit.py and bench/sim_record_predictions.py write the simulator's package data
# (trail.sim reads it from the installed package: trail.sim.DEFAULT_FIT, DEFAULT_RECORDED)
PACKAGE_SIM_DATA = ROOT / "python" / "trail" / "data" / "sim"

# ------------------------------------------------------------------------------------------------
# Policies: name -> (policy, options). The scheduler's policies (trail.scheduler_types.POLICIES)
# with their defaults, and the variants the benchmarks add.
# ------------------------------------------------------------------------------------------------
# trail's memory rules (admission reserve and its gate, forced-eviction choice, no policy swap or
# recompute under memory pressure), as options any policy takes
MEMORY_RULES = ("admit_reserve", "reserve_free_frac", "max_forced_evictions", "evict_kv_weight",
                "resume_forced_first", "memory_preemption")
VARIANTS: dict[str, tuple[str, dict]] = {p: (p, {}) for p in POLICIES}
VARIANTS.update({
    "trail_c0": ("trail", {"c": 0.0}),
    "trail_noaging": ("trail", {"aging_rate": 0.0, "aging_per_step": 0.0}),
    "trail_paper": ("trail", dict(TRAIL_PAPER)),     # TRAIL as published
    "fcfs_repeat": ("fcfs", {}),                     # fcfs again, its own engine: the run-to-run noise floor
    # controls that isolate a mechanism (issue 25): the prompt-only ranking with trail's memory
    # rules (so trail's gain over it is the probe's), and SRPT on true lengths with free preemption
    # (any shorter newcomer preempts, no aging, no reserve): the upper anchor
    "sjf_prompt_memrules": ("sjf_prompt", {k: POLICY_DEFAULTS["trail"][k] for k in MEMORY_RULES}),
    "oracle_srpt": ("oracle", {"c": 1e9, "margin": 0.0, "max_preemptions": 2**31 - 1, "aging_rate": 0.0,
                               "aging_per_step": 0.0, "admit_reserve": 0.0}),
    # trail ranked by the probe's first prediction only (right after prefill), counted down: the
    # per-step filter's contribution is trail's gain over it (PREDICTION_CONTROLS says how it is fed)
    "trail_prefill": ("trail", {}),
})
# variants that differ from their policy in what the scheduler is fed, not in its options: the
# simulator's `predictions` mode (trail.sim_workload.make_trace) and the engine's source
PREDICTION_CONTROLS = {"trail_prefill": "prefill"}


def prefill_only(values) -> np.ndarray:
    """Per-step predictions reduced to the first one counted down, max(first - g, 0) at step g:
    the recorded form of trail.predictions.PrefillOnlyPredictions (and make_trace's `prefill`)."""
    values = np.asarray(values, np.float32)
    return np.maximum(values[0] - np.arange(len(values), dtype=np.float32), 0.0)


def sim_policies(names: Sequence[str], table: Mapping[str, tuple[str, dict]] = VARIANTS) -> dict[str, dict]:
    """{name: {"policy": policy, **options}}: the form trail.sim.run_policies takes."""
    return {n: {"policy": table[n][0], **table[n][1]} for n in names}


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------
def held_out_requests(max_prompt: int = 512, trace: str | Path = TRACE,
                      splits: Sequence[str] = ("val", "test")) -> list[tuple[str, list[int], int]]:
    """(trace id, prompt ids, recorded output length) of the trace's requests in `splits` (val +
    test: never trained on), in trace order."""
    from trail.predictor.bins import split_of

    out = []
    with gzip.open(trace, "rt") as f:
        next(f)
        for line in f:
            r = json.loads(line)
            if split_of(r["id"]) in splits and len(r["prompt_ids"]) <= max_prompt:
                out.append((r["id"], r["prompt_ids"], len(r["output_ids"])))
    return out


def workload_indices(pool_size: int, n: int, rate: float | None, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(pool indices, arrival times, how many indices repeat an earlier one): a seeded
    permutation of the pool, continued by further permutations when n exceeds it (each request at
    most ceil(n / pool) times); Poisson arrivals at `rate` req/s, or all at t = 0 when rate is
    None. For n <= pool_size the draws equal the first serving runs' (serve_run1 / serve_run2)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(pool_size)[:n]
    while len(idx) < n:
        idx = np.concatenate([idx, rng.permutation(pool_size)[: n - len(idx)]])
    arrivals = np.zeros(n) if rate is None else np.cumsum(rng.exponential(1.0 / rate, n))
    return idx, arrivals, max(0, n - pool_size)


def workload(pool, n: int, rate: float | None, seed: int, recorded: dict | None = None) -> tuple[list, dict]:
    """n requests of `pool` (see workload_indices) as ReplayRequests, and what identifies them
    (trace ids, arrivals, reused count). `recorded`: trace id -> per-step predictions to feed."""
    from trail.compare import ReplayRequest

    idx, arrivals, reused = workload_indices(len(pool), n, rate, seed)
    reqs = [ReplayRequest(pool[i][1], pool[i][2], float(t),
                          None if recorded is None else recorded[pool[i][0]]) for i, t in zip(idx, arrivals)]
    return reqs, {"request_ids": [pool[i][0] for i in idx], "arrivals": [round(float(t), 6) for t in arrivals],
                  "reused": reused}


def load_recorded(path: str | Path = RECORDED) -> tuple[dict, dict, str]:
    """trace id -> per-step predicted remaining (float32), trace id -> prompt-time total, and a
    label naming the source."""
    path = Path(path)
    d = np.load(path)
    meta = json.loads(str(d["meta"]))
    cu = d["cu"]
    pred = {str(k): d["pred"][cu[i]: cu[i + 1]].astype(np.float32) for i, k in enumerate(d["ids"])}
    prompt = {str(k): float(v) for k, v in zip(d["ids"], d["prompt_pred"])}
    label = f"recorded from {meta['model']} (layer {meta['layer']}, {meta['prompt_predictor']}) in {path.name}"
    return pred, prompt, label


def held_out_pool(max_prompt: int = 512, max_output: int = 512, recorded: str | Path = RECORDED) -> dict:
    """The pool bench/serve.py draws from (held-out trace requests, prompt <= max_prompt, output <=
    max_output, in trace order) with the recorded predictions of each: ids, prompt_len,
    output_len, prompt_pred, and pred[i] (float32 per-step predicted remaining)."""
    d = np.load(recorded)
    keep = (d["prompt_len"] <= max_prompt) & (d["output_len"] <= max_output)
    cu = d["cu"]
    rows = np.flatnonzero(keep)
    return {"ids": [str(x) for x in d["ids"][rows]], "prompt_len": d["prompt_len"][rows].astype(np.int64),
            "output_len": d["output_len"][rows].astype(np.int64),
            "prompt_pred": d["prompt_pred"][rows].astype(np.float64),
            "pred": [d["pred"][cu[i]: cu[i + 1]].astype(np.float32) for i in rows],
            "max_new_tokens": int(json.loads(str(d["meta"]))["max_new_tokens"])}


def queue_growth(arrival: np.ndarray, ttft: np.ndarray, latency: np.ndarray) -> float:
    """Growth of the queueing delay over a Poisson run, in mean service times: mean TTFT of the
    last quarter of arrivals minus the first quarter's, over mean (latency - TTFT). A rate is
    sustained when this stays small (bench/serve.py's saturation search)."""
    order = np.argsort(arrival, kind="stable")
    q = max(1, len(order) // 4)
    service = float(np.mean(latency - ttft))
    return float(ttft[order[-q:]].mean() - ttft[order[:q]].mean()) / max(service, 1e-9)


# ------------------------------------------------------------------------------------------------
# Memory regimes of a serving engine (the simulator's own: trail.sim.regime_engine)
# ------------------------------------------------------------------------------------------------
def engine_config(regime: str, policy: str, options: dict | None, *, max_batch: int, kv_requests: float,
                  host_blocks: int, mean_total: float, num_requests: int, prefill_tokens_per_s: float | None = None):
    """The EngineConfig of a (regime, policy) serving engine. ample: KV for max_batch requests of
    max_model_len (the batch cap binds, memory never); kv: a GPU pool for `kv_requests` requests
    of `mean_total` tokens + `host_blocks` host blocks."""
    from trail.engine_config import EngineConfig

    kw = dict(num_gpu_blocks=max_batch * 1024 // 16, num_host_blocks=0)
    if regime == "kv":
        kw = dict(num_gpu_blocks=int(kv_requests * mean_total / 16), num_host_blocks=host_blocks)
    return EngineConfig(policy=policy, policy_options=dict(options or {}), max_batch=max_batch,
                        max_slots=max(1024, num_requests), max_model_len=1024,
                        prefill_tokens_per_s=prefill_tokens_per_s, **kw)


def run_engine_config(regime: str, pool: Mapping, run: Mapping, policy: str = "fcfs", options=None):
    """The EngineConfig a serving run (its serve.json `run`, over `pool`) built for `regime`."""
    mean_total = float(run.get("mean_total_tokens") or np.mean(pool["prompt_len"] + pool["output_len"]))
    return engine_config(regime, policy, options, max_batch=int(run.get("max_batch", 48)),
                         kv_requests=float(run.get("kv_requests", 24)), host_blocks=int(run.get("host_blocks", 128)),
                         mean_total=mean_total, num_requests=int(run.get("num_requests", 150)))


# ------------------------------------------------------------------------------------------------
# Simulator studies: a grid of (regime, workload, seed, variant) runs in a process pool
# ------------------------------------------------------------------------------------------------
def run_sim_grid(job, tasks: Sequence, jobs: int, init, initargs: tuple, regimes: Sequence[str],
                 labels: Sequence[str], names: Sequence[str], seeds: Sequence[int]) -> dict:
    """`job(task) -> (key "regime|label", name, seed, metrics)` over `tasks` in `jobs` processes
    (each started with `init(*initargs)`), with a tqdm bar; -> {"regime|label": {name: [metrics per
    seed, in `seeds` order]}} (the same seed order in every variant: comparisons pair by position)."""
    from multiprocessing import Pool

    from tqdm.auto import tqdm

    raw: dict = {}
    with Pool(jobs, initializer=init, initargs=initargs) as p:
        for key, name, seed, m in tqdm(p.imap_unordered(job, tasks), total=len(tasks), unit="run", desc="sim"):
            raw.setdefault(key, {}).setdefault(name, {})[seed] = m
    return {f"{r}|{label}": {name: [raw[f"{r}|{label}"][name][s] for s in seeds] for name in names}
            for r in regimes for label in labels}


def fmt_or_na(x, spec: str = ".3f") -> str:
    """A number formatted, or 'n/a' for None / NaN (tables of the simulator studies)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def paired_deltas(res: Mapping[str, Sequence[dict]], metric: str, base: str = "trail") -> dict[str, np.ndarray]:
    """Per policy, per seed: its metric / fcfs's minus `base`'s metric / fcfs's (the same requests
    and seeds: the paired change against `base`)."""
    fc, b = res["fcfs"], res[base]
    return {name: np.array([r[metric] / f[metric] - t[metric] / f[metric] for r, f, t in zip(runs, fc, b)])
            for name, runs in res.items()}


def regime_tables(summary: Mapping[str, Mapping], names: Sequence[str], header: str, row) -> list[str]:
    """Markdown: per regime (ample, kv) a table with `header` (its '| ... |' line) and one
    `row(label, name, d)` line per ('regime|label' group, variant name) of `summary`."""
    lines: list[str] = []
    for regime in ("ample", "kv"):
        lines += [f"## {regime}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for key, c in summary.items():
            if key.startswith(regime + "|"):
                label = key.split("|", 1)[1]
                lines += [row(label, name, c[name]) for name in names]
        lines.append("")
    return lines


def study_tasks(pool, step_model, spec, n: int, seeds: Sequence[int], names: Sequence[str], loads: Sequence[float],
                burst_load: float) -> tuple[dict, list[str], list[tuple]]:
    """The runs of a simulator study: (fcfs saturation per regime, workload labels, tasks
    (regime, 'burst' | 'poisson', label, rate, seed, n, name)) for Poisson `loads` and a burst at
    `burst_load`, both regimes, every seed and variant."""
    import itertools

    sat = {r: sim.saturation_rate(pool, sim.regime_engine(r, pool), spec, step_model, n=n) for r in ("ample", "kv")}
    workloads = [(f"poisson {x:g}x", x) for x in loads] + [(f"burst {burst_load:g}x", burst_load)]
    tasks = [(r, "burst" if label.startswith("burst") else "poisson", label, load * sat[r], seed, n, name)
             for r, (label, load), seed, name in itertools.product(sat, workloads, seeds, names)]
    return sat, [label for label, _ in workloads], tasks

