"""Plots of the predictor pipeline (matplotlib, Agg): MAE vs layer, MAE vs tokens generated."""
from __future__ import annotations

import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mae_vs_layer(maes: dict[int, float], path: str | os.PathLike, title: str = "") -> None:
    plt = _plt()
    layers = sorted(maes)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(layers, [maes[k] for k in layers], marker="o")
    best = min(layers, key=lambda k: maes[k])
    ax.axvline(best, color="gray", ls=":", label=f"chosen: layer {best}")
    ax.set_xlabel("layer (output of decoder layer i, before the final norm)")
    ax.set_ylabel("validation MAE of remaining length")
    ax.set_title(title or "probe MAE vs layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mae_vs_generated(curves: dict[str, list[float]], bucket: int, path: str | os.PathLike,
                     title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        xs = [i * bucket for i in range(len(ys))]
        ax.plot(xs, ys, label=name, lw=2 if "(vi)" in name else 1, marker="." if len(ys) < 40 else None)
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("MAE of remaining length")
    ax.set_title(title or "remaining-length MAE vs tokens generated")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
