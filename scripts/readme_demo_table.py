#!/usr/bin/env python3
"""Rewrites README.md's demo section from `trail demo --json` output, so the table cannot drift
from what the demo prints:

    trail demo --json bench/results/cpu_demo/demo.json | tee bench/results/cpu_demo/demo.log
    python scripts/readme_demo_table.py bench/results/cpu_demo/demo.json [--readme README.md]

Replaces the text between `<!-- demo-table:begin -->` and `<!-- demo-table:end -->` with the
workload, the table (the demo's own columns), the verdicts and the run's wall time and machine,
and every inline `<!-- demo-wall -->...<!-- /demo-wall -->` with the wall time. Standard library
only (no torch): `render` and `rewrite` are importable for tests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap

BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"
WALL = re.compile(r"(<!-- demo-wall -->)(.*?)(<!-- /demo-wall -->)", re.S)
COLUMNS = ["policy", "mean lat", "p50", "p99", "TTFT", "tok/s", "preempt", "vs fcfs", "95% CI", "oracle gain"]


def _order(result: dict) -> list[str]:
    names = list(result["policies"])
    order = [p for p in result.get("policy_order", names) if p in result["policies"]]
    return order + [p for p in names if p not in order]


def wall_text(result: dict) -> str:
    return f"{result['wall_s']:.0f} s"


def render(result: dict, source: str | None = None) -> str:
    """The README block (markdown) for one `trail demo --json` result."""
    pols = result["policies"]
    lengths = result["output_lengths"]
    capped = result.get("capped", 0)
    lines = [_fill(
        f"`trail demo`: {result['requests']} held-out prompts (the probe never trained on them) arrive at once "
        f"into max batch {result['max_batch']}; each output length is replayed from the recorded trace "
        f"({lengths[0]}..{lengths[-1]} tokens, {result['tokens_per_policy']} per policy, EOS ignored"
        f"{f', {capped} capped at max_new_tokens' if capped else ''}) so every policy does the same work, while the "
        f"predictors only see the cap ({result['max_new_tokens']}). The policies run side by side, one engine step "
        f"each in turn, each latency on its own engine's clock."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for name in _order(result):
        s = pols[name]
        ratio, ci, frac = s.get("latency_ratio_to_fcfs"), s.get("latency_ratio_ci95"), s.get("oracle_gain_fraction")
        cells = [name, f"{s['mean_latency_s']:.1f} s", f"{s['p50_latency_s']:.1f} s", f"{s['p99_latency_s']:.1f} s",
                 f"{s['mean_ttft_s']:.1f} s", f"{s['throughput_tok_s']:.1f}", str(s["preemptions"]),
                 "-" if ratio is None else f"{ratio:.2f}x",
                 "" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]",
                 "" if frac is None else f"{100 * frac:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    gain = result.get("oracle_gain")
    prose = []
    if gain is not None:
        prose.append(f"The oracle (true lengths) cuts mean latency by {100 * gain:.0f}% against fcfs"
                     + ("; 'oracle gain' is the share of that cut each policy reaches." if gain >= 0.10 else
                        ": too little to judge a predictor by."))
        if any(s.get("oracle_gain_fraction", 0) > 1 for s in pols.values()):
            prose.append("A share above 100% means a policy beat the oracle in this run: the oracle knows the "
                         "true lengths but keeps the same limited-preemption rules, so its order is not the best "
                         f"possible, and with {result['requests']} requests the intervals are wide.")
    verdicts = []
    for name in _order(result):
        s = pols[name]
        if "within_noise" not in s:
            continue
        lo, hi = s["latency_ratio_ci95"]
        text = (f"{name} {s['latency_ratio_to_fcfs']:.2f}x fcfs's mean latency "
                + ("(within noise: the interval includes 1.00x)" if s["within_noise"] else
                   f"({'faster' if s['latency_ratio_to_fcfs'] < 1 else 'slower'} beyond noise)"))
        if "ttft_ratio_ci95" in s:
            tlo, thi = s["ttft_ratio_ci95"]
            text += (f", mean TTFT {s['ttft_ratio_to_fcfs']:.2f}x [{tlo:.2f}, {thi:.2f}]"
                     f"{' (within noise)' if tlo <= 1.0 <= thi else ''}")
        verdicts.append(text)
    if verdicts:
        prose.append("Against fcfs (95% paired-bootstrap intervals over the requests): " + "; ".join(verdicts) + ".")
    mae = pols.get("trail", {}).get("prediction_mae")
    if mae is not None and mae == mae:
        prose.append(f"trail's probe: mean |predicted - true remaining| {mae:.1f} tokens per request.")
    if prose:
        lines += [_fill(" ".join(prose)), ""]
    threads = result.get("threads")
    load = result.get("load_avg_1m")
    machine = (f"{result.get('cpu_count', '?')}-core CPU ({result.get('machine', '?')})"
               if result.get("device") == "cpu" else result.get("device", "?"))
    tail = (f"Wall time, this machine's figure: **{wall_text(result)}** for the whole command (loading included) "
            f"on a {machine}, {threads} torch thread{'s' if threads != 1 else ''}"
            + (f", 1-minute load average {load[0]:.1f} before and {load[1]:.1f} after" if load else "")
            + f" (trail {result.get('trail_version', '?')}, torch {result.get('torch_version', '?')}). Other "
              "machines, or this one under load, take longer; the latencies are on each engine's own clock, so "
              "the ratios hold.")
    if source:
        tail += f" Generated from `{source}` by `scripts/readme_demo_table.py`."
    lines.append(_fill(tail))
    return "\n".join(lines)


def _fill(text: str) -> str:
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def rewrite(readme: str, result: dict, source: str | None = None) -> str:
    """`readme` with the block between the markers (and the inline wall times) replaced."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"the README needs exactly one {BEGIN} ... {END} pair")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    out = f"{head}{BEGIN}\n{render(result, source)}\n{END}{tail}"
    return WALL.sub(lambda m: f"{m.group(1)}{wall_text(result)}{m.group(3)}", out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_json", help="the file `trail demo --json` wrote")
    parser.add_argument("--readme", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"),
                        help="the README to rewrite in place (default: the repository's)")
    args = parser.parse_args(argv)
    with open(args.demo_json) as f:
        result = json.load(f)
    with open(args.readme) as f:
        readme = f.read()
    root = os.path.dirname(os.path.abspath(args.readme))
    source = os.path.relpath(os.path.abspath(args.demo_json), root)
    try:
        new = rewrite(readme, result, None if source.startswith("..") else source)
    except ValueError as exc:
        parser.error(str(exc))
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"rewrote the demo section of {args.readme} from {args.demo_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
