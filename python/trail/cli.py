"""The `trail` command line: the parser of every subcommand, the argument types they share, and
`main`. Library code never imports this module; it is the one place that prints.

Building the parser imports no torch (nor trail._C, nor the predictor package), so `trail --help`
and `trail VERB --help` answer at once; each command imports what it needs when it runs. Every
option's value is checked at parse time by a `type=` function (trail.cli_args) that raises
`argparse.ArgumentTypeError`, so a bad value is one line on stderr (`trail sim: error: argument
--load: must be a number > 0, got '0'`) and exit code 2, never a traceback; what can only be
checked later (a file's contents, options that conflict) raises `UsageError`, which `main` prints
the same way.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from trail.cli_args import Parser, UsageError
from trail.policies import POLICIES

DESCRIPTION = """\
trail: LLM serving that schedules requests by their predicted remaining output length
(shortest-predicted-remaining-first with limited preemption), and the tools around it: a
simulator to compare scheduling policies before deploying, and the pipeline that trains the
output-length predictor for your own model and prompts.

Run `trail COMMAND --help` for a command's options (each with its default)."""

EPILOG = """\
start with:
  trail demo                          the four policies on the real SmolLM2-135M-Instruct (CPU: under 2 min)
  trail sim --regime kv --load 1.1    the same comparison in the simulator, 2000 requests x 3 seeds
predictor pipeline (your own model):
  trail collect -> trail embed -> trail train-probe -> trail eval-probe --record -> trail judge
over HTTP (pip install trail[serve]):
  trail serve MODEL                   an OpenAI-compatible server; trail bench-serve --url URL --trace FILE"""


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import trail
    import trail_kernels

    info = trail.native_info()
    info["cuda_available"] = torch.cuda.is_available()
    info["kernels"] = trail_kernels.kernel_mode()
    info["triton"] = trail_kernels.triton_available()
    print(json.dumps(info, indent=2))
    return 0


_DEMO_MAX_REQUESTS = 48       # the requests in trail/data/demo_requests.json
_DEMO_MAX_NEW_TOKENS = 4096   # prompt + cap stay within SmolLM2's 8192 positions


def _demo_int(low: int, high: int):
    """An argparse type for `trail demo`: an integer in [low, high], else a one-line error."""
    what = f"a positive integer <= {high}" if low == 1 else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


def _demo_json_path(text: str) -> str:
    """A file for `trail demo --json`: in an existing, writable folder (checked before the run)."""
    from trail.cli_args import output_file

    path = output_file(text)
    if not os.access(os.path.dirname(path) or ".", os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: its directory is not writable")
    return path


def _demo_requests(n: int, seed: int):
    """`n` of the demo's held-out requests (trail/data/demo_requests.json, sorted by recorded output
    length) at evenly spaced ranks, so any `n` spans short to long; shuffled by `seed` (arrival
    order is not length order)."""
    import json
    from pathlib import Path

    import numpy as np

    import trail
    from trail.compare import ReplayRequest

    data = json.loads((Path(trail.__file__).parent / "data" / "demo_requests.json").read_text())["requests"]
    pick = np.unique(np.round(np.linspace(0, len(data) - 1, min(n, len(data)))).astype(int))
    np.random.default_rng(seed).shuffle(pick)      # arrival order is not length order
    return [ReplayRequest(data[i]["prompt_ids"], data[i]["output_len"]) for i in pick]


def cmd_demo(args: argparse.Namespace) -> int:
    """The verdict in miniature: real SmolLM2-135M-Instruct with the shipped probe; held-out prompts
    arrive at once into a small max batch, so they queue; the same requests run under each policy
    (output lengths replayed from the recorded trace, capped at --max-new-tokens, so every policy
    does the same work). Sized to finish within 2 minutes on an idle 2-core CPU with one torch
    thread: a decode step of this model there costs 0.07-0.13 s at batch 1-4 (the float32 weights
    are read once a step), so the default is a burst of 16 mostly short answers (5..100 tokens,
    542 per policy) into max batch 4: about 100 s in all."""
    import json
    import platform
    import time

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    import torch

    torch.set_num_threads(args.threads)

    import trail
    from trail.assets import smollm2_hf_dir
    from trail.compare import compare, replay_length, run_interleaved
    from trail.engine import LLMEngine
    from trail.engine_config import EngineConfig
    from trail.engine_loading import generation_eos_ids, prompt_predictor_fn
    from trail.models.loader import load_hf, load_tokenizer
    from trail.predictor.probe_file import load_probe_params, shipped_probe_dir
    from trail.request import SamplingParams

    policies = list(dict.fromkeys(args.policies))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    print(f"trail {trail.__version__} ({trail.native_info()['build']} build) on {device}"
          f"{f', {threads} torch thread' + ('s' if threads > 1 else '') if device == 'cpu' else ''}: "
          f"loading SmolLM2-135M-Instruct, its shipped probe and prompt predictor ...", flush=True)
    folder = smollm2_hf_dir()
    model, tok = load_hf(folder, device=device), load_tokenizer(folder)
    shipped = shipped_probe_dir("SmolLM2-135M-Instruct")
    probe, spec = load_probe_params(shipped / "probe", expect_d=model.config.hidden_size)
    predictor = prompt_predictor_fn(shipped / "prompt_boe", model, tok)
    eos = generation_eos_ids(folder, tok)
    requests = _demo_requests(args.num_requests, args.seed)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=1.1, detokenize=False)
    replayed = [replay_length(r, params) for r in requests]
    lengths = sorted(replayed)
    capped = sum(r.output_len > args.max_new_tokens for r in requests)
    print(f"probe on layer {spec.layer}, bag-of-embeddings prompt predictor (loaded in {time.perf_counter() - started:.0f} s)")
    print(f"{len(requests)} held-out prompts arrive at once (a burst) into max batch {args.max_batch}; each output "
          f"length is replayed from the recorded trace ({lengths[0]}..{lengths[-1]} tokens, EOS ignored"
          f"{f'; {capped} capped at max_new_tokens' if capped else ''}), so every policy does the same work; "
          f"predictors see the cap max_new_tokens={args.max_new_tokens}, never the length.")

    # KV pool: every request resident at once (this demo is about order, not memory), at least 0.25 GiB
    mcfg = model.config
    kv_bytes_per_token = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * next(model.parameters()).element_size()
    need_tokens = sum(len(r.prompt_ids) + n + 16 for r, n in zip(requests, replayed))
    kv_gib = max(0.25, 1.25 * need_tokens * kv_bytes_per_token / 2**30)
    max_model_len = max(len(r.prompt_ids) for r in requests) + args.max_new_tokens
    rate = None

    def make_engine(policy, clock):
        nonlocal rate
        config = EngineConfig(policy=policy, max_batch=args.max_batch, max_slots=max(1024, args.max_batch),
                              max_model_len=max_model_len, max_tokens_per_step=max(512, args.max_batch),
                              kv_cache_gib=kv_gib, num_host_blocks=0, prefill_tokens_per_s=rate)
        engine = LLMEngine(model, tok, config, probe=probe, probe_layer=spec.layer, probe_max_new=spec.max_new_tokens,
                           prompt_predictor=predictor, eos_token_ids=eos, clock=clock)
        rate = engine.prefill_tokens_per_s       # measured once, the same cost model for every policy
        return engine

    print(f"Policies run side by side, one engine step each in turn; each latency is on its engine's own clock "
          f"(the sum of its step times), so background load hits every policy alike. {sum(replayed)} tokens per "
          f"policy to generate:", flush=True)
    runs = run_interleaved(make_engine, policies, requests, params, progress=True)
    result = compare(runs)
    pols = result["policies"]
    wall = time.perf_counter() - started
    print(f"\n{'policy':<11}{'mean lat':>9}{'p50':>8}{'p99':>8}{'TTFT':>8}{'tok/s':>8}{'preempt':>8}"
          f"{'vs fcfs':>9}  {'95% CI':<14}{'oracle gain':>11}")
    for name, s in pols.items():
        ci = s.get("latency_ratio_ci95")
        frac = s.get("oracle_gain_fraction")
        ratio = s.get("latency_ratio_to_fcfs")
        print(f"{name:<11}{s['mean_latency_s']:>8.1f}s{s['p50_latency_s']:>7.1f}s{s['p99_latency_s']:>7.1f}s"
              f"{s['mean_ttft_s']:>7.1f}s{s['throughput_tok_s']:>8.1f}{s['preemptions']:>8}"
              f"{'-' if ratio is None else f'{ratio:.2f}x':>9}  "
              f"{'' if ci is None else f'[{ci[0]:.2f}, {ci[1]:.2f}]':<14}"
              f"{'' if frac is None else f'{100 * frac:.0f}%':>11}")
    gain = result["oracle_gain"]
    print()
    if gain is not None:
        if gain < 0.10:
            print(f"The oracle gains only {100 * gain:.0f}% over fcfs here: too little to judge a predictor by.")
        else:
            print(f"The oracle (true lengths) cuts mean latency by {100 * gain:.0f}% against fcfs; "
                  "'oracle gain' is the share of that cut each policy reaches.")
    elif "fcfs" not in pols:
        print("fcfs did not run: no ratios or intervals (add fcfs to --policies).")
    for name, s in pols.items():
        if "within_noise" in s:
            verdict = ("within noise of fcfs (the 95% interval includes 1.00x)" if s["within_noise"] else
                       f"{'faster' if s['latency_ratio_to_fcfs'] < 1 else 'slower'} than fcfs beyond noise")
            line = f"  {name}: mean latency {s['latency_ratio_to_fcfs']:.2f}x fcfs's, {verdict}"
            if "ttft_ratio_ci95" in s:
                lo, hi = s["ttft_ratio_ci95"]
                line += (f"; mean TTFT {s['ttft_ratio_to_fcfs']:.2f}x [{lo:.2f}, {hi:.2f}]"
                         f"{' (within noise)' if lo <= 1.0 <= hi else ''}")
            print(line)
    if "trail" in pols and not math.isnan(pols["trail"]["prediction_mae"]):
        print(f"trail's probe: mean |predicted - true remaining| {pols['trail']['prediction_mae']:.1f} tokens per request")
    load_after = os.getloadavg()[0]
    print(f"{wall:.0f} s in all on {os.cpu_count()} CPU cores with {threads} torch thread{'s' if threads > 1 else ''} "
          f"(1-minute load average {load_before:.1f} before, {load_after:.1f} after)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "policy_order": policies, "requests": len(requests), "max_batch": args.max_batch,
                       "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                       "output_lengths": lengths, "capped": capped,
                       "tokens_per_policy": sum(replayed), "device": device, "threads": threads,
                       "cpu_count": os.cpu_count(), "machine": platform.machine(), "wall_s": wall,
                       "load_avg_1m": [load_before, load_after], "trail_version": trail.__version__,
                       "torch_version": torch.__version__}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _predictor_verbs():
    """trail.predictor.cli_verbs without trail.predictor's __init__, which imports torch (its probe
    files): the module itself imports nothing heavy, and the package loads as usual when a verb runs."""
    import importlib
    import importlib.machinery
    import importlib.util

    name = "trail.predictor.cli_verbs"
    if "trail.predictor" in sys.modules:        # already paid for: the plain import
        return importlib.import_module(name)
    if name not in sys.modules:
        import trail

        folders = [os.path.join(folder, "predictor") for folder in trail.__path__]
        spec = importlib.machinery.PathFinder.find_spec(name, folders)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def build_parser() -> argparse.ArgumentParser:
    import trail

    parser = Parser(prog="trail", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"trail {trail.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    p = sub.add_parser("info", help="the loaded native build (cpu or cuda), torch versions and kernel dispatch",
                       description="Print, as JSON, the native build of trail._C that loaded (cpu or cuda,\n"
                                   "compiler flags, the torch it was built against and the one it runs with),\n"
                                   "whether CUDA is available, and which kernels run (TRAIL_KERNELS: triton or\n"
                                   "the torch reference).")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="fcfs vs sjf_prompt vs trail vs oracle on the real SmolLM2-135M-Instruct "
                                    "(CPU is fine: under 2 minutes on 2 cores)",
                       description="The four policies side by side on the real SmolLM2-135M-Instruct with its shipped\n"
                                   "probe: a burst of held-out prompts into a small max batch, each output length\n"
                                   "replayed from the recorded trace, mean latency with paired-bootstrap 95% intervals.\n"
                                   "The defaults finish in under 2 minutes on an idle 2-core CPU. Torch runs 1 thread\n"
                                   "by default: the demo's batches are tiny, a second thread gains little on an idle\n"
                                   "machine and is several times slower when other processes share the cores.")
    p.add_argument("--num-requests", type=_demo_int(1, _DEMO_MAX_REQUESTS), default=16,
                   help=f"held-out prompts in the burst, 1..{_DEMO_MAX_REQUESTS}, spread from short to long answers "
                        f"(default: %(default)s)")
    p.add_argument("--max-batch", type=_demo_int(1, 1024), default=4,
                   help="running requests per step, 1..1024 (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=_demo_int(1, _DEMO_MAX_NEW_TOKENS), default=512,
                   help=f"the cap the predictors and scheduler see, 1..{_DEMO_MAX_NEW_TOKENS} (the probe was trained "
                        f"up to 512: above, the engine warns); outputs stop at their recorded length, or at this cap "
                        f"if it is lower (default: %(default)s)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES, metavar="POLICY",
                   help=f"policies to compare, from {', '.join(POLICIES)} (default: all)")
    p.add_argument("--seed", type=_demo_int(0, 2**32 - 1), default=1,
                   help="shuffles the arrival order (default: %(default)s, a typical order at the default size: in a "
                        "step-count model replaying the recorded lengths its oracle gain over fcfs is near the median "
                        "of seeds 0..29, while seed 0 happens to put the long answers last, where fcfs is nearly as "
                        "good as the oracle)")
    p.add_argument("--threads", type=_demo_int(1, 256), default=1,
                   help="torch CPU threads (default: %(default)s; see above)")
    p.add_argument("--json", metavar="PATH", type=_demo_json_path, help="write the results as JSON")
    p.set_defaults(func=cmd_demo)
    from trail import sim_cli

    sim_cli.register(sub)
    _predictor_verbs().add_subcommands(sub)
    from trail import bench_serve
    from trail.server import cli as serve_cli

    serve_cli.register(sub)
    bench_serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"trail {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
