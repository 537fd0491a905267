"""Reports of `trail bench-serve` (trail.bench_serve): one run's summary (the in-process serving
benchmark's figures from trail.compare.summarize, plus TTFT quantiles, time per output token and
time between tokens), its plot, and the comparison of several runs on the same workload with
`trail.compare.compare` (ratios to fcfs, paired-bootstrap intervals, the oracle's gain), written
also as a cell of bench/serve.py's serve.json so `python bench/serve.py merge` tables and plots
runs over several loads. A trail server's own counters (preemptions by mode, recomputed tokens,
the probe's online error) come from its /metrics, scraped before and after a run.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from trail.jsonio import write_json

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_prometheus(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text page (comments skipped)."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    return out


def _server_delta(before: dict, after: dict) -> dict | None:
    """What a trail server counted during the run (None for another server)."""
    if "trail_up" not in after:
        return None
    d = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    modes = {m: int(d(f'trail_preemptions_total{{mode="{m}"}}')) for m in ("keep", "swap", "recompute")}
    return {**modes, "recomputed_tokens": int(d("trail_recomputed_tokens_total")),
            "online_prediction_mae": after.get("trail_probe_online_mae_tokens", math.nan),
            "aborted": int(d('trail_requests_finished_total{reason="abort"}'))}


def _q(values, p: float) -> float:
    return float(np.percentile(values, p)) if len(values) else math.nan


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def summarize(records: list[dict], makespan: float, server: dict | None) -> dict:
    ok = [r for r in records if r["error"] is None]
    lat = np.array([r["latency_s"] for r in ok], float)
    ttft = np.array([r["ttft_s"] for r in ok], float)
    tpot = np.array([(r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1])
    itl = np.array([x for r in ok for x in r["itl_s"]], float)
    tokens = int(sum(r["output_tokens"] for r in ok))
    server = server or {}
    return {"requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
            "mean_latency_s": _mean(lat), "p50_latency_s": _q(lat, 50), "p99_latency_s": _q(lat, 99),
            "mean_ttft_s": _mean(ttft), "p50_ttft_s": _q(ttft, 50), "p99_ttft_s": _q(ttft, 99),
            "mean_tpot_s": _mean(tpot), "p99_tpot_s": _q(tpot, 99), "p50_itl_s": _q(itl, 50), "p99_itl_s": _q(itl, 99),
            "output_tokens": tokens, "makespan_s": makespan, "throughput_tok_s": tokens / makespan if makespan else 0.0,
            "request_throughput": len(ok) / makespan if makespan else 0.0,
            "max_lag_s": max((r["lag_s"] for r in records), default=0.0),
            "preemptions": sum(server.get(m, 0) for m in ("keep", "swap", "recompute")),
            "swaps": server.get("swap", 0), "recomputed_tokens": server.get("recomputed_tokens", 0),
            "prediction_mae": server.get("online_prediction_mae", math.nan),
            "errors": dict(Counter(r["error"] for r in records if r["error"] is not None).most_common(3))}


def run_result(records, makespan, before, after, *, label, model, url, workload) -> dict:
    server = _server_delta(before, after)
    return {"format": "trail-bench-serve", "version": 1, "label": label, "model": model, "url": url,
            "workload": workload, "makespan_s": makespan, "server": server,
            "summary": summarize(records, makespan, server), "records": records}


def _arrivals(w: dict) -> str:
    return ("burst" if w["rate"] is None else f"{w['rate']:g} req/s") + (", forced lengths" if w["force_lengths"] else "")


def _num(value, fmt: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, fmt)


def run_summary(result: dict) -> str:
    s, w = result["summary"], result["workload"]
    ms = lambda v: "n/a" if v is None or math.isnan(v) else f"{1e3 * v:.1f}"  # noqa: E731
    lines = [f"{result['label']}: {s['requests']} requests ({_arrivals(w)}) to {result['url']}: {s['completed']} completed, "
             f"{s['failed']} failed, {s['makespan_s']:.2f} s",
             f"  latency   mean {ms(s['mean_latency_s'])} ms, p50 {ms(s['p50_latency_s'])}, p99 {ms(s['p99_latency_s'])}",
             f"  TTFT      mean {ms(s['mean_ttft_s'])} ms, p50 {ms(s['p50_ttft_s'])}, p99 {ms(s['p99_ttft_s'])}",
             f"  TPOT      mean {ms(s['mean_tpot_s'])} ms, p99 {ms(s['p99_tpot_s'])}; between chunks p50 "
             f"{ms(s['p50_itl_s'])} ms, p99 {ms(s['p99_itl_s'])}",
             f"  throughput {s['throughput_tok_s']:.1f} tok/s, {s['request_throughput']:.2f} req/s; client lag at most "
             f"{ms(s['max_lag_s'])} ms"]
    srv = result.get("server")
    if srv:
        lines.append(f"  server: preemptions keep {srv['keep']} / swap {srv['swap']} / recompute {srv['recompute']}, "
                     f"recomputed tokens {srv['recomputed_tokens']}, probe online MAE "
                     f"{_num(srv['online_prediction_mae'], '.1f')} tokens")
    for err, n in s["errors"].items():
        lines.append(f"  error x{n}: {err[:200]}")
    return "\n".join(lines) + "\n"


def write_run(result: dict, text: str, out: str | Path) -> None:
    out = Path(out)
    write_json(out / "bench_serve.json", result, indent=1)
    (out / "bench_serve.summary.txt").write_text(text)
    plot({result["label"]: result}, out / "bench_serve.png")


def _pairable(results: list[dict]) -> None:
    keys = ("trace", "n", "seed", "rate", "burst", "force_lengths", "max_tokens", "endpoint", "ids")
    first = results[0]["workload"]
    for r in results[1:]:
        for k in keys:
            if r["workload"].get(k) != first.get(k):
                raise ValueError(f"runs {results[0]['label']!r} and {r['label']!r} differ in {k} "
                                 f"({first.get(k)!r:.60} vs {r['workload'].get(k)!r:.60}): requests do not pair")
    for r in results:
        if r["summary"]["failed"]:
            raise ValueError(f"run {r['label']!r} has {r['summary']['failed']} failed requests: requests do not pair")


def compare_runs(results: list[dict], out: str | Path | None = None) -> str:
    """The comparison table of runs of the same workload (trail.compare.compare); with `out`,
    compare.json, serve.json (bench/serve.py's format: one cell) and compare.png."""
    from trail.compare import compare

    _pairable(results)
    labels, runs = [], {}
    for r in results:
        label = r["label"]
        while label in labels:
            label += "'"
        labels.append(label)
        s, srv = r["summary"], r.get("server") or {}
        runs[label] = {"latency": np.array([x["latency_s"] for x in r["records"]]),
                       "ttft": np.array([x["ttft_s"] for x in r["records"]]), "tokens": s["output_tokens"],
                       "makespan_s": s["makespan_s"], "throughput_tok_s": s["throughput_tok_s"],
                       "preemptions": s["preemptions"],
                       "telemetry": {"swap": srv.get("swap", 0), "recomputed_tokens": srv.get("recomputed_tokens", 0),
                                     "online_prediction_mae": srv.get("online_prediction_mae", math.nan)}}
    cmp = compare(runs)
    text = _table(cmp)
    if out is not None:
        out = Path(out)
        w = results[0]["workload"]
        write_json(out / "compare.json", {"workload": w, **cmp}, indent=1)
        cell = {"regime": "http", "load": "burst" if w["rate"] is None else f"{w['rate']:g}", "seed": w["seed"],
                "rate_req_s": w["rate"], "request_ids": w["ids"],
                "policies": {k: {**cmp["policies"][k], "latency_s": runs[k]["latency"], "ttft_s": runs[k]["ttft"],
                                 "makespan_s": runs[k]["makespan_s"]} for k in labels}}
        write_json(out / "serve.json", {"device": "http", "model": results[0]["model"], "predictions": "server",
                                        "num_requests": w["n"], "pool": len(set(w["ids"])), "max_batch": None,
                                        "skipped": [], "policies": labels, "cells": [cell]}, indent=1)
        (out / "compare.summary.txt").write_text(text)
        plot(dict(zip(labels, results)), out / "compare.png")
    return text


def _table(cmp: dict) -> str:
    lines = [f"{'run':<14}{'mean lat':>10}{'p50':>9}{'p99':>9}{'TTFT':>9}{'tok/s':>9}{'preempt':>8}{'vs fcfs':>9}  "
             f"{'95% CI':<16}{'oracle gain':>11}"]
    for name, s in cmp["policies"].items():
        ci, frac, ratio = s.get("latency_ratio_ci95"), s.get("oracle_gain_fraction"), s.get("latency_ratio_to_fcfs")
        lines.append(f"{name:<14}{s['mean_latency_s']:>9.3f}s{s['p50_latency_s']:>8.3f}s{s['p99_latency_s']:>8.3f}s"
                     f"{s['mean_ttft_s']:>8.3f}s{s['throughput_tok_s']:>9.1f}{s['preemptions']:>8}"
                     f"{'-' if ratio is None else f'{ratio:.2f}x':>9}  "
                     f"{'' if ci is None else f'[{ci[0]:.2f}, {ci[1]:.2f}]':<16}"
                     f"{'' if frac is None else f'{100 * frac:.0f}%':>11}")
    if "fcfs" not in cmp["policies"]:
        lines.append("(ratios to fcfs and their 95% intervals need a run labelled fcfs)")
    elif cmp["oracle_gain"] is None:
        lines.append("(the oracle's gain needs a run labelled oracle)")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    """Latency, TTFT and time-per-output-token CDFs, one line per run, and the mean / p99 bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for label, r in results.items():
        ok = [x for x in r["records"] if x["error"] is None]
        series = ([x["latency_s"] for x in ok], [x["ttft_s"] for x in ok],
                  [(x["latency_s"] - x["ttft_s"]) / (x["output_tokens"] - 1) for x in ok if x["output_tokens"] > 1])
        for ax, values in zip(axes[:3], series):
            if values:
                v = np.sort(values)
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    for ax, title in zip(axes[:3], ("latency (s)", "TTFT (s)", "time per output token (s)")):
        ax.set_title(f"CDF of {title}")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    names = list(results)
    x = np.arange(len(names))
    axes[3].bar(x - 0.2, [results[n]["summary"]["mean_latency_s"] for n in names], 0.4, label="mean")
    axes[3].bar(x + 0.2, [results[n]["summary"]["p99_latency_s"] for n in names], 0.4, label="p99")
    axes[3].set_xticks(x, names, rotation=20, fontsize=8)
    axes[3].set_title("latency (s)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    w = next(iter(results.values()))["workload"]
    fig.suptitle(f"bench-serve: {w['n']} requests, {_arrivals(w)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
