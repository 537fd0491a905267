"""End-to-end serving benchmark: fcfs vs sjf_prompt vs trail (variants) vs oracle on one engine
per policy, the same requests, open-loop arrivals in real time (issue 16; run by
`bench/gpu_suite.sh serve` through the named sections of bench/suite/serve_grid.py).

Workload: held-out requests of the recorded trace (tests/data/trace_smollm2_val_test.jsonl.gz, its
val + test requests: prompts of ShareGPT / Alpaca and SmolLM2-135M-Instruct's recorded output
lengths, greedy with repetition penalty 1.1, max 512 new tokens), replayed: each request stops at
its recorded length with EOS ignored, so every policy does the same work; the predictors only see
the 512 cap. The held-out pool has 367 requests; a run of more draws every pool request once (a
seeded permutation) and the rest again from further permutations: the JSON states how many are
reused (`reused`). `--trace` / `--splits` choose another pool, e.g. the shipped probe's own test
split: `--trace tests/data/trace_smollm2_2026-11-27b_test.jsonl.gz --splits test` (the test split
of the probe's training trace: 984 requests with prompts <= 512 tokens). Every request of the
default pool is in the val / test split of that trace too (the split is a hash of the id), so the
shipped probe never trained on either pool.

Arrivals: Poisson at load x the *sustained* saturation rate, or a burst (all at once). The
saturation rate is searched first (`--saturation search`): fcfs serves short Poisson probes at
increasing rates; a rate is sustained when the queueing delay does not grow over the probe (mean
TTFT of the last quarter of arrivals minus the first quarter's <= --sat-growth x the mean service
time); saturation = the highest sustained rate (geometric steps, then bisection). Short probes
overstate it (simulated on run2's costs: 200-request probes with 0.5 -> 23-25 req/s, 300 with
0.25 -> ~22, 1,000 -> ~20), hence the defaults 300 requests, 0.25. Or given:
`--saturation ample=R,kv=R` or a JSON file from an earlier run (its saturation_req_s_* keys).

Memory regimes: `ample` (a batch cap, KV for every running request) and `kv` (a GPU pool for
--kv-requests average requests + host blocks: memory binds, so keep / swap / recompute happen).

Predictions: the shipped probe and prompt predictor (real SmolLM2 weights), or with
`--recorded-predictions` the SmolLM2 probe's per-step predictions recorded on the same requests
(`--recorded`, default trail/data/sim/recorded_predictions.npz: the previous probe on the default
pool; by trace id; the shipped probe's on its test split:
tests/data/recorded_predictions_2026-11-27b.npz) and its prompt predictor's totals: the probe
kernel still runs for its cost, the scheduler is fed the recorded values. This is the mode for the
8B shape with random weights (`--model random:llama3-8b`); every output says so.

Workload, policy variants and memory regimes are bench/common.py's (shared with the simulator
scripts). Grid: regime x load x seed cells (seed-major). `--section I/N` runs the I-th of N equal
slices (1-based), `--cells ample:1.1:0,kv:burst:2` an explicit list; each call writes its own
serve.json (per cell and policy: compare.summarize's figures, ratios, oracle fraction, per-request
latency / TTFT, the request ids and arrivals) and serve_steps.npz (the engines' per-step
telemetry, for bench/sim_vs_real.py), within --budget-s. `python bench/serve.py merge DIR ...
--out DIR` combines sections into serve.json, serve.summary.txt (mean and spread over seeds) and
plots vs load.

    python bench/serve.py --out DIR [--model GGUF|HF_DIR|random:PRESET] [--regimes ample,kv]
        [--loads 0.8,1.0,1.1,burst] [--seeds 0,1,2] [--num-requests 500] [--section 1/3]
        [--saturation search|ample=R,kv=R|FILE] [--recorded-predictions] [--budget-s 420]
    python bench/serve.py merge DIR [DIR ...] --out DIR
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

if not __package__:      # run as `python bench/serve.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (PREDICTION_CONTROLS, RECORDED, TRACE, VARIANTS, engine_config,  # noqa: E402
                          held_out_requests, load_recorded, prefill_only, queue_growth, workload)
from trail.compare import compare, run_policy  # noqa: E402
from trail.request import SamplingParams  # noqa: E402
from trail.telemetry import STEP_FIELDS, Telemetry  # noqa: E402

logger = logging.getLogger("serve")


# ------------------------------------------------------------------------------------------------
# Saturation
# ------------------------------------------------------------------------------------------------
def saturation_search(probe: Callable[[float], dict], start: float, growth: float = 0.25, step: float = 1.3,
                      bisect: int = 2, max_probes: int = 5) -> dict:
    """Highest sustained rate: probe(rate) -> {'growth': ...}; up by `step` from `start` while
    sustained (down while not), then `bisect` geometric bisections. Returns the rate and every probe."""
    probes = []

    def ok(rate):
        r = probe(rate)
        r["rate"] = rate
        r["sustained"] = bool(r["growth"] <= growth)
        probes.append(r)
        logger.info("saturation probe %.2f req/s: growth %.2f service times -> %s", rate, r["growth"],
                    "sustained" if r["sustained"] else "not sustained")
        return r["sustained"]

    lo = hi = None
    rate = start
    while len(probes) < max_probes:
        if ok(rate):
            lo = rate
            if hi is not None:
                break
            rate *= step
        else:
            hi = rate
            if lo is not None:
                break
            rate /= step
    for _ in range(bisect):
        if lo is None or hi is None or len(probes) >= max_probes:
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    rate = lo if lo is not None else min(p["rate"] for p in probes)
    return {"rate": rate, "bracket": [lo, hi], "criterion": f"queueing-delay growth <= {growth} service times",
            "probes": probes}


# ------------------------------------------------------------------------------------------------
# Engines
# ------------------------------------------------------------------------------------------------
def load_parts(model_source: str, device: str):
    from trail.models.loader import load_model
    from trail.predictor.probe_file import load_probe_params, shipped_probe_dir
    from trail_kernels.probe_params import ProbeParams

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_source, device, dtype)
    shipped = shipped_probe_dir("SmolLM2-135M-Instruct")
    if model_source.startswith("random:"):       # timing / recorded runs: a random probe of the shipped size
        probe = ProbeParams.random(model.config.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
        layer = min(19, model.config.num_layers - 1)
        try:
            from trail.predictor.probe_file import load_probe

            layer = min(load_probe(shipped / "probe.json")[1].layer, model.config.num_layers - 1)
        except Exception:  # noqa: BLE001 - the shipped file only sets the layer's depth
            pass
        return model, probe, layer, None
    probe, spec = load_probe_params(shipped / "probe", expect_d=model.config.hidden_size)
    from trail.engine_loading import prompt_predictor_fn

    return model, probe, spec.layer, prompt_predictor_fn(shipped / "prompt_boe", model, None)


class Engines:
    """One engine per (regime, policy), built on first use and reused across cells (a run leaves
    it idle: every block and slot back, checked); each run starts with fresh telemetry."""

    def __init__(self, model, probe, layer, predictor, args, mean_total: float, reuse: bool = True):
        self.model, self.probe, self.layer, self.predictor, self.args = model, probe, layer, predictor, args
        self.mean_total, self.reuse = mean_total, reuse
        self.cache: dict = {}
        self.prefill_rate = None

    def config(self, regime: str, policy: str, options: dict):
        a = self.args
        return engine_config(regime, policy, options, max_batch=a.max_batch, kv_requests=a.kv_requests,
                             host_blocks=a.host_blocks, mean_total=self.mean_total, num_requests=a.num_requests,
                             prefill_tokens_per_s=self.prefill_rate)

    def get(self, regime: str, name: str):
        from trail.engine import LLMEngine
        from trail.predictions import PrefillOnlyPredictions, RecordedPredictions

        key = (regime, name)
        engine = self.cache.get(key) if self.reuse else None
        if engine is None:
            if not self.reuse:
                self.cache.clear()
                gc.collect()                     # the previous engine and its KV pool go first
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            policy, options = VARIANTS[name]
            # --recorded-predictions: the requests' recorded values replace the probe's (a prediction
            # control gets them reduced, see serve()); the live probe's prefill-only control
            if self.args.recorded_predictions:
                source = RecordedPredictions()
            else:
                source = PrefillOnlyPredictions() if PREDICTION_CONTROLS.get(name) == "prefill" else None
            engine = LLMEngine(self.model, None, self.config(regime, policy, dict(options)), probe=self.probe,
                               probe_layer=self.layer, probe_max_new=512, prompt_predictor=self.predictor,
                               eos_token_ids=[2], predictions=source)
            self.prefill_rate = engine.prefill_tokens_per_s
            self.cache[key] = engine
        else:
            engine.check_idle()
        engine.telemetry = Telemetry(keep_requests=False)
        return engine


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------
def grid(regimes: Sequence[str], loads: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    """Seed-major: a budget cut or a section split leaves whole seeds of every regime and load."""
    return [(r, l, s) for s in seeds for r in regimes for l in loads]


def select_cells(cells: list, section: str | None, explicit: str | None) -> list:
    if explicit == "none":        # no cells: only the solo runs, the saturation search or the capacity search
        return []
    if explicit:
        want = []
        for item in explicit.split(","):
            r, l, s = item.split(":")
            want.append((r, l, int(s)))
        return want
    if section:
        i, n = (int(x) for x in section.split("/"))
        if not 1 <= i <= n:
            raise ValueError(f"--section must be I/N with 1 <= I <= N, got {section!r}")
        return [c for k, c in enumerate(cells) if k * n // len(cells) == i - 1]
    return cells


def load_order(load: str) -> tuple:
    """Sort key of a load label: Poisson loads by value, then the burst."""
    return (1, 0.0) if load == "burst" else (0, float(load))


def run_order(policies: list, seed: int, order: str) -> list:
    """The order a cell's policies run in. `rotate`: shifted by the seed. `abba`: fcfs first, the
    others, fcfs_repeat last (so the noise floor spans the whole cell's drift), reversed on odd
    seeds (pairs of seeds cancel a linear drift)."""
    if order == "rotate":
        k = seed % len(policies)
        return policies[k:] + policies[:k]
    ends = [p for p in ("fcfs", "fcfs_repeat") if p in policies]
    forward = ends[:1] + [p for p in policies if p not in ends] + ends[1:]
    return forward[::-1] if seed % 2 else forward


def solo_picks(output_len: np.ndarray, prompt_len: np.ndarray, n: int) -> list[int]:
    """n pool indices spread over output length (evenly spaced quantiles) and, within that,
    alternating short and long prompts: the requests whose solo latencies fit the solo model."""
    by_out = np.argsort(output_len * 4096 + prompt_len, kind="stable")
    picks = by_out[np.linspace(0, len(by_out) - 1, n).round().astype(int)]
    return sorted(set(int(i) for i in picks))


def measure_solo(pool: list, n: int, recorded: dict | None, serve_one: Callable[[list], dict]) -> dict:
    """Latency of n pool requests served alone (one request on an idle fcfs engine, each its own
    run): the data of the SLO's 'latency served alone' (bench/capacity.py fits it)."""
    from trail.compare import ReplayRequest

    out_len = np.array([p[2] for p in pool])
    prompt_len = np.array([len(p[1]) for p in pool])
    rows = {"request_ids": [], "prompt_len": [], "output_len": [], "latency_s": [], "ttft_s": []}
    for i in solo_picks(out_len, prompt_len, n):
        rid, prompt, length = pool[i]
        run = serve_one([ReplayRequest(prompt, length, 0.0, None if recorded is None else recorded[rid])])
        for k, v in (("request_ids", rid), ("prompt_len", len(prompt)), ("output_len", length),
                     ("latency_s", float(run["latency"][0])), ("ttft_s", float(run["ttft"][0]))):
            rows[k].append(v)
    logger.info("solo latencies of %d requests: %s", len(rows["latency_s"]),
                " ".join(f"{l:.3f}" for l in rows["latency_s"]))
    return rows


def measure_capacity(args, pool: list, recorded: dict | None, sat: dict, solo: dict | None,
                     serve_policy: Callable[[str, list], dict], save: Callable[[], None], out: dict) -> dict:
    """Capacity at the SLO per policy on the engine (bench/capacity.py's definition and search):
    the highest Poisson rate at which >= 90% of --capacity-requests requests (seed
    --capacity-seed; every rate scales the same exponential draw) finish within 2x their solo
    latency (the fit of the --solo runs), bisected to +-2%, starting from --capacity-bracket x
    the regime's saturation rate. Fills `out` (saved after each policy) and returns it."""
    from bench.capacity import capacity_search, engine_solo_model, solo_latency_from_fit, slo_attainment

    if not solo:
        raise SystemExit("--capacity needs --solo N (the solo latencies the SLO is defined by)")
    fit = engine_solo_model(solo["prompt_len"], solo["output_len"], solo["latency_s"])
    regime = args.capacity_regime
    lo, hi = (float(x) * sat[regime] for x in args.capacity_bracket.split(","))
    out.update(regime=regime, solo_fit=fit, requests=args.capacity_requests, seed=args.capacity_seed,
               slo="latency <= 2x solo latency (solo_fit), for >= 90% of requests", policies={})
    for name in args.capacity.split(","):
        def attainment(rate, name=name):
            reqs, _ = workload(pool, args.capacity_requests, rate, args.capacity_seed, recorded)
            run = serve_policy(name, reqs)
            solo_s = solo_latency_from_fit(fit, [len(r.prompt_ids) for r in reqs], [r.output_len for r in reqs])
            got = slo_attainment(run["latency"], solo_s)
            logger.info("capacity search, %s %s: %.3f req/s -> %.1f%% within the SLO", regime, name, rate, 100 * got)
            return got

        found = capacity_search(attainment, lo, hi, max_evals=args.capacity_max_evals)
        found["capacity_x_saturation"] = None if found["capacity"] is None else found["capacity"] / sat[regime]
        out["policies"][name] = found
        logger.info("capacity at the SLO, %s %s: %s req/s (%d evaluations)", regime, name, found["capacity"],
                    len(found["evaluations"]))
        base = out["policies"].get("fcfs", {}).get("capacity")
        for found in out["policies"].values():
            found["x_fcfs"] = None if not base or found["capacity"] is None else found["capacity"] / base
        save()
    return out


def parse_saturation(value: str) -> dict | None:
    if value == "search":
        return None
    path = Path(value)
    if path.is_file():
        d = json.loads(path.read_text())
        return {k.removeprefix("saturation_req_s_"): float(v) for k, v in d.items() if k.startswith("saturation_req_s_")}
    return {k: float(v) for k, v in (item.split("=") for item in value.split(","))}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="GGUF file, HF folder or random:PRESET (default: SmolLM2)")
    ap.add_argument("--regimes", default="ample,kv")
    ap.add_argument("--loads", default="0.8,1.0,1.1,burst")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--section", default=None, help="I/N: the I-th of N slices of the grid (1-based)")
    ap.add_argument("--cells", default=None, help="explicit cells regime:load:seed,... (overrides --section)")
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--policies", default="fcfs,sjf_prompt,sjf_prompt_memrules,trail_prefill,trail,oracle,fcfs_repeat")
    ap.add_argument("--max-batch", type=int, default=48)
    ap.add_argument("--kv-requests", type=float, default=24, help="kv regime: GPU pool for this many average requests")
    ap.add_argument("--host-blocks", type=int, default=128)
    ap.add_argument("--trace", default=str(TRACE), help="the workload's trace (.jsonl.gz; default: val + test of the previous probe's trace)")
    ap.add_argument("--splits", default="val,test", help="which splits of the trace make the pool (never train)")
    ap.add_argument("--max-output", type=int, default=512, help="use only requests with recorded lengths up to this")
    ap.add_argument("--max-prompt", type=int, default=512, help="use only requests with prompts up to this many tokens")
    ap.add_argument("--saturation", default="search", help="search | ample=R,kv=R | a JSON with saturation_req_s_*")
    ap.add_argument("--sat-requests", type=int, default=300, help="requests per saturation probe")
    ap.add_argument("--sat-start", type=float, default=None, help="first probe rate (default: all-at-once fcfs rate)")
    ap.add_argument("--sat-growth", type=float, default=0.25,
                    help="a rate is sustained when the queueing delay grows by at most this many service times")
    ap.add_argument("--sat-max-probes", type=int, default=5)
    ap.add_argument("--recorded-predictions", action="store_true",
                    help="feed the scheduler SmolLM2's recorded predictions (probe still runs for its cost)")
    ap.add_argument("--recorded", default=str(RECORDED), help="the recorded predictions (.npz, by trace id)")
    ap.add_argument("--order", choices=("rotate", "abba"), default="abba",
                    help="run order of a cell's policies (see run_order)")
    ap.add_argument("--solo", type=int, default=0,
                    help="first serve this many pool requests alone (fcfs, ample): the SLO's solo latencies")
    ap.add_argument("--capacity", default="", help="policies whose capacity at the SLO to search (needs --solo)")
    ap.add_argument("--capacity-regime", default="ample")
    ap.add_argument("--capacity-requests", type=int, default=300)
    ap.add_argument("--capacity-seed", type=int, default=0)
    ap.add_argument("--capacity-bracket", default="0.6,0.9", help="first two rates, x the regime's saturation")
    ap.add_argument("--capacity-max-evals", type=int, default=8)
    ap.add_argument("--no-reuse-engines", action="store_true", help="a fresh engine for every run")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests, all at once (default 2 x max batch)")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.model is None:
        from trail.assets import smollm2_gguf_path, smollm2_hf_dir
        args.model = str(smollm2_hf_dir() if args.device == "cpu" else smollm2_gguf_path())
    model, probe, layer, predictor = load_parts(args.model, args.device)
    vocab = model.config.vocab_size
    splits = args.splits.split(",")
    if not set(splits) <= {"train", "val", "test"}:
        raise SystemExit(f"--splits: {args.splits!r}; choose among train, val, test")
    pool = [(rid, [t % vocab for t in p], n) for rid, p, n in held_out_requests(args.max_prompt, Path(args.trace), splits)
            if n <= args.max_output]
    recorded = None
    mode = "probe"
    if args.recorded_predictions:
        recorded, prompt_pred, mode = load_recorded(Path(args.recorded))
        missing = [rid for rid, _, _ in pool if rid not in recorded]
        if missing:
            raise SystemExit(f"--recorded {args.recorded}: no predictions for {len(missing)} pool requests "
                             f"(e.g. {missing[0]}): record them on the same trace and splits")
        by_prompt = {tuple(p): prompt_pred[rid] for rid, p, _ in pool}

        def predictor(prompts):      # noqa: F811 - the recorded prompt predictor's totals
            return np.array([by_prompt[tuple(int(t) for t in p)] for p in prompts])
    policies = args.policies.split(",")
    if predictor is None:
        policies = [p for p in policies if VARIANTS[p][0] != "sjf_prompt"]
    mean_total = float(np.mean([len(p) + n for _, p, n in pool]))
    params = SamplingParams(max_new_tokens=512, repetition_penalty=1.1)
    engines = Engines(model, probe, layer, predictor, args, mean_total, reuse=not args.no_reuse_engines)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    regimes = args.regimes.split(",")
    cells = select_cells(grid(regimes, args.loads.split(","), [int(s) for s in args.seeds.split(",")]),
                         args.section, args.cells)
    result = {"model": args.model, "predictions": mode, "trace": args.trace, "splits": args.splits,
              "recorded": args.recorded if args.recorded_predictions else None,
              "max_output": args.max_output, "max_prompt": args.max_prompt,
              "device": device,
              "num_requests": args.num_requests, "pool": len(pool), "max_batch": args.max_batch,
              "kv_requests": args.kv_requests, "host_blocks": args.host_blocks, "mean_total_tokens": mean_total,
              "policies": policies, "section": args.section, "cells_requested": [list(c) for c in cells],
              "cells": [], "skipped": [], "saturation": {}}
    steps: dict[str, np.ndarray] = {}

    def save():
        result["wall_s"] = time.perf_counter() - t_start
        (out / "serve.json").write_text(json.dumps(result, indent=1))
        np.savez_compressed(out / "serve_steps.npz", fields=np.array(STEP_FIELDS), **steps)

    warmed: set = set()

    def serve(regime, name, reqs):
        if (regime, name) not in warmed:     # every engine's first run is a warm-up, not measured
            warmed.add((regime, name))
            serve(regime, name, warm)
        # the earlier runs' objects: collected now and frozen, so no GC pass scans them mid-run
        # (runs 3-4 measured the first policy of each seed ~1.4x slower than the seed's median)
        gc.collect()
        gc.freeze()
        run = run_policy(lambda _p: engines.get(regime, name), name, reqs, params)
        tel = engines.cache[(regime, name)].telemetry
        return run, np.asarray(tel.steps, np.float64).reshape(-1, len(STEP_FIELDS))

    # warm-up workload (Triton compiles, caches, allocator), served unmeasured by every engine first
    warm, _ = workload(pool, 2 * args.max_batch if args.warmup is None else args.warmup, None, 999, recorded)
    if args.solo:
        result["solo"] = measure_solo(pool, args.solo, recorded, lambda reqs: serve("ample", "fcfs", reqs)[0])
        save()
    # saturation per regime in use
    given = parse_saturation(args.saturation)
    sat = {}
    for regime in sorted({c[0] for c in cells} | ({args.capacity_regime} if args.capacity else set())):
        if given is not None:
            if regime not in given:
                raise ValueError(f"--saturation gives no rate for regime {regime!r}")
            sat[regime] = given[regime]
            result["saturation"][regime] = {"rate": given[regime], "source": args.saturation}
        else:
            start = args.sat_start
            if start is None:   # the all-at-once completion rate: a first guess, not the answer
                reqs, _ = workload(pool, args.sat_requests, None, 1000, recorded)
                run, st = serve(regime, "fcfs", reqs)
                start = args.sat_requests / run["makespan_s"]
                steps[f"steps/sat/{regime}/all_at_once"] = st

            def probe_rate(rate, regime=regime):
                reqs, info = workload(pool, args.sat_requests, rate, 2000, recorded)
                run, st = serve(regime, "fcfs", reqs)
                steps[f"steps/sat/{regime}/{rate:.3f}"] = st
                arr = np.asarray(info["arrivals"])
                return {"growth": queue_growth(arr, run["ttft"], run["latency"]),
                        "mean_ttft_s": float(run["ttft"].mean()), "mean_latency_s": float(run["latency"].mean()),
                        "completed_req_s": args.sat_requests / run["makespan_s"]}

            found = saturation_search(probe_rate, start, growth=args.sat_growth, max_probes=args.sat_max_probes)
            found["start"] = start
            sat[regime] = found["rate"]
            result["saturation"][regime] = found
        result[f"saturation_req_s_{regime}"] = sat[regime]
        logger.info("%s: saturation %.2f req/s", regime, sat[regime])
        save()
    if args.capacity:
        result["capacity"] = {}     # filled policy by policy, each saved as it ends (a cut run keeps those)
        measure_capacity(args, pool, recorded, sat, result.get("solo"),
                         lambda name, reqs: serve(args.capacity_regime, name, reqs)[0], save, result["capacity"])
        save()
    from tqdm.auto import tqdm

    for regime, load, seed in tqdm(cells, desc="cells", unit="cell"):
        if time.perf_counter() - t_start > args.budget_s:
            result["skipped"].append([regime, load, seed])
            continue
        rate = None if load == "burst" else float(load) * sat[regime]
        reqs, info = workload(pool, args.num_requests, rate, seed, recorded)
        runs = {}
        for name in run_order(policies, seed, args.order):
            fed = reqs
            if recorded is not None and PREDICTION_CONTROLS.get(name) == "prefill":
                fed = [replace(r, recorded_predictions=prefill_only(r.recorded_predictions)) for r in reqs]
            runs[name], steps[f"steps/{regime}/{load}/{seed}/{name}"] = serve(regime, name, fed)
        runs = {name: runs[name] for name in policies}
        cmp = compare(runs)
        for name, s in cmp["policies"].items():
            r = runs[name]
            s.update(latency_s=np.round(r["latency"], 5).tolist(), ttft_s=np.round(r["ttft"], 5).tolist(),
                     makespan_s=r["makespan_s"], mixed_steps=int((steps[f"steps/{regime}/{load}/{seed}/{name}"][:, STEP_FIELDS.index("prefill_tokens")] > 0).sum()),
                     steps=int(len(steps[f"steps/{regime}/{load}/{seed}/{name}"])),
                     telemetry={k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                                for k, v in r["telemetry"].items()})
        result["cells"].append({"regime": regime, "load": load, "seed": seed, "rate_req_s": rate,
                                "policy_order": run_order(policies, seed, args.order), **info, **cmp})
        logger.info("%s %s seed %d: %s", regime, load, seed,
                    {n: round(s.get("latency_ratio_to_fcfs", 1.0), 3) for n, s in cmp["policies"].items()})
        save()
    save()
    text = summary_lines(result)
    (out / "serve.summary.txt").write_text(text)
    logger.info("\n%s", text)
    plot(result, out)
    return 0


# ------------------------------------------------------------------------------------------------
# Tables, merge, plots
# ------------------------------------------------------------------------------------------------
def aggregate(result: dict) -> list[dict]:
    """Per (regime, load, policy): mean and sd over seeds of the ratios to fcfs (mean latency,
    p99, TTFT, throughput), the oracle fraction (cells where the oracle gains >= 10%), the ratio
    to sjf_prompt, preemptions and recomputed tokens."""
    groups: dict = {}
    for c in result["cells"]:
        for name, s in c["policies"].items():
            groups.setdefault((c["regime"], c["load"], name), []).append((c, s))
    rows = []
    for (regime, load, name), items in groups.items():
        def stat(key, items=items):
            v = np.array([s[key] for _, s in items if s.get(key) is not None], float)
            return (float(v.mean()), float(v.std())) if len(v) else (math.nan, math.nan)

        thr = np.array([s["throughput_tok_s"] / c["policies"]["fcfs"]["throughput_tok_s"] for c, s in items
                        if "fcfs" in c["policies"]])
        rows.append({"regime": regime, "load": load, "policy": name, "seeds": sorted(c["seed"] for c, _ in items),
                     "mean_latency_s": stat("mean_latency_s"), "ratio": stat("latency_ratio_to_fcfs"),
                     "p99_ratio": stat("p99_ratio_to_fcfs"), "ttft_ratio": stat("ttft_ratio_to_fcfs"),
                     "oracle_fraction": stat("oracle_gain_fraction"), "vs_sjf_prompt": stat("latency_ratio_to_sjf_prompt"),
                     "throughput_ratio": (float(thr.mean()), float(thr.std())) if len(thr) else (math.nan, math.nan),
                     "preemptions": stat("preemptions"), "recomputed_tokens": stat("recomputed_tokens"),
                     "within_noise": [bool(s.get("within_noise")) for _, s in items if "within_noise" in s]})
    rows.sort(key=lambda r: (r["regime"], load_order(r["load"]),
                             result["policies"].index(r["policy"]) if r["policy"] in result["policies"] else 99))
    return rows


def summary_lines(result: dict) -> str:
    f = lambda ms, p=".3f": "" if math.isnan(ms[0]) else f"{ms[0]:{p}}±{ms[1]:{p}}"  # noqa: E731
    lines = [f"serving benchmark on {result['device']}: {result['model']}, predictions: {result.get('predictions', 'probe')}; "
             f"{result['num_requests']} requests per run (replayed lengths; pool {result['pool']}, "
             f"{max(0, result['num_requests'] - result['pool'])} reused), max batch {result['max_batch']}; "
             f"skipped (budget): {result['skipped']}"]
    for k, v in result.items():
        if k.startswith("saturation_req_s_"):
            lines.append(f"{k.removeprefix('saturation_req_s_')}: saturation {v:.2f} req/s (sustained search)"
                         if isinstance(result.get("saturation", {}).get(k.removeprefix("saturation_req_s_")), dict)
                         and "probes" in result["saturation"][k.removeprefix("saturation_req_s_")]
                         else f"{k.removeprefix('saturation_req_s_')}: saturation {v:.2f} req/s")
    lines.append("mean ± sd over seeds; ratios to fcfs on the same requests")
    lines.append(f"{'regime':<6}{'load':>6} {'seeds':<8}{'policy':<14}{'mean s':>13}{'/fcfs':>14}{'p99/fcfs':>13}"
                 f"{'TTFT/fcfs':>13}{'oracle frac':>14}{'/sjf_prompt':>13}{'thr/fcfs':>13}{'preempt':>12}{'recomp':>14}")
    for r in aggregate(result):
        lines.append(f"{r['regime']:<6}{r['load']:>6} {','.join(map(str, r['seeds'])):<8}{r['policy']:<14}"
                     f"{f(r['mean_latency_s'], '.2f'):>13}{f(r['ratio']):>14}{f(r['p99_ratio'], '.2f'):>13}"
                     f"{f(r['ttft_ratio'], '.2f'):>13}{f(r['oracle_fraction'], '.2f'):>14}{f(r['vs_sjf_prompt']):>13}"
                     f"{f(r['throughput_ratio']):>13}{f(r['preemptions'], '.0f'):>12}{f(r['recomputed_tokens'], '.0f'):>14}")
    return "\n".join(lines) + "\n"


def merge(dirs: Sequence[Path]) -> dict:
    """Sections of one grid -> one result (cells tagged with the folder they came from). Runs must
    agree on model, predictions, request count and batch; saturation rates may differ only if
    every section searched its own (then per-section rates are listed)."""
    parts = [json.loads((Path(d) / "serve.json").read_text()) for d in dirs]
    keys = ("model", "predictions", "num_requests", "max_batch", "device")
    for p in parts[1:]:
        for k in keys:
            if p.get(k) != parts[0].get(k):
                raise ValueError(f"merge: {k} differs between sections: {parts[0].get(k)!r} vs {p.get(k)!r}")
    out = {k: parts[0].get(k) for k in keys + ("pool", "max_output", "kv_requests", "host_blocks", "mean_total_tokens")}
    out["policies"] = list(dict.fromkeys(n for p in parts for n in p["policies"]))
    out["cells"], out["skipped"], out["sections"] = [], [], []
    for d, p in zip(dirs, parts):
        out["sections"].append({"dir": str(d), "section": p.get("section"), "cells": [[c["regime"], c["load"], c["seed"]] for c in p["cells"]],
                                **{k: v for k, v in p.items() if k.startswith("saturation_req_s_")}})
        for c in p["cells"]:
            out["cells"].append(dict(c, source=str(d)))
        out["skipped"] += p.get("skipped", [])
        for k, v in p.items():
            if k.startswith("saturation_req_s_"):
                out.setdefault(k, v)
                if abs(out[k] - v) > 1e-9:
                    logger.warning("merge: %s differs between sections (%.3f vs %.3f); cells keep their own rate_req_s",
                                   k, out[k], v)
    return out


def pooled_table(result: dict, resamples: int = 2000, seed: int = 0) -> tuple[list[dict], str]:
    """Per (regime, load, policy), pooled over every seed's requests: ratio to fcfs of mean
    latency and of mean TTFT (pooled means) with two 95% bootstrap intervals: `paired` resamples
    requests within each seed (pairs = the same request under both policies; covers request
    sampling only) and `seeds` resamples whole seeds (covers run-to-run variation, the larger
    one here; crude with few seeds); p99 of the pooled latencies / fcfs's, throughput (all tokens
    over all makespans) / fcfs's, preemptions (total and per run)."""
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for c in result["cells"]:
        if "fcfs" not in c["policies"]:
            continue
        groups.setdefault((c["regime"], c["load"]), []).append(c)
    rows = []
    for (regime, load), cells in groups.items():      # the resamples are drawn in this order
        names = [n for n in result["policies"] if all(n in c["policies"] for c in cells)]
        base = {k: [np.asarray(c["policies"]["fcfs"][k], float) for c in cells] for k in ("latency_s", "ttft_s")}
        idx = [[rng.integers(0, len(b), len(b)) for b in base["latency_s"]] for _ in range(resamples)]
        sidx = rng.integers(0, len(cells), (resamples, len(cells)))
        # fcfs's resampled sums: every policy's ratio shares them
        bden = {k: np.array([max(sum(x[i].sum() for x, i in zip(b, ii)), 1e-12) for ii in idx]) for k, b in base.items()}
        for name in names:
            row = {"regime": regime, "load": load, "policy": name, "seeds": [c["seed"] for c in cells],
                   "requests": int(sum(len(b) for b in base["latency_s"]))}
            for key, label in (("latency_s", "latency"), ("ttft_s", "ttft")):
                a = [np.asarray(c["policies"][name][key], float) for c in cells]
                b = base[key]
                sa, sb = np.array([x.sum() for x in a]), np.array([x.sum() for x in b])
                row[f"{label}_ratio"] = float(sa.sum() / sb.sum())
                boot = np.array([sum(x[i].sum() for x, i in zip(a, ii)) for ii in idx]) / bden[key]
                row[f"{label}_ci95_paired"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
                sboot = sa[sidx].sum(1) / np.maximum(sb[sidx].sum(1), 1e-12)
                row[f"{label}_ci95_seeds"] = [float(np.percentile(sboot, 2.5)), float(np.percentile(sboot, 97.5))]
                row[f"{label}_per_seed"] = [float(x) for x in sa / sb]
            la = np.concatenate([c["policies"][name]["latency_s"] for c in cells])
            row["p99_ratio"] = float(np.percentile(la, 99) / np.percentile(np.concatenate(base["latency_s"]), 99))
            tok = lambda n: sum(c["policies"][n]["throughput_tok_s"] * c["policies"][n]["makespan_s"] for c in cells)  # noqa: E731
            span = lambda n: sum(c["policies"][n]["makespan_s"] for c in cells)  # noqa: E731
            row["throughput_ratio"] = float((tok(name) / span(name)) / (tok("fcfs") / span("fcfs")))
            row["mean_latency_s"] = float(la.mean())
            row["mean_ttft_s"] = float(np.mean(np.concatenate([c["policies"][name]["ttft_s"] for c in cells])))
            pre = [int(c["policies"][name]["preemptions"]) for c in cells]
            row["preemptions_total"], row["preemptions_per_run"] = int(sum(pre)), pre
            rows.append(row)
    rows.sort(key=lambda r: (r["regime"], load_order(r["load"])))       # stable: policies keep their order
    f = lambda v: f"{v:.3f}"  # noqa: E731
    ci = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
    lines = ["| regime | load | policy | seeds x requests | mean s | latency / fcfs | 95% CI paired (requests) | "
             "95% CI seeds | per seed | TTFT s | TTFT / fcfs | 95% CI paired | 95% CI seeds | p99 / fcfs | "
             "throughput / fcfs | preemptions total (per run) |", "|" + "---|" * 16]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['load']} | {r['policy']} | {len(r['seeds'])} x {r['requests'] // len(r['seeds'])} | "
                     f"{r['mean_latency_s']:.3f} | {f(r['latency_ratio'])} | {ci(r['latency_ci95_paired'])} | "
                     f"{ci(r['latency_ci95_seeds'])} | {' '.join(f'{x:.2f}' for x in r['latency_per_seed'])} | "
                     f"{r['mean_ttft_s']:.3f} | {f(r['ttft_ratio'])} | {ci(r['ttft_ci95_paired'])} | {ci(r['ttft_ci95_seeds'])} | "
                     f"{r['p99_ratio']:.2f} | {r['throughput_ratio']:.3f} | {r['preemptions_total']} "
                     f"({' '.join(map(str, r['preemptions_per_run']))}) |")
    return rows, "\n".join(lines) + "\n"


def merge_main(argv) -> int:
    ap = argparse.ArgumentParser(description="combine serve.py sections")
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = merge([Path(d) for d in args.dirs])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pooled, table = pooled_table(result)
    result["pooled"] = pooled
    (out / "serve.json").write_text(json.dumps(result, indent=1))
    text = summary_lines(result) + "".join(f"section {s['section']}: {s['dir']}: {s['cells']}\n" for s in result["sections"])
    text += ("\npooled over seeds (ratios of pooled means to fcfs on the same requests; 'paired' CI resamples "
             "requests within each seed, 'seeds' CI resamples whole seeds):\n" + table)
    (out / "serve.summary.txt").write_text(text)
    logger.info("\n%s", text)
    plot(result, out)
    return 0


def plot(result: dict, out: Path) -> None:
    """Per regime: ratios to fcfs (top) and absolute seconds (bottom) of mean latency, mean TTFT
    and p99 vs load, one line per policy (mean ± sd over seeds), and the burst as bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = aggregate(result)
    absolute = {}
    for c in result["cells"]:
        for name, s in c["policies"].items():
            for key in ("mean_latency_s", "mean_ttft_s", "p99_latency_s"):
                absolute.setdefault((c["regime"], c["load"], name, key), []).append(s[key])
    tag = f"{result['device']}, {Path(str(result['model'])).name}, {result.get('predictions', 'probe')}"
    for regime in sorted({r["regime"] for r in rows}):
        rs = [r for r in rows if r["regime"] == regime]
        loads = sorted({float(r["load"]) for r in rs if r["load"] != "burst"})
        fig, axes = plt.subplots(2, 4, figsize=(17, 7.2))
        panels = (("ratio", "mean_latency_s", "mean latency"), ("ttft_ratio", "mean_ttft_s", "mean TTFT"),
                  ("p99_ratio", "p99_latency_s", "p99 latency"))
        for col, (rkey, akey, title) in enumerate(panels):
            for name in result["policies"]:
                pts = sorted((float(r["load"]), *r[rkey]) for r in rs if r["policy"] == name and r["load"] != "burst")
                if pts:
                    x, m, sd = zip(*pts)
                    axes[0, col].errorbar(x, m, yerr=sd, marker="o", capsize=3, label=name)
                ab = sorted((float(l), float(np.mean(v)), float(np.std(v))) for (g, l, n, k), v in absolute.items()
                            if g == regime and n == name and k == akey and l != "burst")
                if ab:
                    x, m, sd = zip(*ab)
                    axes[1, col].errorbar(x, m, yerr=sd, marker="o", capsize=3, label=name)
            axes[0, col].axhline(1.0, color="grey", lw=0.8, ls="--")
            axes[0, col].set_title(f"{title} / fcfs")
            axes[1, col].set_title(f"{title} (s)")
            for ax in axes[:, col]:
                ax.set_xlabel("load (x sustained saturation)")
                if loads:
                    ax.set_xticks(loads)
        burst = [r for r in rs if r["load"] == "burst"]
        if burst:
            names = [r["policy"] for r in burst]
            axes[0, 3].bar(range(len(burst)), [r["ratio"][0] for r in burst], yerr=[r["ratio"][1] for r in burst], capsize=3)
            axes[0, 3].set_xticks(range(len(burst)), names, rotation=30, fontsize=8)
            axes[0, 3].axhline(1.0, color="grey", lw=0.8, ls="--")
            vals = [absolute[(regime, "burst", n, "mean_latency_s")] for n in names]
            axes[1, 3].bar(range(len(burst)), [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], capsize=3)
            axes[1, 3].set_xticks(range(len(burst)), names, rotation=30, fontsize=8)
        axes[0, 3].set_title("burst: mean latency / fcfs")
        axes[1, 3].set_title("burst: mean latency (s)")
        if axes[0, 0].get_legend_handles_labels()[0]:
            axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"{regime} regime, {tag} (mean ± sd over seeds)")
        fig.tight_layout()
        fig.savefig(out / f"serve_{regime}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
