"""Paired per-request comparison of the new and shipped probes on the same 145 test requests, from
the recorded-predictions npz files in predictor_results.tar.gz (extract first):

    python analysis.py /tmp/gr   ->  prints tables (markdown) and writes analysis.json next to this file
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from trail.predictor.ranking import spearman


def signflip_p(diff, B=20000, seed=1):
    """Two-sided paired randomization test (random sign flips) of mean(diff) = 0."""
    rng = np.random.default_rng(seed)
    obs = abs(diff.mean())
    s = rng.choice([-1.0, 1.0], size=(B, len(diff)))
    return float(((np.abs((s * diff).mean(1)) >= obs - 1e-12).sum() + 1) / (B + 1))


def per_request(npz):
    d = np.load(npz)
    cu, L, p = d["cu"], d["output_len"], d["pred"].astype(np.float64)
    mae = np.array([np.abs(p[cu[i]:cu[i + 1]] - (L[i] - np.arange(L[i]))).mean() for i in range(len(L))])
    return d, mae


def boot_ci(diff, B=20000, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(B, len(diff)))
    m = diff[idx].mean(1)
    return float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5)), float((m >= 0).mean())


def main(root):
    root = Path(root)
    dn, mn = per_request(root / "recorded_test_new.npz")
    ds, ms = per_request(root / "recorded_test_shipped.npz")
    assert (dn["ids"] == ds["ids"]).all() and (dn["output_len"] == ds["output_len"]).all()
    ids = dn["ids"]
    sg = np.char.startswith(ids, "sharegpt")
    eos = ~dn["hit_cap"]
    groups = {"all": np.ones(len(ids), bool), "sharegpt": sg, "alpaca": ~sg, "all, eos only": eos,
              "sharegpt, eos only": sg & eos, "alpaca, eos only": ~sg & eos}
    out = {"mae": {}, "admission": {}}
    print("| requests | n | new MAE | shipped MAE | new - shipped | 95% CI (paired bootstrap) | new better on | sign-flip p |")
    print("|---|---|---|---|---|---|---|---|")
    for g, m in groups.items():
        diff = mn[m] - ms[m]
        lo, hi, p_ge0 = boot_ci(diff)
        w = signflip_p(diff)
        win = float((diff < 0).mean())
        out["mae"][g] = {"n": int(m.sum()), "new": float(mn[m].mean()), "shipped": float(ms[m].mean()),
                         "diff": float(diff.mean()), "ci95": [lo, hi], "boot_frac_diff_ge_0": p_ge0,
                         "new_better_fraction": win, "signflip_p": float(w)}
        print(f"| {g} | {m.sum()} | {mn[m].mean():.2f} | {ms[m].mean():.2f} | {diff.mean():+.2f} | "
              f"[{lo:+.2f}, {hi:+.2f}] | {100 * win:.0f}% | {w:.3f} |")
    # admission ranking of the recorded prompt-time prediction (the one the simulator orders by) and of
    # the g = 0 filter readout, vs the true total; with a bootstrap CI for the paired spearman difference
    print()
    print("| requests | n | spearman new boe | shipped boe | new filter@g0 | shipped filter@g0 |")
    print("|---|---|---|---|---|---|")
    L = dn["output_len"]
    for g in ("all", "sharegpt", "alpaca"):
        m = groups[g]
        r = {}
        for name, d in (("new", dn), ("shipped", ds)):
            r[f"{name}_boe"] = spearman(d["prompt_pred"][m], L[m])
            g0 = d["pred"][d["cu"][:-1]].astype(np.float64)  # predicted remaining right after prefill
            r[f"{name}_g0"] = spearman(g0[m], L[m])
        out["admission"][g] = {k: float(v) for k, v in r.items()}
        print(f"| {g} | {m.sum()} | {r['new_boe']:.3f} | {r['shipped_boe']:.3f} | {r['new_g0']:.3f} | {r['shipped_g0']:.3f} |")
    (Path(__file__).parent / "analysis.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gr")
