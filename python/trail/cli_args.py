"""What every `trail` subcommand's parser shares (trail.cli, trail.sim_cli,
trail.predictor.cli_verbs): argument types, `UsageError`, the help formatter and the parser class.

Each type returns the parsed value or raises `argparse.ArgumentTypeError` saying what it wanted and
what it got, so a bad value is one line (`trail sim: error: argument --load: must be a number > 0,
got '0'`) and exit code 2. Imports nothing heavy (no torch): the parsers are built from it for
`--help`.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os

from trail.policies import POLICIES


# ------------------------------------------------------------------------------------------------
# Argument types: each returns the parsed value or raises ArgumentTypeError saying what it wanted
# and what it got (argparse prefixes "argument --NAME: ").
# ------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """A bad command line found after parsing (a file's contents, options that conflict): `main`
    prints it as `trail VERB: error: MESSAGE` and exits with 2, like argparse."""


def _bad(what: str, text) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {what}, got {text!r}")


def int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise _bad(what, text) from None
    if value < low:
        raise _bad(what, text)
    return value


def positive_int(text: str) -> int:
    return int_at_least(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return int_at_least(text, 0, "an integer >= 0")


def _finite(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _bad(what, text) from None
    if not (math.isfinite(value) and ok(value)):
        raise _bad(what, text)
    return value


def positive_float(text: str) -> float:
    return _finite(text, "a number > 0", lambda v: v > 0)


def nonneg_float(text: str) -> float:
    return _finite(text, "a number >= 0", lambda v: v >= 0)


def unit_interval(text: str) -> float:
    """A probability-like number in (0, 1]."""
    return _finite(text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def comma_list(item, what: str):
    """A type for `a,b,c`: no empty items, no repeats, each parsed by `item` (another type)."""
    def parse(text: str) -> list:
        parts = [x.strip() for x in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"must be {what}, comma separated with no empty item, got {text!r}")
        out = []
        for part in parts:
            value = item(part)          # its error quotes the item
            if value in out:
                raise argparse.ArgumentTypeError(f"{part!r} is listed twice in {text!r}")
            out.append(value)
        return out
    return parse


def policy_name(text: str) -> str:
    if text not in POLICIES:
        close = difflib.get_close_matches(text, POLICIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise argparse.ArgumentTypeError(f"unknown policy {text!r}{hint} (choose from {', '.join(POLICIES)})")
    return text


policy_list = comma_list(policy_name, f"policies from {', '.join(POLICIES)}")


def existing_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"not a file: {text!r}")
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def output_file(text: str) -> str:
    """A file to write: its folder must exist (checked now, not after a long run)."""
    folder = os.path.dirname(text) or "."
    if not text or text.endswith(os.sep) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"must be a file name to write, got {text!r}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no directory {folder!r}")
    return text


def seed_count(text: str) -> int:
    if "," in text:
        try:
            example = ",".join(map(str, comma_list(nonneg_int, "")(text)))
        except argparse.ArgumentTypeError:
            example = "0,3,7"
        raise argparse.ArgumentTypeError(f"must be a count N (runs seeds 0..N-1), got {text!r}; to name the seeds "
                                         f"use --seed-list {example}")
    return int_at_least(text, 1, "a count N >= 1 (runs seeds 0..N-1)")


def add_seed_arguments(group, count: int = 3) -> None:
    """`--seeds N` (seeds 0..N-1) or `--seed-list 0,3,7`, never both; read them with `seeds_of`."""
    g = group.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=seed_count, default=count, metavar="N",
                   help="how many seeds: runs seeds 0..N-1")
    g.add_argument("--seed-list", type=comma_list(nonneg_int, "integers >= 0"), default=None, metavar="S,S,...",
                   help="run exactly these seeds, e.g. 0,3,7 (instead of --seeds)")


def seeds_of(args: argparse.Namespace) -> list[int]:
    return list(args.seed_list) if args.seed_list is not None else list(range(args.seeds))


# ------------------------------------------------------------------------------------------------
# Help and errors
# ------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every option's help ends with its default, except
    where the default is nothing (None, a flag's False) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default is argparse.SUPPRESS or default == []
        if nothing or "default" in text.lower() or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """Errors are one line: `trail sim: error: argument --load: must be a number > 0, got '0'`
    (exit code 2), with a pointer to --help instead of the usage block."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
