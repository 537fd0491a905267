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
from trail.cli_args import positive_int as _positive_int  # noqa: F401  (the demo's options)
from trail.policies import POLICIES

DESCRIPTION = """\
trail: LLM serving that schedules requests by their predicted remaining output length
(shortest-predicted-remaining-first with limited preemption), and the tools around it: a
simulator to compare scheduling policies before deploying, and the pipeline that trains the
output-length predictor for your own model and prompts.

Run `trail COMMAND --help` for a command's options (each with its default)."""

EPILOG = """\
start with:
  trail demo                          the four policies on the real SmolLM2-135M-Instruct (CPU: minutes)
  trail sim --regime kv --load 1.1    the same comparison in the simulator, 2000 requests x 3 seeds
predictor pipeline (your own model):
  trail collect -> trail embed -> trail train-probe -> trail eval-probe --record -> trail judge"""


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


def _demo_requests(n: int, seed: int):
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
    (output lengths replayed from the recorded trace, so every policy does the same work)."""
    import json

    import torch

    import trail
    from trail.assets import smollm2_hf_dir
    from trail.compare import compare, run_interleaved
    from trail.engine import LLMEngine
    from trail.engine_loading import generation_eos_ids, prompt_predictor_fn
    from trail.engine_config import EngineConfig
    from trail.models.loader import load_hf, load_tokenizer
    from trail.predictor.probe_file import load_probe_params, shipped_probe_dir
    from trail.request import SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = smollm2_hf_dir()
    model, tok = load_hf(folder, device=device), load_tokenizer(folder)
    shipped = shipped_probe_dir("SmolLM2-135M-Instruct")
    probe, spec = load_probe_params(shipped / "probe", expect_d=model.config.hidden_size)
    predictor = prompt_predictor_fn(shipped / "prompt_boe", model, tok)
    requests = _demo_requests(args.num_requests, args.seed)
    lengths = sorted(r.output_len for r in requests)
    print(f"trail {trail.__version__} ({trail.native_info()['build']} build) on {device}: SmolLM2-135M-Instruct, "
          f"probe on layer {spec.layer}, bag-of-embeddings prompt predictor")
    print(f"{len(requests)} held-out prompts arrive at once (a burst) into max batch {args.max_batch}; each output "
          f"length is replayed from the recorded trace ({lengths[0]}..{lengths[-1]} tokens, EOS ignored), so every "
          f"policy does the same work; predictors see the cap max_new_tokens={args.max_new_tokens}, never the length.")
    eos = generation_eos_ids(folder, tok)
    rate = None

    def make_engine(policy, clock):
        nonlocal rate
        config = EngineConfig(policy=policy, max_batch=args.max_batch, max_model_len=128 + args.max_new_tokens,
                              max_tokens_per_step=512, kv_cache_gib=0.25, num_host_blocks=0, prefill_tokens_per_s=rate)
        engine = LLMEngine(model, tok, config, probe=probe, probe_layer=spec.layer, probe_max_new=spec.max_new_tokens,
                           prompt_predictor=predictor, eos_token_ids=eos, clock=clock)
        rate = engine.prefill_tokens_per_s       # measured once, the same cost model for every policy
        return engine

    params = SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=1.1)
    print("Policies run side by side, one engine step each in turn; each latency is on its engine's own clock "
          "(the sum of its step times), so background load hits every policy alike.")
    runs = run_interleaved(make_engine, args.policies, requests, params, progress=True)
    result = compare(runs)
    pols = result["policies"]
    print(f"\n{'policy':<11}{'mean lat':>9}{'p50':>8}{'p99':>8}{'TTFT':>8}{'tok/s':>8}{'preempt':>8}"
          f"{'vs fcfs':>9}  {'95% CI':<14}{'oracle gain':>11}")
    for name, s in pols.items():
        ci = s.get("latency_ratio_ci95")
        frac = s.get("oracle_gain_fraction")
        print(f"{name:<11}{s['mean_latency_s']:>8.1f}s{s['p50_latency_s']:>7.1f}s{s['p99_latency_s']:>7.1f}s"
              f"{s['mean_ttft_s']:>7.1f}s{s['throughput_tok_s']:>8.1f}{s['preemptions']:>8}"
              f"{s.get('latency_ratio_to_fcfs', float('nan')):>8.2f}x  "
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "requests": len(requests), "max_batch": args.max_batch,
                       "output_lengths": lengths, "device": device}, f, indent=1)
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
                                    "(CPU is fine: ~2-3 minutes)")
    p.add_argument("--num-requests", type=_positive_int, default=12, help="held-out prompts in the burst (max 16)")
    p.add_argument("--max-batch", type=_positive_int, default=4, help="running requests per step")
    p.add_argument("--max-new-tokens", type=_positive_int, default=512,
                   help="the cap the predictors and scheduler see (outputs stop at their recorded length)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--seed", type=int, default=0, help="shuffles the arrival order")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=cmd_demo)
    from trail import sim_cli

    sim_cli.register(sub)
    _predictor_verbs().add_subcommands(sub)
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
