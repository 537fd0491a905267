"""KV block swap GPU <-> pinned host (csrc/kv_swap/, trail.kv_cache) on the GPU.

    python bench/suite/kernels_kv_swap.py --out DIR     -> DIR/kv_swap.json, DIR/kv_swap.summary.txt

Measured in one run:
  - the PCIe ceiling: one 1 GiB copy between a pinned host buffer (extension-allocated, the same
    kind as the swap space) and device memory, each direction;
  - swap out (GPU -> host) and in (host -> GPU) of 1 GiB of scattered blocks (random blocks of a
    2 GiB pool to random host blocks: nothing coalesces) at 2 MiB (Llama-3-8B), 360 KiB
    (SmolLM2-135M, bf16) and 128 KiB blocks, by every method: batch (cudaMemcpyBatchAsync),
    memcpy (one cudaMemcpyAsync per block, from C++), kernel (copy kernel over mapped pinned
    memory, 32 and 128 CTAs), and the baseline of one `copy_` per block from Python; GB/s as a
    fraction of the ceiling, and the host time spent issuing the copies;
  - the overlap cost: the time of a compute-stream workload alone and while a swap of 2 MiB
    blocks runs on the copy stream, per method and direction. The workload is a STAND-IN for a
    decode step: the linear layers of Llama-3-8B (32 layers, bf16 weights, 64 tokens), not the
    model forward;
  - the swap latency of one 1,000-token Llama-3-8B request (63 blocks of 2 MiB) out and in.
Times are CUDA-event times on the stream that ran the work, medians of several repetitions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import trail  # noqa: E402
from trail.kv_cache_spec import KVCacheSpec  # noqa: E402
from trail.kv_swap import swap_blocks  # noqa: E402

DEVICE = "cuda"
GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
SIZES = {  # name -> spec with that many bytes per block (bf16, 16 tokens per block)
    "2MiB": KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16),
    "360KiB": KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16),
    "128KiB": KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16),
}
METHODS = [("batch", 0), ("memcpy", 0), ("kernel", 32), ("kernel", 128)]


def label(method: str, ctas: int) -> str:
    return f"kernel/{ctas}" if method == "kernel" else method


def timed(stream: torch.cuda.Stream, fn, reps: int) -> dict:
    """Median GPU time (events on `stream`) and host issue time of fn, after one warm-up."""
    gpu, host = [], []
    for r in range(reps + 1):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            fn()
        t1 = time.perf_counter()
        end.record(stream)
        end.synchronize()
        if r:
            gpu.append(start.elapsed_time(end))
            host.append((t1 - t0) * 1e3)
    return {"ms": statistics.median(gpu), "issue_ms": statistics.median(host),
            "ms_all": gpu}


class Buffers:
    """One device region and one pinned host region, viewed as pools of any block size."""

    def __init__(self, host_bytes: int, device_bytes: int):
        self.host = trail.ops.kv_host_alloc(host_bytes, True)
        self.dev = torch.empty(device_bytes, dtype=torch.uint8, device=DEVICE)
        self.dev.random_(0, 256)
        self.host.copy_(self.dev[:host_bytes])  # touch every host page once

    def views(self, spec: KVCacheSpec, n_host: int, n_dev: int):
        per = spec.bytes_per_block
        host = self.host[:n_host * per].view(spec.dtype).view(n_host, *spec.block_shape)
        dev = self.dev[:n_dev * per].view(spec.dtype).view(n_dev, *spec.block_shape)
        return dev, host


def ceiling(buf: Buffers, nbytes: int, stream, reps: int) -> dict:
    host, dev = buf.host[:nbytes], buf.dev[:nbytes]
    out = timed(stream, lambda: host.copy_(dev, non_blocking=True), reps)
    inn = timed(stream, lambda: dev.copy_(host, non_blocking=True), reps)
    return {"bytes": nbytes,
            "out_GBps": nbytes / out["ms"] / 1e6, "in_GBps": nbytes / inn["ms"] / 1e6,
            "out": out, "in": inn}


def scattered_pairs(n: int, n_dev: int, n_host: int, gen) -> list[tuple[int, int]]:
    dev = torch.randperm(n_dev, generator=gen)[:n].tolist()
    host = torch.randperm(n_host, generator=gen)[:n].tolist()
    return list(zip(dev, host))


def throughput(buf: Buffers, spec: KVCacheSpec, total: int, ceil: dict, stream, reps: int, gen):
    per = spec.bytes_per_block
    n = total // per
    dev, host = buf.views(spec, n, 2 * n)
    out_pairs = scattered_pairs(n, 2 * n, n, gen)
    in_pairs = [(h, d) for d, h in scattered_pairs(n, 2 * n, n, gen)]
    nbytes = n * per
    rows = []
    methods = [(m, c) for m, c in METHODS if m in trail.ops.kv_swap_methods()]
    for direction, src, dst, pairs in (("out", dev, host, out_pairs), ("in", host, dev, in_pairs)):
        pairs_t = torch.tensor(pairs, dtype=torch.int64)
        for method, ctas in methods:
            r = timed(stream, lambda: swap_blocks(src, dst, pairs_t, stream, method, ctas), reps)
            rows.append({"block": per, "direction": direction, "method": label(method, ctas),
                         "blocks": n, "bytes": nbytes, **r})
        # baseline: one copy_ per block, issued from Python
        r = timed(stream, lambda: [dst[d].copy_(src[s], non_blocking=True) for s, d in pairs], reps)
        rows.append({"block": per, "direction": direction, "method": "python copy_ per block",
                     "blocks": n, "bytes": nbytes, **r})
    for row in rows:
        row["GBps"] = row["bytes"] / row["ms"] / 1e6
        row["of_ceiling"] = row["GBps"] / ceil[f"{row['direction']}_GBps"]
    for row in rows:
        base = next(r for r in rows if r["direction"] == row["direction"]
                    and r["method"] == "python copy_ per block")
        row["x_python"] = base["ms"] / row["ms"]
    return rows


class StandIn:
    """NOT the model forward: the linear layers of a Llama-3-8B decode step (32 layers of
    qkv / o / gate+up / down GEMMs, bf16, 64 tokens), ~14 GiB of weights read per step."""

    LAYERS, TOKENS, D, FF, QKV = 32, 64, 4096, 14336, 6144

    def __init__(self):
        shapes = [(self.D, self.QKV), (self.D, self.D), (self.D, 2 * self.FF), (self.FF, self.D)]
        self.weights = [[torch.empty(s, dtype=torch.bfloat16, device=DEVICE).normal_(0, 0.02)
                         for s in shapes] for _ in range(self.LAYERS)]
        self.x = torch.randn(self.TOKENS, self.D, dtype=torch.bfloat16, device=DEVICE)

    def step(self):
        x = self.x
        for wqkv, wo, wgu, wd in self.weights:
            q = x @ wqkv
            x = x + q[:, :self.D] @ wo
            g, u = (x @ wgu).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(g) * u) @ wd
        return x


def step_times(model: StandIn, steps: int) -> tuple[list[float], torch.cuda.Event, torch.cuda.Event]:
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        model.step()
        events[i + 1].record()
    events[-1].synchronize()
    return [events[i].elapsed_time(events[i + 1]) for i in range(steps)], events[0], events[-1]


def overlap(buf: Buffers, model: StandIn, stream, gen, total: int, rows: list[dict],
            steps: int = 12) -> dict:
    spec = SIZES["2MiB"]
    n = total // spec.bytes_per_block
    dev, host = buf.views(spec, n, 2 * n)
    pairs = {"out": torch.tensor(scattered_pairs(n, 2 * n, n, gen), dtype=torch.int64)}
    pairs["in"] = pairs["out"].flip(1).contiguous()
    for _ in range(3):
        model.step()
    torch.cuda.synchronize()
    alone, _, _ = step_times(model, steps)
    result = {"stand_in": "STAND-IN, not the model forward: Llama-3-8B linear layers (32 layers, "
                          "bf16, 64 tokens, ~14 GiB of weights per step)",
              "alone_ms": statistics.median(alone), "alone_all": alone, "runs": []}
    methods = [(m, c) for m, c in METHODS if m in trail.ops.kv_swap_methods()]
    for method, ctas in methods:
        for direction in ("out", "in"):
            src, dst = (dev, host) if direction == "out" else (host, dev)
            torch.cuda.synchronize()
            # enough copies queued to outlast the steps (call time measured above, same size)
            call_ms = next(r["ms"] for r in rows if r["block"] == spec.bytes_per_block
                           and r["direction"] == direction and r["method"] == label(method, ctas))
            # a generous margin; `swap_covered_all_steps` below reports whether it sufficed
            repeats = max(4, int(steps * result["alone_ms"] * 4 / call_ms) + 1)
            c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            c0.record(stream)
            for _ in range(repeats):
                swap_blocks(src, dst, pairs[direction], stream, method, ctas)
            c1.record(stream)
            times, s0, s1 = step_times(model, steps)
            torch.cuda.synchronize()
            copy_ms = c0.elapsed_time(c1)
            covered = c0.elapsed_time(c1) >= c0.elapsed_time(s1)   # the swap outlasted the steps
            med = statistics.median(times)
            result["runs"].append({
                "method": label(method, ctas), "direction": direction, "step_ms": med,
                "slowdown": med / result["alone_ms"] - 1, "steps_all": times,
                "swap_GBps_during": repeats * n * spec.bytes_per_block / copy_ms / 1e6,
                "swap_covered_all_steps": bool(covered)})
    return result


def latency(buf: Buffers, stream, gen, reps: int) -> dict:
    spec = SIZES["2MiB"]
    tokens = 1000
    n = -(-tokens // spec.block_size)  # 63 blocks
    n_host = min(4 * n, buf.host.numel() // spec.bytes_per_block)
    n_dev = min(8 * n, buf.dev.numel() // spec.bytes_per_block)
    dev, host = buf.views(spec, n_host, n_dev)
    out_pairs = torch.tensor(scattered_pairs(n, n_dev, n_host, gen), dtype=torch.int64)
    in_pairs = torch.tensor([(h, d) for d, h in scattered_pairs(n, n_dev, n_host, gen)],
                            dtype=torch.int64)
    rows = []
    for method, ctas in [(m, c) for m, c in METHODS if m in trail.ops.kv_swap_methods()]:
        for direction, src, dst, pairs in (("out", dev, host, out_pairs), ("in", host, dev, in_pairs)):
            r = timed(stream, lambda: swap_blocks(src, dst, pairs, stream, method, ctas), reps)
            rows.append({"method": label(method, ctas), "direction": direction, **r})
    return {"tokens": tokens, "blocks": n, "bytes": n * spec.bytes_per_block,
            "bytes_per_token": spec.bytes_per_token, "rows": rows}


def summary(res: dict) -> str:
    c = res["ceiling"]
    lines = [f"kv_swap on {res['device']} ({res['versions']})",
             f"PCIe ceiling, one {c['bytes'] // MiB} MiB pinned copy: out (D2H) {c['out_GBps']:.1f} GB/s,"
             f" in (H2D) {c['in_GBps']:.1f} GB/s",
             f"scattered blocks, {res['total_bytes'] // MiB} MiB per swap:",
             f"{'block':>8} {'dir':>3} {'method':<24} {'GB/s':>6} {'ceil':>5} {'x py':>6} {'issue ms':>8}"]
    for r in res["throughput"]:
        lines.append(f"{r['block'] // KiB:>6}Ki {r['direction']:>3} {r['method']:<24} {r['GBps']:>6.1f} "
                     f"{r['of_ceiling']:>5.0%} {r['x_python']:>6.1f} {r['issue_ms']:>8.2f}")
    goal = []
    for size in ("2MiB", "360KiB"):
        per = SIZES[size].bytes_per_block
        for d in ("out", "in"):
            best = max((r for r in res["throughput"] if r["block"] == per and r["direction"] == d
                        and r["method"] != "python copy_ per block"), key=lambda r: r["GBps"])
            goal.append(best["of_ceiling"] >= 0.9)
            lines.append(f"goal >= 90% of ceiling, {size} {d}: best {best['method']} "
                         f"{best['of_ceiling']:.0%} -> {'MET' if goal[-1] else 'NOT MET'}")
    o = res["overlap"]
    lines.append(f"overlap ({o['stand_in']})")
    lines.append(f"  step alone {o['alone_ms']:.2f} ms")
    for r in o["runs"]:
        flag = "" if r["swap_covered_all_steps"] else " (swap ended before the steps: underestimates)"
        lines.append(f"  swap {r['direction']:>3} {r['method']:<10} step {r['step_ms']:.2f} ms "
                     f"{r['slowdown']:+.1%}  swap {r['swap_GBps_during']:.1f} GB/s{flag}  "
                     f"goal < 5%: {'MET' if r['slowdown'] < 0.05 else 'NOT MET'}")
    lat = res["latency"]
    lines.append(f"one {lat['tokens']}-token Llama-3-8B request ({lat['blocks']} x 2 MiB = "
                 f"{lat['bytes'] / MiB:.0f} MiB, {lat['bytes_per_token'] // KiB} KiB/token):")
    for r in lat["rows"]:
        lines.append(f"  {r['direction']:>3} {r['method']:<10} {r['ms']:.2f} ms "
                     f"({r['ms'] * 1e3 / lat['tokens']:.2f} us/token, issue {r['issue_ms']:.2f} ms)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--total-mib", type=int, default=1024, help="bytes per measured swap")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-overlap", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_kv_swap: needs a CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    total = args.total_mib * MiB
    gen = torch.Generator().manual_seed(0)
    info = trail.native_info()
    res = {"device": torch.cuda.get_device_name(),
           "versions": f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, "
                       f"trail._C {info['build']} {info.get('cuda_version', '')}",
           "native_info": info, "methods": trail.ops.kv_swap_methods(), "total_bytes": total}
    buf = Buffers(host_bytes=total + 4 * MiB, device_bytes=2 * total + 8 * MiB)
    stream = torch.cuda.Stream()
    res["ceiling"] = ceiling(buf, total, stream, args.reps)
    print(f"ceiling: out {res['ceiling']['out_GBps']:.1f} in {res['ceiling']['in_GBps']:.1f} GB/s", flush=True)
    res["throughput"] = []
    for name, spec in SIZES.items():
        res["throughput"] += throughput(buf, spec, total, res["ceiling"], stream, args.reps, gen)
        print(f"{name} done ({time.time() - t_start:.0f} s)", flush=True)
    res["latency"] = latency(buf, stream, gen, reps=10)
    if args.skip_overlap:
        res["overlap"] = {"stand_in": "skipped", "alone_ms": float("nan"), "runs": []}
    else:
        model = StandIn()
        res["overlap"] = overlap(buf, model, stream, gen, total, res["throughput"])
        del model
    res["seconds"] = time.time() - t_start
    with open(os.path.join(args.out, "kv_swap.json"), "w") as f:
        json.dump(res, f, indent=1)
    text = summary(res)
    with open(os.path.join(args.out, "kv_swap.summary.txt"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
