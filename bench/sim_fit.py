"""Fits the simulator's step-time model (trail.sim.StepTimeModel) and writes
python/trail/data/sim/step_fit.json (package data: trail.sim.default_step_model reads it) with the
data, the constants and the residuals.

Until the fast-step benchmark exists the fit uses the figures in DESIGN.md "Measured facts" for a
Llama-3-8B-shaped decode on an H100 (bf16, ctx 512):
  - per_ctx_token_s: slope of the HBM floor (weights + KV read at 3.01 TB/s) over sum(context);
  - base_s, per_decode_s: least squares on the gpt-fast (torch.compile) step times at B = 1, 16, 64
    after subtracting per_ctx_token_s * sum(context) (3 points, 2 constants: 1 degree of freedom);
  - per_prefill_token_s: 30 us, the middle of DESIGN.md's 25-35 us per recomputed token (no
    prefill step was timed).
The measured steps of our own forward with the torch reference attention
(bench/results/h100_2026-11-25/forward.json, 69-91 ms and flat in B) are CPU-bound and are
reported beside the fit, not used.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

if not __package__:      # run as `python bench/sim_fit.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PACKAGE_SIM_DATA, ROOT  # noqa: E402

OUT = PACKAGE_SIM_DATA / "step_fit.json"
FORWARD = ROOT / "bench" / "results" / "h100_2026-11-25" / "forward.json"     # a committed summary


def main() -> None:
    ctx = 512
    B = np.array([1, 16, 64], dtype=float)
    floor_ms = np.array([5.36, 5.69, 6.76])
    gptfast_ms = np.array([7.13, 10.69, 22.18])
    ctx_sum = B * ctx
    f1, f0 = np.polyfit(ctx_sum, floor_ms, 1)
    per_ctx_ms = f1
    y = gptfast_ms - per_ctx_ms * ctx_sum
    X = np.stack([np.ones_like(B), B], 1)
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    fit = a + b * B + per_ctx_ms * ctx_sum
    model = {"base_s": a / 1e3, "per_decode_s": b / 1e3, "per_prefill_token_s": 30e-6,
             "per_ctx_token_s": per_ctx_ms / 1e3, "pcie_gbps": 25.0,
             "source": "fit to DESIGN.md Llama-3-8B H100 figures (gpt-fast decode, HBM floor); "
                       "prefill 30 us/token from DESIGN.md's recompute range (not timed)"}
    fwd = json.loads(FORWARD.read_text()) if FORWARD.is_file() else {}
    ours = {k: v["step_ms"] for k, v in fwd.get("llama3_8b", {}).items()}
    res = {"model": model,
           "data": {"batch": B.tolist(), "ctx": ctx, "gptfast_step_ms": gptfast_ms.tolist(),
                    "hbm_floor_ms": floor_ms.tolist()},
           "fit_ms": fit.round(4).tolist(), "residual_ms": (gptfast_ms - fit).round(4).tolist(),
           "floor_fit": {"intercept_ms": f0, "per_ctx_token_ms": f1,
                         "residual_ms": (floor_ms - (f0 + f1 * ctx_sum)).round(4).tolist()},
           "not_used_our_forward_torch_reference_attention_step_ms": ours}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
