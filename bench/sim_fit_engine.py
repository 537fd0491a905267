"""Fits the simulator's step-time model (trail.sim.StepTimeModel) to THIS engine's measured steps,
per model shape, from the engine-step benchmark's summary (bench/suite/model_engine_step.py ->
bench/results/engine_step/summary.json: every row timed to completion), and writes one fit per
shape as package data: python/trail/data/sim/step_fit_engine_<model>.json (use with
`trail sim --step-fit`). The default fit (step_fit.json, gpt-fast on the 8B shape) is unchanged.

The overlapped loop's rows (the engine's default), with ctx_sum as the simulator counts it
(sum over rows of context + tokens):
  decode  B rows at mean context c:      base + per_decode * B + per_ctx * B * (c + 1)
          (least squares over batches 1..256 at both contexts: 8 rows, 3 constants);
  mixed   47 decodes + one 256-token prompt, and prefill 8 x 512 tokens: the decode part from
          the fit plus per_prefill_token * tokens + mixed_base (2 rows, 2 constants, exact;
          mixed_per_row is not identifiable from these rows and stays 0).
Residuals are written beside the constants. This is a fit to a benchmark of steady shapes, not
yet validated against serving runs (issue 25 item 4 asks for that, on the device).

    python bench/sim_fit_engine.py [--summary bench/results/engine_step/summary.json]

`--serve RUN_DIR ...` fits instead from serving runs' own per-step telemetry (bench/serve.py's
serve_steps.npz) and writes step_fit_serve_<model>.json: the fit the serving verdict validates the
simulator with (issue 25 item 4). It differs most from the benchmark fit in steps with a prompt:
the benchmark timed them eager (mixed_base ~9 ms on the 8B shape) while the engine now replays
mixed-step CUDA graphs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if not __package__:      # run as `python bench/sim_fit_engine.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PACKAGE_SIM_DATA, ROOT  # noqa: E402

SUMMARY = ROOT / "bench" / "results" / "engine_step" / "summary.json"


def _mean_context(label: str, steps: int) -> float:
    """'60..100' -> 80; '69.. + 256' (a mixed row: decodes from 69 over `steps` steps) -> 89."""
    lo, _, hi = label.split("+")[0].strip().partition("..")
    hi = hi.strip()
    return (float(lo) + float(hi)) / 2 if hi else float(lo) + steps / 2


def fit(rows: list[dict]) -> dict:
    """Constants (seconds) and residuals (ms) from one model's overlapped rows."""
    dec = [r for r in rows if r["kind"] == "decode"]
    B = np.array([r["batch"] for r in dec], float)
    ctx = np.array([B_i * (_mean_context(r["context"], r["steps"]) + 1) for B_i, r in zip(B, dec)])
    t = np.array([r["step_ms"] for r in dec])
    A = np.stack([np.ones_like(B), B, ctx], 1)
    (base, per_dec, per_ctx), *_ = np.linalg.lstsq(A, t, rcond=None)
    mixed = next(r for r in rows if r["kind"] == "mixed")
    prefill = next(r for r in rows if r["kind"] == "prefill")
    chunk = int(mixed["context"].split("+")[1])
    n, length = 8, int(prefill["context"].split("..")[1])       # prefill rows: 'N prompts of L', 0..L
    md = mixed["batch"]
    mixed_rest = mixed["step_ms"] - (base + per_dec * md + per_ctx * (md * (_mean_context(mixed["context"],
                                                                                             mixed["steps"]) + 1) + chunk))
    prefill_rest = prefill["step_ms"] - (base + per_ctx * n * length)
    # mixed_rest = per_tok * chunk + mixed_base ; prefill_rest = per_tok * n * length + mixed_base
    per_tok = (prefill_rest - mixed_rest) / (n * length - chunk)
    mixed_base = mixed_rest - per_tok * chunk
    pred = A @ np.array([base, per_dec, per_ctx])
    return {"model": {"base_s": base / 1e3, "per_decode_s": per_dec / 1e3, "per_prefill_token_s": per_tok / 1e3,
                      "per_ctx_token_s": per_ctx / 1e3, "mixed_base_s": mixed_base / 1e3, "mixed_per_row_s": 0.0},
            "decode_rows": [{"batch": int(b), "ctx_sum": int(c), "step_ms": round(float(y), 4),
                             "fit_ms": round(float(p), 4), "residual_pct": round(float(100 * (p - y) / y), 2)}
                            for b, c, y, p in zip(B, ctx, t, pred)]}


def fit_serving(run_dirs: list[Path]) -> tuple[str, dict]:
    """(model shape, fit) from serving runs' per-step telemetry (bench/serve.py's serve_steps.npz:
    every step of every run, saturation and capacity probes included), through
    bench/sim_vs_real.fit_step_model: the steps the simulator replaces, as served."""
    from bench.sim_vs_real import fit_step_model

    runs = [json.loads((d / "serve.json").read_text()) for d in run_dirs]
    shapes = {str(r["model"]).removeprefix("random:") for r in runs}
    if len(shapes) != 1:
        raise SystemExit(f"--serve: runs of one model shape, got {sorted(shapes)}")
    steps, fields = [], None
    for d in run_dirs:
        z = np.load(d / "serve_steps.npz")
        fields = [str(x) for x in z["fields"]]
        steps += [z[k] for k in z.files if k.startswith("steps/")]
    steps = np.concatenate(steps)
    devices = sorted({r["device"] for r in runs})
    source = (f"this engine, {shapes.pop()} shape, per-step telemetry of serving runs on {', '.join(devices)} "
              f"({len(steps)} steps of {', '.join(d.name for d in run_dirs)}; bench/sim_fit_engine.py --serve)")
    model = fit_step_model(steps, fields, source=source)
    shape = str(runs[0]["model"]).removeprefix("random:")
    floor = prefill_flop_floor_s(shape)
    return shape, {"model": dict(model.__dict__), "steps": int(len(steps)), "prefill_flop_floor_s_per_token": floor,
                   "note": "regression constants of served steps, to be read together: where per_prefill_token_s is near or "
                           "below the FLOP floor (prefill_flop_floor_s_per_token), mixed_per_row_s carries part of a prompt's cost (rows and prompt "
                           "tokens rise together in served steps), not a prefill faster than the hardware"}


def prefill_flop_floor_s(shape: str, peak_flops: float = 989e12) -> float:
    """Seconds per prompt token at the H100's dense bf16 peak: 2 FLOPs per weight of the layers
    (attention projections + MLP; the LM head runs for the last token only), attention scores aside."""
    from trail.models.config import preset

    c = preset(shape)
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return 2.0 * c.num_layers * (attn + mlp) / peak_flops


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--summary", type=Path, default=SUMMARY)
    ap.add_argument("--serve", type=Path, nargs="+", default=None,
                    help="serving run folders (serve.json + serve_steps.npz): fit step_fit_serve_<model>.json instead")
    ap.add_argument("--out-dir", type=Path, default=PACKAGE_SIM_DATA)
    args = ap.parse_args(argv)
    if args.serve:
        shape, result = fit_serving(args.serve)
        path = args.out_dir / f"step_fit_serve_{shape}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{shape}: {path.name}; " + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in result["model"].items()
                                                    if k.endswith("_s")))
        return [path]
    data = json.loads(args.summary.read_text())
    written = []
    for model in sorted({r["model"] for r in data["summary"]}):
        rows = [r for r in data["summary"] if r["model"] == model and r["loop"] == "overlapped"]
        result = fit(rows)
        result["model"].update(pcie_gbps=25.0, source=f"this engine, {model} shape, overlapped loop, {data['device']} "
                                                      f"(the engine-step benchmark's summary; bench/sim_fit_engine.py)")
        path = args.out_dir / f"step_fit_engine_{model}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        written.append(path)
        worst = max(abs(r["residual_pct"]) for r in result["decode_rows"])
        print(f"{model}: {path.name}; decode fit worst residual {worst:.1f}%; "
              + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in result["model"].items() if k.endswith("_s")))
    return written


if __name__ == "__main__":
    main()
