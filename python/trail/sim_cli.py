"""`trail sim`: the discrete-event simulator (trail.sim) from the command line. Wire it into
cli.py with `sim_cli.register(subparsers)`; the verb's handler is `sim_cli.run(args) -> int`."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from trail.scheduler_types import POLICIES

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

Policy options (SchedulerConfig fields) for trail and oracle: --opt name=value, repeatable, e.g.
--opt c=0.5 --opt aging_rate=0 --opt admit_reserve=0.3 --opt memory_preemption=false.
Validation hook: --dump-input FILE writes the first seed's trace + limits + step model as JSON;
--input FILE simulates such a file (its own policy and limits) instead.

Examples:
  trail sim --regime kv --load 1.0 --n 2000 --seeds 0,1,2
  trail sim --regime ample --load 1.1 --predictions noisy:0.5 --opt margin=0
  trail sim --input run.json --json out.json
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sim", help="simulate serving under each policy (discrete-event, real policy step)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--n", type=int, default=2000, help="requests per run (default 2000)")
    w.add_argument("--seeds", default="0,1,2", help="arrival / sampling seeds, comma separated (default 0,1,2)")
    rate = w.add_mutually_exclusive_group()
    rate.add_argument("--load", type=float, default=1.0, help="arrival rate as a multiple of saturation (default 1.0)")
    rate.add_argument("--rate", type=float, default=None, help="arrival rate in requests per second")
    w.add_argument("--arrivals", choices=("poisson", "burst"), default="poisson",
                   help="poisson, or burst: half the requests in bursts of --burst at once (default poisson)")
    w.add_argument("--burst", type=int, default=200, help="requests per burst (default 200)")
    w.add_argument("--predictions", default="recorded", help="recorded | exact | noisy:<sd> (default recorded)")
    w.add_argument("--recorded", default=None,
                   help="recorded predictions .npz (default: the package's trail/data/sim/recorded_predictions.npz)")
    e = p.add_argument_group("engine")
    e.add_argument("--regime", choices=("ample", "kv"), default="ample", help="memory regime (default ample)")
    e.add_argument("--max-batch", type=int, default=48, help="running requests per step (default 48)")
    e.add_argument("--max-tokens-per-step", type=int, default=2048, help="tokens per step (default 2048)")
    e.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    e.add_argument("--kv-requests", type=float, default=24.0,
                   help="kv regime: GPU pool for this many average requests (default 24)")
    e.add_argument("--host-blocks", type=int, default=128, help="kv regime: host swap blocks (default 128)")
    e.add_argument("--num-gpu-blocks", type=int, default=None, help="override the GPU pool (blocks)")
    e.add_argument("--num-host-blocks", type=int, default=None, help="override the host pool (blocks)")
    e.add_argument("--step-fit", default=None,
                   help="step-time model JSON (default: the package's trail/data/sim/step_fit.json)")
    e.add_argument("--noise-sd", type=float, default=0.0, help="lognormal step-time noise sd (default 0)")
    s = p.add_argument_group("policies and output")
    s.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma separated (default {','.join(POLICIES)})")
    s.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE",
                   help="SchedulerConfig option for trail and oracle (repeatable)")
    s.add_argument("--input", default=None, help="simulate one SimInput JSON file instead")
    s.add_argument("--dump-input", default=None, help="write the first seed's SimInput JSON (trail policy) here")
    s.add_argument("--json", default=None, help="write the metrics and comparison as JSON here")
    p.set_defaults(func=run)
    return p


def _parse_opts(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--opt expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        low = v.strip().lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = float(v)
    return out


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


def run(args) -> int:
    from trail import sim

    if args.input:
        inp = sim.SimInput.from_json(json.loads(Path(args.input).read_text()))
        res = sim.simulate(inp.trace, inp.engine, inp.spec, inp.step_model, noise_sd=inp.noise_sd)
        m = res.metrics()
        print(json.dumps(m, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(m, indent=1))
        return 0
    pool = sim.load_recorded(args.recorded) if args.recorded else sim.load_recorded()
    sm = sim.StepTimeModel.from_json(args.step_fit) if args.step_fit else sim.default_step_model()
    spec = sim.llama3_8b_kv_spec(args.block_size)
    eng = sim.regime_engine(args.regime, pool, max_batch=args.max_batch, block_size=args.block_size,
                            kv_requests=args.kv_requests, host_blocks=args.host_blocks,
                            max_tokens_per_step=args.max_tokens_per_step)
    from dataclasses import replace

    if args.num_gpu_blocks is not None:
        eng = replace(eng, num_gpu_blocks=args.num_gpu_blocks)
    if args.num_host_blocks is not None:
        eng = replace(eng, num_host_blocks=args.num_host_blocks)
    seeds = [int(s) for s in args.seeds.split(",")]
    opts = _parse_opts(args.opt)
    sat = sim.saturation_rate(pool, eng, spec, sm, n=min(args.n, 2000))
    rate = args.rate if args.rate is not None else args.load * sat
    print(f"{args.regime} regime: {eng.num_gpu_blocks} GPU / {eng.num_host_blocks} host blocks of {eng.block_size}, "
          f"max batch {eng.max_batch}; saturation {sat:.2f} req/s; rate {rate:.2f} req/s ({rate / sat:.2f}x); "
          f"{args.n} requests x {len(seeds)} seeds; predictions {args.predictions}; step model: {sm.source}")
    policies = {}
    for name in args.policies.split(","):
        policies[name] = dict(policy=name, **(opts if name in ("trail", "oracle") else {}))

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
    if args.json:
        Path(args.json).write_text(json.dumps({"saturation_rps": sat, "rate_rps": rate, "compare": cmp,
                                               "runs": results}, indent=1, default=float))
    return 0


def main(argv=None) -> int:
    """Standalone entry (python -m trail.sim_cli) until cli.py wires the verb."""
    parser = argparse.ArgumentParser(prog="trail")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
