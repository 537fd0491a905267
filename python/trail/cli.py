"""The `trail` command. Library code never imports this module; it is the one place that prints."""
from __future__ import annotations

import argparse
import json
import logging
import sys


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


DEMO_PROMPTS = (
    "What is the capital of France? Answer in one word.",
    "Write a haiku about schedulers.",
    "Explain in detail how a hash table works, with an example in Python.",
    "List three colours.",
)


def cmd_demo(args: argparse.Namespace) -> int:
    """Real SmolLM2-135M-Instruct weights through trail's model runner, paged KV cache and probe
    kernel: every request's predicted remaining length, refined at every step."""
    import time

    import torch

    import trail
    from trail.assets import SMOLLM2_ID, smollm2_hf_dir
    from trail.generate import generate_with_predictions
    from trail.models.loader import load_hf, load_tokenizer
    from trail.predictor.filter_adapter import probe_params
    from trail.predictor.hf_backend import chat_ids
    from trail.predictor.probe_file import load_probe, shipped_probe_dir
    from trail.sampling import SampleParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"trail {trail.__version__}, native build: {trail.native_info()['build']}, device: {device}")
    folder = smollm2_hf_dir()
    model = load_hf(folder, device=device)
    tok = load_tokenizer(folder)
    mlp, spec = load_probe(shipped_probe_dir(SMOLLM2_ID) / "probe", expect_model=SMOLLM2_ID,
                           expect_d=model.config.hidden_size)
    print(f"probe: layer {spec.layer}, {spec.num_bins} bins, alpha {spec.alpha}, eps {spec.eps}")
    prompts = args.prompt or list(DEMO_PROMPTS)
    ids = [chat_ids(tok, p) for p in prompts]
    params = SampleParams(temperature=0.0, repetition_penalty=1.1)
    t0 = time.perf_counter()
    history = []
    print(f"{'step':>5}  " + "  ".join(f"req{i}: gen/pred" for i in range(len(prompts))))
    for rec in generate_with_predictions(model, ids, probe_params(mlp, spec), spec.layer,
                                         args.max_new_tokens, [tok.eos_token_id], params):
        history.append(rec)
        if rec.step % args.every == 0 or all(rec.finished):
            cells = "  ".join(f"{g:>5}/{p:6.1f}{'*' if f else ' '}" for g, p, f in
                              zip(rec.generated, rec.predicted_remaining, rec.finished))
            print(f"{rec.step:>5}  {cells}")
    elapsed = time.perf_counter() - t0
    final = history[-1].generated
    print(f"\n{len(history)} steps in {elapsed:.1f} s ({sum(final) / elapsed:.1f} tokens/s); * = finished")
    print("request  length  hit cap  MAE of predicted remaining over its steps   text")
    for i, p in enumerate(prompts):
        errs = [abs(r.predicted_remaining[i] - (final[i] - r.generated[i] + 1))
                for r in history if r.new_tokens[i] is not None]
        print(f"{i:>7}  {final[i]:>6}  {'yes' if final[i] >= args.max_new_tokens else 'no':>7}  "
              f"{sum(errs) / len(errs):>10.1f}   {p[:40]!r}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trail", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="the loaded native build and kernel dispatch")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="run trail on the real SmolLM2-135M-Instruct (CPU is fine)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: four built-in)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--every", type=_positive_int, default=16, help="print every N steps")
    p.set_defaults(func=cmd_demo)
    from trail.predictor.cli_verbs import add_subcommands

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
