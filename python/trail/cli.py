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


def cmd_demo(args: argparse.Namespace) -> int:
    """The smallest real thing trail does end to end on the CPU; grows as pieces land."""
    import trail

    print("trail", trail.__version__, "native build:", trail.native_info()["build"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trail", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="the loaded native build and kernel dispatch")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="run trail on the real SmolLM2-135M-Instruct (CPU is fine)")
    p.add_argument("--prompt", default="Write a haiku about schedulers.")
    p.add_argument("--max-new-tokens", type=int, default=32)
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
