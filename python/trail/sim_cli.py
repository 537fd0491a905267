"""`trail sim`: the discrete-event simulator (trail.sim) from the command line. cli.py wires it in
with `sim_cli.register(subparsers)`; the verb's handler is `sim_cli.run(args) -> int`. Registering
imports no torch (the simulator loads when the command runs)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from trail.cli_args import (UsageError, add_seed_arguments, existing_file, nonneg_float, nonneg_int,
                            output_file, policy_list, positive_float, positive_int, seeds_of)
from trail.policies import POLICIES

DESCRIPTION = """\
Simulate serving under each policy with the real policy step (trail._C) and a fitted step-time
model, and compare them on the same requests: mean / p50 / p99 latency, mean TTFT, throughput,
preemptions by kind, swapped bytes, recomputed tokens; ratios to fcfs (per seed, mean +- std), the
fraction of the oracle's mean-latency gain trail reaches (only where the oracle gains >= 10%), and
the ratio to sjf_prompt.

Workload: requests drawn from the recorded trace (trail/data/sim/recorded_predictions.npz, shipped
with the package: prompt / output lengths of SmolLM2-135M-Instruct on 377 held-out prompts, the
probe's per-step predictions and the prompt predictor's totals), arriving Poisson or in bursts at
--rate req/s or --load x the saturation rate the simulator finds (fcfs with an infinite backlog).
Predictions: recorded (the probe filter), exact, or noisy:<sd> (lognormal factor per request).

Engine: --regime ample (batch cap, KV for every running request) or kv (a pool for
--kv-requests average requests + --host-blocks host blocks, so memory binds), sized through
EngineConfig with Llama-3-8B KV (128 KiB per token); any limit can be overridden. Step time:
t = base + per_decode * rows + per_prefill_token * prefill tokens + per_ctx_token * sum(context)
+ swapped bytes / PCIe, constants from --step-fit (default trail/data/sim/step_fit.json, shipped with
the package, fitted to DESIGN.md's H100 figures until the fast-step benchmark exists).

Seeds: --seeds N runs seeds 0..N-1 (default 3: 0, 1, 2); --seed-list 0,3,7 runs exactly those.
Each seed draws its own requests and arrival times; every policy runs on the same ones. The +- after
mean/fcfs is the spread over seeds, so it needs 2 or more.

Too small to say anything: the order requests run in matters only once they queue. At --load 1.0
the oracle gains under 10% over fcfs (recorded trace: 0-5% below 1000 requests, 5-11% at 2000), at
1.1 it gains 15-35% from 1000 requests on; under 10% 'oracle frac' is n/a (a fraction of so small a
gain is noise) and a note after the table says why. --load 1.1, a larger --n or --arrivals burst
make the order matter.

Policy options (SchedulerConfig fields) for trail and oracle: --opt name=value, repeatable, e.g.
--opt c=0.5 --opt aging_rate=0 --opt admit_reserve=0.3 --opt memory_preemption=false.
Validation hook: --dump-input FILE writes the first seed's trace + limits + step model as JSON;
--input FILE simulates such a file (its own policy and limits) instead.

Examples:
  trail sim --regime kv --load 1.1                  # 2000 requests x seeds 0, 1, 2
  trail sim --regime kv --load 1.0 --n 4000 --seeds 5
  trail sim --regime ample --load 1.1 --predictions noisy:0.5 --opt margin=0 --seed-list 7
  trail sim --input run.json --json out.json
"""


def _predictions(text: str) -> str:
    kind, _, sd = text.partition(":")
    if text in ("recorded", "prefill", "exact") or (kind == "noisy" and _is_sd(sd)):
        return text
    raise argparse.ArgumentTypeError(f"must be recorded, prefill, exact or noisy:<sd> (sd a number >= 0, e.g. "
                                     f"noisy:0.5), "
                                     f"got {text!r}")


def _is_sd(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) >= 0
    except ValueError:
        return False


def _scheduler_option(text: str) -> tuple[str, object]:
    """--opt NAME=VALUE: NAME a SchedulerConfig field that policy_options may set, VALUE of its type.
    (Imports the config, hence torch, only when --opt is given; ranges are checked in `run`.)"""
    name, eq, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not eq or not name or not value:
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE (e.g. c=0.5), got {text!r}")
    from dataclasses import fields

    from trail.engine_config import _DERIVED
    from trail.scheduler_types import SchedulerConfig

    kinds = {f.name: str(f.type) for f in fields(SchedulerConfig) if f.name not in _DERIVED}
    if name not in kinds:
        raise argparse.ArgumentTypeError(f"unknown option {name!r} in {text!r}; known: {', '.join(sorted(kinds))}")
    kind = kinds[name]
    if "bool" in kind:
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{name} must be true or false, got {value!r}")
        return name, value.lower() == "true"
    try:
        number = int(value) if "int" in kind else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if 'int' in kind else 'a number'}, "
                                         f"got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{name} must be finite, got {value!r}")
    return name, number


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sim", help="compare the policies in the simulator (discrete-event, the real policy "
                                          "step) on recorded requests", description=DESCRIPTION)
    w = p.add_argument_group("workload")
    w.add_argument("--n", type=positive_int, default=2000, help="requests per run")
    add_seed_arguments(w, count=3)
    rate = w.add_mutually_exclusive_group()
    rate.add_argument("--load", type=positive_float, default=1.0,
                      help="arrival rate as a multiple of the saturation rate fcfs reaches")
    rate.add_argument("--rate", type=positive_float, default=None,
                      help="arrival rate in requests per second (instead of --load)")
    w.add_argument("--arrivals", choices=("poisson", "burst"), default="poisson",
                   help="poisson, or burst: half the requests in bursts of --burst at once")
    w.add_argument("--burst", type=positive_int, default=200, help="requests per burst (--arrivals burst)")
    w.add_argument("--predictions", type=_predictions, default="recorded",
                   metavar="{recorded,prefill,exact,noisy:SD}",
                   help="the probe's recorded per-step predictions, its first (prefill) prediction counted down "
                        "(no per-step filter), the exact remaining lengths, or exact times a lognormal factor per "
                        "request (sd SD)")
    w.add_argument("--recorded", type=existing_file, default=None, metavar="NPZ",
                   help="recorded predictions .npz, e.g. from `trail eval-probe --record` (default: the package's "
                        "trail/data/sim/recorded_predictions.npz)")
    e = p.add_argument_group("engine")
    e.add_argument("--regime", choices=("ample", "kv"), default="ample",
                   help="ample: the batch cap binds; kv: a small KV pool binds (memory preemption)")
    e.add_argument("--max-batch", type=positive_int, default=48, help="running requests per step")
    e.add_argument("--max-tokens-per-step", type=positive_int, default=2048,
                   help="tokens per step (prefill chunks + decodes); >= --max-batch")
    e.add_argument("--block-size", type=positive_int, default=16, help="KV block size in tokens")
    e.add_argument("--kv-requests", type=positive_float, default=24.0,
                   help="kv regime: the GPU pool holds this many average requests")
    e.add_argument("--host-blocks", type=nonneg_int, default=128, help="kv regime: host swap blocks")
    e.add_argument("--num-gpu-blocks", type=positive_int, default=None,
                   help="override the GPU pool in blocks (default: from --regime)")
    e.add_argument("--num-host-blocks", type=nonneg_int, default=None,
                   help="override the host pool in blocks (default: from --regime)")
    e.add_argument("--step-fit", type=existing_file, default=None, metavar="JSON",
                   help="step-time model JSON (default: the package's trail/data/sim/step_fit.json)")
    e.add_argument("--noise-sd", type=nonneg_float, default=0.0, help="lognormal step-time noise sd")
    s = p.add_argument_group("policies and output")
    s.add_argument("--policies", type=policy_list, default=list(POLICIES), metavar="P,P,...",
                   help=f"comma separated, from {', '.join(POLICIES)} (default: all)")
    s.add_argument("--opt", type=_scheduler_option, action="append", default=[], metavar="NAME=VALUE",
                   help="a SchedulerConfig option for trail and oracle, repeatable (e.g. c=0.5, aging_rate=0, "
                        "memory_preemption=false)")
    s.add_argument("--input", type=existing_file, default=None, metavar="JSON",
                   help="simulate this SimInput file (from --dump-input) with its own policy and limits; the "
                        "workload and engine options are then ignored")
    s.add_argument("--dump-input", type=output_file, default=None, metavar="JSON",
                   help="write the first seed's SimInput (trail policy) here")
    s.add_argument("--json", type=output_file, default=None, metavar="JSON",
                   help="write the metrics and the comparison here")
    p.set_defaults(func=run)
    return p


def _print_table(cmp: dict) -> None:
    hdr = (f"{'policy':12s} {'mean s':>8s} {'p50 s':>7s} {'p99 s':>8s} {'TTFT s':>7s} {'req/s':>6s} "
           f"{'mean/fcfs':>13s} {'p99/fcfs':>8s} {'oracle frac':>11s} {'/sjf':>6s} {'preempt':>8s} {'recomp tok':>10s}")
    print(hdr)
    for pol, d in cmp.items():
        frac = d.get("oracle_fraction", math.nan)
        print(f"{pol:12s} {d['mean_latency']:8.2f} {d['p50_latency']:7.2f} {d['p99_latency']:8.2f} "
              f"{d['mean_ttft']:7.2f} {d['throughput_rps']:6.2f} "
              f"{d.get('mean_latency_vs_fcfs', math.nan):7.3f}±{d.get('mean_latency_vs_fcfs_sd', math.nan):.3f} "
              f"{d.get('p99_latency_vs_fcfs', math.nan):8.2f} {'n/a' if math.isnan(frac) else f'{frac:.2f}':>11s} "
              f"{d.get('mean_latency_vs_sjf_prompt', math.nan):6.3f} {d['preemptions_total']:8.0f} "
              f"{d['recomputed_tokens']:10.0f}")


def _notes(results: dict, n: int, seeds: list, opts: dict) -> list[str]:
    """One line per reason the table says less than it seems to (too small a run, a missing baseline)."""
    import numpy as np

    notes = []
    fc, orc = results.get("fcfs"), results.get("oracle")
    means = [[r["mean_latency"] for r in runs] for runs in results.values()]
    if len(means) > 1 and all(np.allclose(m, means[0], rtol=1e-9, atol=0) for m in means[1:]):
        ttft = float(np.mean([r["mean_ttft"] for runs in results.values() for r in runs]))
        notes.append(f"every policy gave the same latencies: requests hardly waited (mean TTFT {ttft:.2f} s), so "
                     f"the order they ran in never mattered; raise --load (e.g. 1.1) or --n, or use --arrivals burst")
    if fc and orc:
        gains = [1.0 - o["mean_latency"] / f["mean_latency"] for f, o in zip(fc, orc)]
        counted = sum(g >= 0.1 for g in gains)
        shown = (f"{', '.join(f'{100 * g:.0f}%' for g in gains)} "
                 f"(seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})")
        if counted == 0:
            why = f"runs of {n} requests end before queues build; " if n < 1000 else ""
            notes.append(f"'oracle frac' is n/a: the oracle cuts fcfs's mean latency by only {shown}, and a fraction "
                         f"of a gain under 10% is noise; {why}try --load 1.1, a larger --n or --arrivals burst")
        elif counted < len(gains):
            notes.append(f"'oracle frac' averages {counted} of {len(gains)} seeds: the oracle cuts fcfs's mean "
                         f"latency by {shown}, and seeds under 10% are left out")
    else:
        missing = " and ".join(p for p in ("fcfs", "oracle") if p not in results)
        notes.append(f"'oracle frac' is n/a: it needs fcfs and oracle in --policies ({missing} missing)")
    if not fc:
        notes.append("mean/fcfs and p99/fcfs are nan: add fcfs to --policies")
    if "sjf_prompt" not in results:
        notes.append("/sjf is nan: add sjf_prompt to --policies")
    if len(seeds) == 1:
        notes.append("one seed: the +- after mean/fcfs is the spread over seeds, 0 with one; use --seeds 3 or more")
    if n < 100:
        notes.append(f"--n {n}: p99 of fewer than 100 requests is the slowest request's latency")
    if opts and not {"trail", "oracle"} & set(results):
        notes.append(f"--opt {', '.join(opts)} ignored: options apply to trail and oracle only")
    return notes


def run(args) -> int:
    from dataclasses import replace

    from trail import sim

    if args.input:
        try:
            inp = sim.SimInput.from_json(json.loads(Path(args.input).read_text()))
        except Exception as exc:    # whatever reading it raised: the file is not a SimInput
            raise UsageError(f"argument --input: {args.input} is not a SimInput JSON (write one with --dump-input): "
                             f"{type(exc).__name__}: {exc}") from None
        res = sim.simulate(inp.trace, inp.engine, inp.spec, inp.step_model, noise_sd=inp.noise_sd)
        m = res.metrics()
        print(json.dumps(m, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(m, indent=1))
        return 0
    try:
        pool = sim.load_recorded(args.recorded) if args.recorded else sim.load_recorded()
    except Exception as exc:        # whatever reading it raised: not a recorded-predictions file
        if not args.recorded:
            raise                   # the package's own file: a broken install, not a usage error
        raise UsageError(f"argument --recorded: cannot read {args.recorded}: {type(exc).__name__}: {exc}") from None
    try:
        sm = sim.StepTimeModel.from_json(args.step_fit) if args.step_fit else sim.default_step_model()
    except Exception as exc:        # whatever reading it raised: not a step-time fit
        if not args.step_fit:
            raise
        raise UsageError(f"argument --step-fit: cannot read {args.step_fit}: {type(exc).__name__}: {exc}") from None
    spec = sim.llama3_8b_kv_spec(args.block_size)
    opts = dict(args.opt)
    seeds = seeds_of(args)
    try:
        eng = sim.regime_engine(args.regime, pool, max_batch=args.max_batch, block_size=args.block_size,
                                kv_requests=args.kv_requests, host_blocks=args.host_blocks,
                                max_tokens_per_step=args.max_tokens_per_step)
        if args.num_gpu_blocks is not None:
            eng = replace(eng, num_gpu_blocks=args.num_gpu_blocks)
        if args.num_host_blocks is not None:
            eng = replace(eng, num_host_blocks=args.num_host_blocks)
        eng.scheduler_config(spec, eng.kv_layout(spec), recompute_s_per_token=sm.per_prefill_token_s)
    except ValueError as exc:
        raise UsageError(f"the engine limits do not fit together: {exc}") from None
    for name in [p for p in ("trail", "oracle") if opts and p in args.policies]:   # checked before any run
        try:
            e = eng.with_policy(name, **opts)
            e.scheduler_config(spec, e.kv_layout(spec), recompute_s_per_token=sm.per_prefill_token_s)
        except ValueError as exc:
            raise UsageError(f"argument --opt: {exc}") from None
    sat = sim.saturation_rate(pool, eng, spec, sm, n=min(args.n, 2000))
    rate = args.rate if args.rate is not None else args.load * sat
    print(f"{args.regime} regime: {eng.num_gpu_blocks} GPU / {eng.num_host_blocks} host blocks of {eng.block_size}, "
          f"max batch {eng.max_batch}; saturation {sat:.2f} req/s; rate {rate:.2f} req/s ({rate / sat:.2f}x); "
          f"{args.n} requests x {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({','.join(map(str, seeds))}); "
          f"predictions {args.predictions}; step model: {sm.source}")
    policies = {name: dict(policy=name, **(opts if name in ("trail", "oracle") else {})) for name in args.policies}

    def arrivals(n, seed):
        if args.arrivals == "burst":
            return sim.burst_arrivals(n, rate, seed, burst=args.burst)
        return sim.poisson_arrivals(n, rate, seed)

    if args.dump_input:
        tr = sim.make_trace(pool, arrivals(args.n, seeds[0]), args.predictions, seed=seeds[0])
        inp = sim.SimInput(tr, eng.with_policy("trail", **opts), spec, sm, args.noise_sd)
        Path(args.dump_input).write_text(json.dumps(inp.to_json()))
        print(f"wrote {args.dump_input}")
    results = sim.run_policies(pool, eng, spec, sm, arrivals, seeds, policies, predictions=args.predictions,
                               n=args.n, noise_sd=args.noise_sd)
    cmp = sim.compare(results)
    _print_table(cmp)
    for line in _notes(results, args.n, seeds, opts):
        print(f"note: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"saturation_rps": sat, "rate_rps": rate, "seeds": seeds,
                                               "compare": cmp, "runs": results}, indent=1, default=float))
    return 0


def main(argv=None) -> int:
    """`python -m trail.sim_cli ARGS` = `trail sim ARGS`."""
    import sys

    from trail.cli import main as cli_main

    return cli_main(["sim", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
