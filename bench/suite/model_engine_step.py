"""The trail engine's step on the GPU (issues 11, 14, 23), every figure timed to completion and set
beside its physical limit. Random bf16 weights of a real model's shape (timing only), a length
probe of the shipped size (h=512, K=10), CUDA graphs (the engine's default).

Rows, per model shape x loop (serial: `EngineConfig(overlap=False)`; overlapped: the default, the
CPU prepares step n+1 while the GPU runs step n):
  decode   `batch` requests decoding, context `ctx..ctx+steps` tokens, batches 1..256;
  mixed    `batch` decodes + one `chunk`-token prompt prefilled in the same step;
  prefill  N prompts of L tokens prefilled in one step (8 x 512 by default).
Timing: a steady-state loop of `steps` engine steps between two device syncs, divided by the step
count (`LLMEngine.step()` of the overlapped loop returns before the device finishes, so a wall
clock around one call times only its launch). The loop's steps are checked in `engine.telemetry`
to be exactly the steps meant (rows, tokens, prefill tokens). host ms: the engine's CPU time per
step outside the sync wait (median; with overlap not on the critical path); gpu ms: CUDA events
around the step's device work (median).

Limits (H100 SXM spec; an H200 is held to its own 4.8e12 B/s): the floor of a step is the larger of
  HBM:   bytes (weights + the KV read: every cached token of every row once) / 3.35e12 B/s, and
  FLOPs: (2 * matmul params * tokens + 2 * vocab * hidden * sampled rows + attention FLOPs)
         / 989e12 (bf16 dense peak);
decode rows are HBM-bound, prefill rows FLOP-bound. pct_of_limit = 100 * floor / step: a row above
100 % is a measurement error (limit_ok false and a logged warning). The HBM floor is also given at
the device-to-device copy rate measured in this run (3.01e12 on an H100 when last measured; that
constant off CUDA).

    python bench/suite/model_engine_step.py --out DIR [--quick] [--no-8b]
    python bench/suite/model_engine_step.py --out DIR --device cpu --models tiny --batches 1,2 \\
        --contexts 8 --steps 3 --mixed-batch 2 --mixed-chunk 8 --prefill 2x16 --no-phases   # smoke run
Writes DIR/summary.json (per model, kind, batch, context and loop: step_ms, host_ms, gpu_ms,
floor_ms, pct_of_limit, limit_ok, ...), DIR/engine_step.json (also the profiled phase split) and
DIR/engine_step.summary.txt.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models import preset, random_model
from trail.request import SamplingParams
from trail.telemetry import STEP_FIELDS
from trail_kernels.probe_params import ProbeParams

logger = logging.getLogger("model_engine_step")

HBM_BYTES_PER_S = 3.35e12          # H100 SXM HBM3, spec
HBM_MEASURED_BYTES_PER_S = 3.01e12  # H100 SXM, device-to-device copy, measured earlier (used off CUDA)
BF16_DENSE_FLOPS = 989e12          # H100 SXM bf16 dense tensor-core peak
# (HBM B/s, bf16 dense FLOP/s) by device name; anything else (CPU smoke runs too) is held to the H100's
SPECS = {"H200": (4.8e12, 989e12), "H100": (HBM_BYTES_PER_S, BF16_DENSE_FLOPS)}
PROBE_LAYER = {"smollm2-135m": 19, "llama3-8b": 11}
F = {n: i for i, n in enumerate(STEP_FIELDS)}


# ---- physical limits -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the limits need of a model: weight bytes read per step, matmul params per token, the
    LM head, attention and KV sizes."""
    weight_bytes: float
    matmul_params: int        # per token, the layers' linear weights
    head_params: int          # vocab x hidden, per sampled row
    layers: int
    q_dim: int                # heads x head_dim
    kv_bytes_per_token: float

    @classmethod
    def of(cls, cfg, elt: int) -> "Shape":
        d, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # every weight once, but of the (untied) embedding table only the rows looked up
        weights = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * d)
        return cls(weights * elt, cfg.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * f), cfg.vocab_size * d,
                   cfg.num_layers, q, cfg.num_layers * 2 * kv * elt)


def step_limits(shape: Shape, rows: list[tuple[int, int, bool]]) -> tuple[float, float]:
    """(bytes, FLOPs) at least moved / done by one step of `rows` (context before the step, new
    tokens, samples a token). Attention: each new token at position p attends to p + 1 keys
    (2 matmuls of 2 FLOPs per key and q dim); each row reads its whole KV once."""
    tokens = sum(n for _, n, _ in rows)
    sampled = sum(1 for _, _, s in rows if s)
    keys = sum(n * c + n * (n + 1) // 2 for c, n, _ in rows)
    flops = 2 * shape.matmul_params * tokens + 2 * shape.head_params * sampled + 4 * shape.layers * shape.q_dim * keys
    kv_read = sum(c + n for c, n, _ in rows) * shape.kv_bytes_per_token
    return shape.weight_bytes + kv_read, float(flops)


def limit_fields(shape: Shape, rows_at_start: list, rows_at_end: list, step_ms: float, copy_rate: float,
                 hbm_bytes_per_s: float = HBM_BYTES_PER_S, peak_flops: float = BF16_DENSE_FLOPS) -> dict:
    """The floor of the loop's average step (limits at its first and last step averaged; the
    context grows by one token per decode step) against the measured step time."""
    b0, f0 = step_limits(shape, rows_at_start)
    b1, f1 = step_limits(shape, rows_at_end)
    nbytes, flops = (b0 + b1) / 2, (f0 + f1) / 2
    hbm_ms, flops_ms = 1e3 * nbytes / hbm_bytes_per_s, 1e3 * flops / peak_flops
    floor = max(hbm_ms, flops_ms)
    measured_ms = 1e3 * nbytes / copy_rate
    return {"floor_ms": floor, "bound": "hbm" if hbm_ms >= flops_ms else "flops",
            "pct_of_limit": 100.0 * floor / step_ms, "limit_ok": bool(floor <= step_ms),
            "hbm_floor_ms": hbm_ms, "hbm_floor_measured_bw_ms": measured_ms,
            "pct_of_measured_bw_floor": 100.0 * measured_ms / step_ms, "flops_floor_ms": flops_ms,
            "bytes_per_step": nbytes, "flops_per_step": flops}


def flag(row: dict) -> dict:
    """Logs a warning for a row faster than its physical limit allows (limit_ok false)."""
    if not row["limit_ok"]:
        logger.warning("%s %s %s batch %d ctx %s: %.3f ms is %.0f %% of its physical limit (floor %.3f ms, %s-bound): "
                       "a measurement error", row["model"], row["kind"], row["loop"], row["batch"], row["context"],
                       row["step_ms"], row["pct_of_limit"], row["floor_ms"], row["bound"])
    return row


def copy_rate(device: torch.device) -> float:
    """Device-to-device copy rate (bytes read + written per second), median of 5 x 10 copies of
    1 GiB; HBM_MEASURED_BYTES_PER_S off CUDA."""
    if device.type != "cuda":
        return HBM_MEASURED_BYTES_PER_S
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            dst.copy_(src)
        b.record()
        b.synchronize()
        rates.append(2 * 10 * src.numel() / (a.elapsed_time(b) / 1e3))
    del src, dst
    torch.cuda.empty_cache()
    return statistics.median(rates)


# ---- the runs --------------------------------------------------------------------------------------
class Bench:
    """One engine (model shape x loop) through every row of the sweep; requests are drained
    (aborted) between rows."""

    def __init__(self, model, name: str, overlap: bool, args, profile_batch: int | None = None):
        """profile_batch: an engine for the phase split of decode steps at that batch only
        (profile_phases on; no mixed-step graphs captured)."""
        self.model, self.name, self.overlap, self.args = model, name, overlap, args
        self.device = next(model.parameters()).device
        cfg = model.config
        self.V = cfg.vocab_size
        self.max_batch = profile_batch or max(max(args.batches), args.mixed_batch + 2, args.prefill[0] * 2)
        n_pre, len_pre = args.prefill
        self.tokens_per_step = max(2048, n_pre * len_pre + self.max_batch + 64)
        self.max_len = max(max(args.contexts) + self.decode_tokens(self.max_batch, max(args.contexts)),
                           len_pre + 8, 64 + args.steps + 16)
        blocks = self.max_batch * -(-self.max_len // 16) + 64
        layer = PROBE_LAYER.get(name, cfg.num_layers // 2)
        probe = ProbeParams.random(cfg.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        self.engine = LLMEngine(model, None, EngineConfig(
            policy="trail", max_batch=self.max_batch, max_slots=self.max_batch + 64, max_model_len=self.max_len,
            max_tokens_per_step=self.tokens_per_step, num_gpu_blocks=blocks,
            prefill_tokens_per_s=1e5, overlap=overlap, enforce_eager=args.eager,
            cuda_graph_tokens=() if profile_batch else None),
            probe=probe, probe_layer=layer, profile_phases=profile_batch is not None)
        self.start_s = time.perf_counter() - t0
        self.gen = torch.Generator().manual_seed(0)
        self.ids: list[int] = []
        self.shape = Shape.of(cfg, next(model.parameters()).element_size())

    def decode_tokens(self, batch: int, prompt_len: int) -> int:
        """Output tokens a decode row's requests need: the prompts are prefilled over several
        steps (the first ones decode meanwhile), then warm-up, timed and two more steps."""
        a = self.args
        return -(-batch * prompt_len // self.tokens_per_step) + a.warm + a.steps + 8

    @property
    def loop(self) -> str:
        return "overlapped" if self.overlap else "serial"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, prompt_len: int, new_tokens: int) -> None:
        ids = torch.randint(0, self.V, (prompt_len,), generator=self.gen).tolist()
        self.ids.append(self.engine.add_request(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))

    def drain(self) -> None:
        for rid in self.ids:
            self.engine.abort(rid)
        self.ids = []
        while self.engine.has_unfinished():
            self.engine.step()

    def _last_index(self) -> int:
        steps = self.engine.telemetry.steps
        return steps[-1][F["step"]] if steps else -1

    def _timed(self, steps: int, before_step=None) -> tuple[float, list[tuple], list[float]]:
        """`steps` engine steps between two syncs -> (ms per step, their telemetry rows, per-call
        wall ms). With overlap one more step is in flight than telemetry shows."""
        first = self._last_index() + 1 + (1 if self.overlap else 0)
        walls = []
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            if before_step is not None:
                before_step()
            t = time.perf_counter()
            self.engine.step()
            walls.append(1e3 * (time.perf_counter() - t))
        self.sync()
        ms = 1e3 * (time.perf_counter() - t0) / steps
        return ms, first, walls

    def _rows(self, first: int, steps: int) -> list[tuple]:
        """The telemetry rows of steps first..first+steps-1 (two more engine steps are run first, so
        every one of them is recorded with its device time)."""
        for _ in range(2):
            self.engine.step()
        rows = [r for r in self.engine.telemetry.steps if first <= r[F["step"]] < first + steps]
        if len(rows) != steps:
            raise RuntimeError(f"{self.name} {self.loop}: {len(rows)} telemetry rows for the {steps} timed steps")
        return rows

    def _row(self, kind: str, batch: int, context: str, ms: float, rows: list[tuple], walls: list[float],
             limits_start: list, limits_end: list, tokens: int, **extra) -> dict:
        host = [r[F["host_s"]] for r in rows]
        dev = [r[F["device_s"]] for r in rows if not math.isnan(r[F["device_s"]])]
        out = {"model": self.name, "kind": kind, "batch": batch, "context": context, "loop": self.loop,
               "graphs": not self.args.eager, "step_ms": ms, "host_ms": 1e3 * statistics.median(host),
               "gpu_ms": 1e3 * statistics.median(dev) if dev else None, "call_ms_median": statistics.median(walls),
               "steps": len(rows), "tokens_per_s": tokens / (ms / 1e3), **extra}
        out.update(limit_fields(self.shape, limits_start, limits_end, ms, self.args.copy_rate, *self.args.spec))
        return flag(out)

    def _check(self, recorded: list[tuple], what: str, **want) -> None:
        for r in recorded:
            got = {k: r[F[k]] for k in want}
            if got != want:
                raise RuntimeError(f"{self.name} {self.loop} {what}: a timed step was {got}, not {want}")

    def _until_decoding(self, batch: int) -> None:
        """Steps until a recorded step decodes all `batch` requests (their prompts prefilled)."""
        steps = self.engine.telemetry.steps
        n0 = len(steps)
        for _ in range(10_000):
            self.engine.step()
            if len(steps) > n0 and steps[-1][F["rows"]] == batch and steps[-1][F["prefill_tokens"]] == 0:
                return
        raise RuntimeError(f"{self.name} {self.loop}: {batch} requests never all decoded")

    def decode(self, batch: int, prompt_len: int) -> dict:
        """`batch` requests prefilled, then `steps` decode steps timed."""
        a = self.args
        for _ in range(batch):
            self.add(prompt_len, self.decode_tokens(batch, prompt_len))
        self._until_decoding(batch)
        for _ in range(a.warm):
            self.engine.step()
        # tokens cached per request before the first timed step (one more step in flight with overlap;
        # the requests prefilled first have more: the floor stays a lower bound)
        ctx0 = prompt_len + 1 + a.warm + (1 if self.overlap else 0)
        ms, first, walls = self._timed(a.steps)
        rows = self._rows(first, a.steps)
        self._check(rows, "decode", rows=batch, tokens=batch, prefill_tokens=0)
        self.drain()
        return self._row("decode", batch, f"{ctx0}..{ctx0 + a.steps}", ms, rows, walls,
                         [(ctx0, 1, True)] * batch, [(ctx0 + a.steps - 1, 1, True)] * batch, batch)

    def mixed(self, batch: int, chunk: int) -> dict:
        """`batch` requests decoding at context 64+; each timed step also prefills one new `chunk`-
        token prompt (one output token, so it is done by the next step)."""
        a = self.args
        for _ in range(batch):
            self.add(64, a.steps + 16)
        self._until_decoding(batch)
        for _ in range(3):                # the pattern settles (with overlap the first new prompt
            self.add(chunk, 1)            # meets no finishing request yet)
            self.engine.step()
        ms, first, walls = self._timed(a.steps, before_step=lambda: self.add(chunk, 1))
        rows = self._rows(first, a.steps)
        self._check(rows, "mixed", tokens=batch + chunk, prefill_tokens=chunk, decode_rows=batch)
        self.drain()
        ctx = 64 + 1 + 3 + (1 if self.overlap else 0)
        return self._row("mixed", batch, f"{ctx}.. + {chunk}", ms, rows, walls,
                         [(ctx, 1, True)] * batch + [(0, chunk, True)],
                         [(ctx + a.steps, 1, True)] * batch + [(0, chunk, True)], batch + chunk, chunk=chunk)

    def prefill(self, n: int, length: int) -> dict:
        """Steps that each prefill `n` new prompts of `length` tokens (one output token each)."""
        a = self.args
        add = lambda: [self.add(length, 1) for _ in range(n)]    # noqa: E731
        for _ in range(2):
            add()
            self.engine.step()
        steps = max(3, a.steps // 4)
        ms, first, walls = self._timed(steps, before_step=add)
        rows = self._rows(first, steps)
        self._check(rows, "prefill", tokens=n * length, prefill_tokens=n * length)
        self.drain()
        return self._row("prefill", n, f"0..{length}", ms, rows, walls, [(0, length, True)] * n,
                         [(0, length, True)] * n, n * length, prompts=n, prompt_len=length)

    def phases(self, batch: int, prompt_len: int) -> dict:
        """Median per-phase ms of decode steps (host: CPU time; device: CUDA events), profiled."""
        self.decode(batch, prompt_len)
        ph = [p for p in self.engine.telemetry.phases if p["rows"] == batch and p["tokens"] == batch][2:]
        keys = sorted({k for p in ph for k in p if k.endswith("_s")})
        return {"model": self.name, "batch": batch, "context": prompt_len, "loop": self.loop,
                "median_phase_ms": {k: 1e3 * statistics.median(p[k] for p in ph if k in p) for k in keys}}

    def close(self) -> None:
        del self.engine
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sweep(model, name: str, args, log) -> list[dict]:
    out = []
    for overlap in args.loops:
        b = Bench(model, name, overlap, args)
        logger.info("%s %s: engine up in %.1f s (max_batch %d)", name, b.loop, b.start_s, b.max_batch)
        for ctx in args.contexts:
            for batch in args.batches:
                out.append(log(b.decode(batch, ctx)))
        out.append(log(b.mixed(args.mixed_batch, args.mixed_chunk)))
        out.append(log(b.prefill(*args.prefill)))
        b.close()
    return out


# ---- output ----------------------------------------------------------------------------------------
SUMMARY_KEYS = ("model", "kind", "batch", "context", "loop", "graphs", "step_ms", "host_ms", "gpu_ms", "floor_ms",
                "pct_of_limit", "limit_ok", "bound", "hbm_floor_ms", "hbm_floor_measured_bw_ms",
                "pct_of_measured_bw_floor", "flops_floor_ms", "tokens_per_s", "steps")


def summary_lines(result: dict) -> list[str]:
    lim = result["limits"]
    lines = [f"engine step (trail + probe, random weights), {result['device']}; every row timed to completion "
             f"(steps between two syncs / steps)",
             f"floor = max(HBM bytes / {lim['hbm_bytes_per_s']:.3g} B/s, FLOPs / {lim['peak_flops']:.3g}); "
             f"HBM floor also at the copy rate measured now ({lim['measured_copy_bytes_per_s']:.3g} B/s)",
             "model          kind     loop        batch context        step ms  host ms   gpu ms  floor ms  %limit"
             "  %meas.bw  tok/s     ok"]
    for r in result["summary"]:
        gpu = r["gpu_ms"] if r["gpu_ms"] is not None else float("nan")
        lines.append(f"{r['model']:<14} {r['kind']:<8} {r['loop']:<11} {r['batch']:>5} {r['context']:<14}"
                     f" {r['step_ms']:7.3f}  {r['host_ms']:7.3f}  {gpu:7.3f}  {r['floor_ms']:8.3f}"
                     f"  {r['pct_of_limit']:5.1f}%  {r['pct_of_measured_bw_floor']:6.1f}%  {r['tokens_per_s']:9.0f}"
                     f"  {'' if r['limit_ok'] else 'ABOVE LIMIT: measurement error'}")
    for p in result["phases"]:
        lines.append(f"phases, {p['model']} batch {p['batch']} ctx {p['context']} {p['loop']} (median ms):")
        lines += [f"  {k:<28} {v:8.3f}" for k, v in p["median_phase_ms"].items()]
    return lines


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shape, batches 1 and 64, context 50 only")
    ap.add_argument("--no-8b", action="store_true", help="no Llama-3-8B shape")
    ap.add_argument("--models", default=None, help="comma-separated presets (default smollm2-135m,llama3-8b)")
    ap.add_argument("--batches", type=_ints, default=[1, 16, 64, 256])
    ap.add_argument("--contexts", type=_ints, default=[50, 500], help="prompt lengths; decode runs from there")
    ap.add_argument("--loops", default="serial,overlapped")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per decode / mixed row")
    ap.add_argument("--warm", type=int, default=8, help="decode steps before the timed ones")
    ap.add_argument("--mixed-batch", type=int, default=47)
    ap.add_argument("--mixed-chunk", type=int, default=256)
    ap.add_argument("--prefill", default="8x512", help="NxL: N prompts of L tokens per step")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (EngineConfig.enforce_eager)")
    ap.add_argument("--no-phases", action="store_true", help="skip the profiled phase split")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    models = args.models.split(",") if args.models else ["smollm2-135m"] + ([] if args.no_8b else ["llama3-8b"])
    if args.quick:
        models, args.batches, args.contexts = ["smollm2-135m"], [1, 64], [50]
    args.loops = [{"serial": False, "overlapped": True}[x] for x in args.loops.split(",")]
    n, length = args.prefill.lower().split("x")
    args.prefill = (int(n), int(length))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.copy_rate = copy_rate(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.spec = next((v for k, v in SPECS.items() if k in device_name), SPECS["H100"])
    results, phases = [], []

    def log(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        (out / "engine_step.partial.json").write_text(json.dumps(results, indent=1))
        return r

    for name in models:
        model = random_model(preset(name), device=device, dtype=dtype, seed=0)
        sweep(model, name, args, log)
        if not args.no_phases and name == models[0]:
            batch = 64 if 64 in args.batches else args.batches[-1]
            b = Bench(model, name, False, args, profile_batch=batch)
            phases.append(b.phases(batch, args.contexts[0]))
            b.close()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": device_name, "torch": torch.__version__,
              "limits": {"hbm_bytes_per_s": args.spec[0], "peak_flops": args.spec[1],
                         "measured_copy_bytes_per_s": args.copy_rate,
                         "copy_rate_source": "measured" if device.type == "cuda" else "constant (H100, earlier)"},
              "summary": [{k: r.get(k) for k in SUMMARY_KEYS} for r in results],
              "results": results, "phases": phases}
    bad = [r for r in results if not r["limit_ok"]]
    result["limits_ok"] = not bad
    (out / "summary.json").write_text(json.dumps({k: result[k] for k in ("device", "torch", "limits", "limits_ok",
                                                                         "summary")}, indent=1))
    (out / "engine_step.json").write_text(json.dumps(result, indent=1))
    (out / "engine_step.partial.json").unlink(missing_ok=True)
    lines = summary_lines(result)
    if bad:
        lines.append(f"WARNING: {len(bad)} row(s) above their physical limit: measurement errors")
    (out / "engine_step.summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
