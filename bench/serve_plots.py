"""Plots of the serving verdict (bench/serve_summary.py): latency vs load (ratio to fcfs per
policy, one panel per model and regime, the burst beside it), the latency CDF of each cell
(pooled over seeds) and time between tokens (p99 of the gaps and of each request's longest stall)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, axes_with_legend, path: Path) -> Path:
    """Legend on the first panel, tight layout, written at 110 dpi, closed."""
    plt = _plt()
    axes_with_legend.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    return sorted({(r["model"], r["regime"]) for r in rows})


def latency_vs_load(rows: Sequence[Mapping], out: Path) -> Path:
    plt = _plt()
    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (model, regime) in zip(axes[0], panels):
        mine = [r for r in rows if r["model"] == model and r["regime"] == regime]
        loads = sorted({r["load"] for r in mine}, key=lambda l: (l == "burst", float(l) if l != "burst" else 0.0))
        x = {l: i for i, l in enumerate(loads)}
        for name in dict.fromkeys(r["policy"] for r in mine):
            pts = [r for r in mine if r["policy"] == name]
            xs = [x[r["load"]] for r in pts]
            ys = [r["latency_ratio_to_fcfs"] for r in pts]
            err = np.array([[y - r.get("latency_ratio_ci95", [y, y])[0], r.get("latency_ratio_ci95", [y, y])[1] - y]
                            for y, r in zip(ys, pts)]).T
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(loads)), [l if l == "burst" else f"{l}x" for l in loads])
        ax.set_xlabel("load (x sustained saturation) or burst")
        ax.set_ylabel("mean latency / fcfs (95% interval)")
        ax.set_title(f"{Path(str(model)).name}, {regime}", fontsize=10)
    return _save(fig, axes[0][0], out / "latency_vs_load.png")


def latency_cdf(runs: Sequence[Mapping], out: Path) -> Path:
    plt = _plt()
    cells: dict = {}
    for run in runs:
        for c in run["cells"]:
            for name, p in c["policies"].items():
                cells.setdefault((run["model"], c["regime"], c["load"]), {}).setdefault(name, []).extend(p["latency_s"])
    keys = sorted(cells, key=str)
    cols = min(3, len(keys)) or 1
    rows_n = -(-len(keys) // cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 3.8 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, lat in cells[key].items():
            v = np.sort(np.asarray(lat))
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=name, lw=1.2)
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{Path(str(key[0])).name}, {key[1]}, {key[2]}", fontsize=10)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _save(fig, axes[0][0], out / "latency_cdf.png")


def time_between_tokens(rows: Sequence[Mapping], out: Path) -> Path:
    plt = _plt()
    labels = [f"{r['regime']} {r['load']}" for r in rows if r["policy"] == "fcfs"]
    names = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        for ax, key, scale in ((axes[0], "tbt_p99_s", 1e3), (axes[1], "stall_p99_s", 1.0)):
            vals = [next((r[key] for r in rows if r["policy"] == name and f"{r['regime']} {r['load']}" == lab), None)
                    for lab in labels]
            ax.bar(np.arange(len(labels)) + k * width, [0 if v is None else v * scale for v in vals], width, label=name)
    axes[0].set_ylabel("time between tokens, p99 (ms)")
    axes[1].set_ylabel("each request's longest stall, p99 (s)")
    for ax in axes:
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    return _save(fig, axes[0], out / "time_between_tokens.png")


def plot_all(runs: Sequence[Mapping], rows: Sequence[Mapping], out: Path) -> list[Path]:
    if not rows:
        return []
    return [latency_vs_load(rows, out), latency_cdf(runs, out), time_between_tokens(rows, out)]
