"""Paged attention kernels (trail_kernels/paged_attention_triton.py) on the GPU.

    python bench/suite/kernels_attention.py --out DIR   -> DIR/attention.json, DIR/attention.summary.txt

Measured in one run (medians of triton.testing.do_bench, L2 flushed before each call, warmups):
  - the device copy bandwidth: bytes read + written per second by a 1 GiB device-to-device copy;
  - decode attention through the public `paged_decode` (auto split-K) at batch 1/16/64/256 x
    context 512/2k/8k, for the Llama-3-8B head shape (32 q heads, 8 kv heads, d 128) and
    SmolLM2-135M (9 q, 3 kv, d 64), bf16, blocks of each request scattered over a two-layer pool:
    achieved bandwidth = bytes of K/V read + q read + o written, over the time, against the copy
    bandwidth; beside it torch SDPA (flash backend where it takes the shapes, enable_gqa) on the
    same data gathered dense [B, kv_heads, ctx, d] (the gather not timed), and split-K off;
  - a small sweep of decode tile configs and of the split count at a few points;
  - the decode launch captured in a CUDA graph (replay time vs eager launch);
  - prefill: a fresh prompt batch and chunks over a cached prefix, TFLOP/s (causal FLOPs) against
    SDPA flash (causal; `causal_lower_right` for the prefix case) on dense copies;
  - the KV write: bytes written + read per second at 256 and 8192 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from trail_kernels import paged_attention_triton as K  # noqa: E402
from trail_kernels.paged_attention import (paged_attention, paged_decode,  # noqa: E402
                                           paged_decode_reference, write_kv)

BS = 16
SHAPES = {"llama3_8b": (32, 8, 128), "smollm2_135m": (9, 3, 64)}
BATCHES = (1, 16, 64, 256)
CONTEXTS = (512, 2048, 8192)
DTYPE = torch.bfloat16
DEV = "cuda"


def bench_ms(fn, rep=60) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, quantiles=[0.5])


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=200, quantiles=[0.5])
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms * 1e-3)


class PagedBatch:
    """B requests of `ctx` tokens each, blocks scattered randomly in a 2-layer pool (layer 1 used)."""

    def __init__(self, gen, heads, kvh, hd, batch, ctx, q_len=1, prefix=None):
        self.heads, self.kvh, self.hd, self.batch, self.ctx = heads, kvh, hd, batch, ctx
        nb_req = -(-ctx // BS)
        num_blocks = batch * nb_req + 8
        self.pool = torch.empty((num_blocks, 2, 2, kvh, BS, hd), dtype=DTYPE, device=DEV)
        self.pool.normal_(generator=None)
        self.layer = self.pool[:, 1]
        perm = torch.randperm(num_blocks, device=DEV)[: batch * nb_req]
        self.tables = perm.to(torch.int32).view(batch, nb_req).contiguous()
        self.slots = torch.arange(batch, dtype=torch.int32, device=DEV)
        self.ctx_t = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        self.q_len = q_len
        self.q = torch.randn(batch * q_len, heads, hd, device=DEV, dtype=DTYPE)
        self.cu = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * q_len
        self.scale = hd ** -0.5

    def dense_kv(self):
        """[B, kvh, ctx, d] copies of K and V (for SDPA)."""
        kv = self.layer[self.tables.long()]                       # [B, nb, 2, kvh, BS, d]
        kv = kv.permute(0, 2, 3, 1, 4, 5).reshape(self.batch, 2, self.kvh, -1, self.hd)[:, :, :, : self.ctx]
        return kv[:, 0].contiguous(), kv[:, 1].contiguous()

    def decode(self, **kw):
        if kw:
            return lambda: K.paged_decode_triton(self.q, self.layer, self.tables, self.slots, self.ctx_t,
                                                 self.ctx, self.scale, **kw)
        return lambda: paged_decode(self.q, self.layer, self.tables, self.slots, self.ctx_t, self.ctx, self.scale)

    def decode_bytes(self):
        esz = self.pool.element_size()
        return (2 * self.batch * self.ctx * self.kvh * self.hd + 2 * self.batch * self.heads * self.hd) * esz


def sdpa_call(q, k, v, **kw):
    """(callable, backend name) for the first SDPA backend that takes these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        def fn(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        try:
            fn()
            torch.cuda.synchronize()
            return fn, backend.name
        except Exception:  # this backend does not take the shape / mask
            continue
    return None, None


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def bench_decode(gen, bw, results, log):
    for name, (heads, kvh, hd) in SHAPES.items():
        for batch in BATCHES:
            for ctx in CONTEXTS:
                case = PagedBatch(gen, heads, kvh, hd, batch, ctx)
                splits = K.decode_splits(batch, kvh, ctx, case.q.device)
                ms = bench_ms(case.decode())
                ms_nosplit = bench_ms(case.decode(num_splits=1)) if splits > 1 else ms
                nbytes = case.decode_bytes()
                row = dict(shape=name, heads=heads, kv_heads=kvh, head_dim=hd, batch=batch, context=ctx,
                           splits=splits, triton_us=ms * 1e3, triton_nosplit_us=ms_nosplit * 1e3,
                           bytes=nbytes, achieved_Bps=nbytes / (ms * 1e-3),
                           fraction_of_copy_bw=nbytes / (ms * 1e-3) / bw, floor_us=nbytes / bw * 1e6)
                out = case.decode()()
                try:    # the same call inside a CUDA graph (no launch overhead)
                    gout = torch.empty_like(case.q)
                    step = case.decode()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        gout.copy_(step())
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        gout.copy_(step())
                    row["graph_us"] = bench_ms(graph.replay) * 1e3
                    row["graph_fraction_of_copy_bw"] = nbytes / (row["graph_us"] * 1e-6) / bw
                    del graph
                except Exception as exc:
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
                kd, vd = case.dense_kv()
                qd = case.q.view(batch, 1, heads, hd).transpose(1, 2)
                fn, backend = sdpa_call(qd, kd, vd)
                if fn is not None:
                    row.update(sdpa_backend=backend, sdpa_us=bench_ms(fn) * 1e3)
                    row["speedup_vs_sdpa"] = row["sdpa_us"] / row["triton_us"]
                    row["max_rel_err_vs_sdpa"] = rel_err(out, fn().transpose(1, 2).reshape(batch, heads, hd))
                del kd, vd, case
                torch.cuda.empty_cache()
                results["decode"].append(row)
                log(f"decode {name} B={batch} ctx={ctx}: {row['triton_us']:.1f} us (split {splits}, "
                    f"nosplit {row['triton_nosplit_us']:.1f}), {row['fraction_of_copy_bw']:.0%} of copy bw, "
                    f"sdpa[{row.get('sdpa_backend')}] {row.get('sdpa_us', float('nan')):.1f} us")


def bench_reference(gen, results, log):
    for name, (heads, kvh, hd) in SHAPES.items():
        case = PagedBatch(gen, heads, kvh, hd, 16, 512)
        ref = lambda: paged_decode_reference(case.q, case.layer, case.tables, case.slots, case.ctx_t,  # noqa: E731
                                             case.ctx, case.scale)
        row = dict(shape=name, batch=16, context=512, reference_us=bench_ms(ref) * 1e3,
                   triton_us=bench_ms(case.decode()) * 1e3)
        row["speedup"] = row["reference_us"] / row["triton_us"]
        results["reference"].append(row)
        log(f"reference {name} B=16 ctx=512: {row['reference_us']:.0f} us vs triton {row['triton_us']:.1f} us")


DECODE_SWEEP = [dict(BLOCK_N=n, num_warps=w, num_stages=s)
                for n, w, s in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3),
                                (64, 2, 3), (32, 2, 4), (128, 4, 2), (256, 8, 2)]]


def sweep_decode(gen, results, log):
    points = [("llama3_8b", 1, 8192), ("llama3_8b", 64, 2048), ("llama3_8b", 256, 8192),
              ("smollm2_135m", 64, 2048), ("smollm2_135m", 256, 8192)]
    for name, batch, ctx in points:
        heads, kvh, hd = SHAPES[name]
        case = PagedBatch(gen, heads, kvh, hd, batch, ctx)
        auto = K.decode_splits(batch, kvh, ctx, case.q.device)
        rows = []
        for cfg in DECODE_SWEEP:
            try:
                rows.append(dict(config=cfg, us=bench_ms(case.decode(num_splits=auto, config=cfg), rep=30) * 1e3))
            except Exception as exc:
                rows.append(dict(config=cfg, error=f"{type(exc).__name__}: {exc}"[:200]))
        split_rows = []
        if batch <= 64:
            for ns in (1, 2, 4, 8, 16, 32, 64):
                split_rows.append(dict(splits=ns, us=bench_ms(case.decode(num_splits=ns), rep=30) * 1e3))
        ok = [r for r in rows if "us" in r]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        results["decode_sweep"].append(dict(shape=name, batch=batch, context=ctx, auto_splits=auto,
                                            default_config=K.decode_config(hd, DTYPE), configs=rows,
                                            splits=split_rows, best=best, bytes=case.decode_bytes()))
        log(f"sweep {name} B={batch} ctx={ctx}: best {best}; splits {[(r['splits'], round(r['us'], 1)) for r in split_rows]}")
        del case
        torch.cuda.empty_cache()


def bench_graph(gen, results, log):
    for name, batch, ctx in (("llama3_8b", 64, 2048), ("smollm2_135m", 64, 2048), ("llama3_8b", 1, 512)):
        heads, kvh, hd = SHAPES[name]
        case = PagedBatch(gen, heads, kvh, hd, batch, ctx)
        out = torch.empty_like(case.q)
        step = lambda: out.copy_(case.decode()())  # noqa: E731
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        # do_bench flushes L2 before every call in both
        eager = triton.testing.do_bench(step, warmup=10, rep=60, quantiles=[0.5])
        replay = triton.testing.do_bench(g.replay, warmup=10, rep=60, quantiles=[0.5])
        results["graph"].append(dict(shape=name, batch=batch, context=ctx, eager_us=eager * 1e3,
                                     graph_replay_us=replay * 1e3))
        log(f"graph {name} B={batch} ctx={ctx}: eager {eager * 1e3:.1f} us, replay {replay * 1e3:.1f} us")
        del g, case
        torch.cuda.empty_cache()


def bench_overhead(gen, results, log):
    """Where eager time goes: the public path vs the launcher, measured twice in turn, split counts
    around the heuristic's pick, and the host time of one call (no sync)."""
    for name, batch, ctx in (("llama3_8b", 1, 8192), ("llama3_8b", 16, 512), ("smollm2_135m", 64, 2048),
                             ("llama3_8b", 1, 512)):
        heads, kvh, hd = SHAPES[name]
        case = PagedBatch(gen, heads, kvh, hd, batch, ctx)
        auto = K.decode_splits(batch, kvh, ctx, case.q.device)
        row = dict(shape=name, batch=batch, context=ctx, auto_splits=auto)
        row["public_us"] = bench_ms(case.decode()) * 1e3
        row["launcher_us"] = bench_ms(case.decode(num_splits=auto)) * 1e3
        row["public_again_us"] = bench_ms(case.decode()) * 1e3
        row["by_splits_us"] = {ns: bench_ms(case.decode(num_splits=ns), rep=30) * 1e3
                               for ns in sorted({1, 2, max(1, auto // 2), auto, auto + 1, 2 * auto})}
        fn = case.decode()
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(100):
            fn()
        row["host_us_per_call"] = (time.perf_counter() - t) / 100 * 1e6
        torch.cuda.synchronize()
        results["overhead"].append(row)
        log(f"overhead {row}")
        del case
        torch.cuda.empty_cache()


def causal_flops(segs, heads, hd):
    """2 matmuls x 2 FLOPs per (q, k) pair attended: q at prefix + j attends prefix + j + 1 keys."""
    pairs = sum(n * p + n * (n + 1) // 2 for p, n in segs)
    return 4 * heads * hd * pairs


PREFILL_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                 for m, n, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                                    (64, 32, 4, 4), (128, 32, 4, 3), (64, 128, 4, 2)]]


def bench_prefill(gen, results, log):
    for name, (heads, kvh, hd) in SHAPES.items():
        for label, batch, prefix, new in (("prompt", 4, 0, 2048), ("prompt", 16, 0, 512),
                                          ("chunk_over_prefix", 4, 4096, 512)):
            ctx = prefix + new
            case = PagedBatch(gen, heads, kvh, hd, batch, ctx, q_len=new)
            ctx_t = case.ctx_t

            def run(config=None):
                if config is None:
                    return paged_attention(case.q, case.layer, case.tables, case.slots, case.cu, ctx_t, new, ctx,
                                           case.scale)
                return K.paged_attention_triton(case.q, case.layer, case.tables, case.slots, case.cu, ctx_t, new,
                                                ctx, case.scale, config=config)
            ms = bench_ms(run)
            flops = causal_flops([(prefix, new)] * batch, heads, hd)
            row = dict(shape=name, case=label, batch=batch, prefix=prefix, new_tokens=new, triton_us=ms * 1e3,
                       triton_TFLOPs=flops / (ms * 1e-3) / 1e12, default_config=K.prefill_config(hd, DTYPE))
            kd, vd = case.dense_kv()
            qd = case.q.view(batch, new, heads, hd).transpose(1, 2)
            if prefix == 0:
                fn, backend = sdpa_call(qd, kd, vd, is_causal=True)
            else:
                from torch.nn.attention.bias import causal_lower_right
                fn, backend = sdpa_call(qd, kd, vd, attn_mask=causal_lower_right(new, ctx))
            if fn is not None:
                sd = bench_ms(fn)
                row.update(sdpa_backend=backend, sdpa_us=sd * 1e3, sdpa_TFLOPs=flops / (sd * 1e-3) / 1e12,
                           speedup_vs_sdpa=sd / ms,
                           max_rel_err_vs_sdpa=rel_err(run(), fn().transpose(1, 2).reshape(-1, heads, hd)))
            if label == "prompt" and batch == 4:
                sweep = []
                for cfg in PREFILL_SWEEP:
                    try:
                        sweep.append(dict(config=cfg, us=bench_ms(lambda: run(cfg), rep=30) * 1e3))
                    except Exception as exc:
                        sweep.append(dict(config=cfg, error=f"{type(exc).__name__}: {exc}"[:200]))
                row["sweep"] = sweep
            results["prefill"].append(row)
            log(f"prefill {name} {label} B={batch} prefix={prefix} new={new}: {row['triton_us']:.0f} us "
                f"{row['triton_TFLOPs']:.0f} TFLOP/s; sdpa[{row.get('sdpa_backend')}] "
                f"{row.get('sdpa_TFLOPs', float('nan')):.0f} TFLOP/s")
            del case, kd, vd
            torch.cuda.empty_cache()


def bench_write(gen, bw, results, log):
    for name, (heads, kvh, hd) in SHAPES.items():
        for tokens in (256, 8192):
            case = PagedBatch(gen, heads, kvh, hd, 1, tokens)
            k = torch.randn(tokens, kvh, hd, device=DEV, dtype=DTYPE)
            v = torch.randn_like(k)
            pos = torch.arange(tokens, device=DEV)
            slots = case.tables[0].long()[pos // BS] * BS + pos % BS
            ms = bench_ms(lambda: write_kv(case.layer, k, v, slots))
            nbytes = 2 * (2 * k.numel() * k.element_size()) + slots.numel() * 8
            results["write_kv"].append(dict(shape=name, tokens=tokens, us=ms * 1e3, bytes=nbytes,
                                            fraction_of_copy_bw=nbytes / (ms * 1e-3) / bw))
            log(f"write_kv {name} T={tokens}: {ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / bw:.0%} of copy bw")


def summary(results) -> str:
    bw = results["copy_bandwidth_rw_Bps"]
    lines = [f"attention kernels on {results['device']} (torch {results['torch']}, triton {results['triton']}); "
             f"copy bw {bw / 1e12:.2f} TB/s (read+write, 1 GiB copy_)",
             "decode (bf16, public paged_decode, auto split): us / % of copy bw / SDPA us (backend) / speedup",
             f"{'shape':<13}{'B':>5}{'ctx':>6}{'split':>6}{'us':>9}{'%bw':>6}{'nosplit':>9}{'graph':>8}{'%bw':>6}"
             f"{'sdpa us':>9}{'x sdpa':>8}  backend"]
    for r in results["decode"]:
        lines.append(f"{r['shape']:<13}{r['batch']:>5}{r['context']:>6}{r['splits']:>6}{r['triton_us']:>9.1f}"
                     f"{100 * r['fraction_of_copy_bw']:>5.0f}%{r['triton_nosplit_us']:>9.1f}"
                     f"{r.get('graph_us', float('nan')):>8.1f}{100 * r.get('graph_fraction_of_copy_bw', float('nan')):>5.0f}%"
                     f"{r.get('sdpa_us', float('nan')):>9.1f}{r.get('speedup_vs_sdpa', float('nan')):>8.2f}  "
                     f"{r.get('sdpa_backend')}")
    lines.append("prefill (bf16, causal): us, TFLOP/s vs SDPA")
    for r in results["prefill"]:
        lines.append(f"{r['shape']:<13}{r['case']:<18}B={r['batch']:<3} prefix={r['prefix']:<5} new={r['new_tokens']:<5}"
                     f"{r['triton_us']:>8.0f} us {r['triton_TFLOPs']:>6.0f} TF/s | sdpa[{r.get('sdpa_backend')}] "
                     f"{r.get('sdpa_TFLOPs', float('nan')):>6.0f} TF/s  x{r.get('speedup_vs_sdpa', float('nan')):.2f}")
    for r in results["graph"]:
        lines.append(f"graph {r['shape']} B={r['batch']} ctx={r['context']}: eager {r['eager_us']:.1f} us, "
                     f"replay {r['graph_replay_us']:.1f} us")
    for r in results["write_kv"]:
        lines.append(f"write_kv {r['shape']} T={r['tokens']}: {r['us']:.1f} us, "
                     f"{100 * r['fraction_of_copy_bw']:.0f}% of copy bw")
    for r in results["overhead"]:
        lines.append(f"overhead {r['shape']} B={r['batch']} ctx={r['context']}: public {r['public_us']:.1f} / launcher "
                     f"{r['launcher_us']:.1f} / public again {r['public_again_us']:.1f} us, host "
                     f"{r['host_us_per_call']:.1f} us per call; by splits "
                     + ", ".join(f"{k}:{v:.1f}" for k, v in r["by_splits_us"].items()))
    for r in results["reference"]:
        lines.append(f"torch reference {r['shape']} B=16 ctx=512: {r['reference_us']:.0f} us -> "
                     f"{r['triton_us']:.1f} us ({r['speedup']:.0f}x)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_attention: needs a CUDA device")
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   copy_bandwidth_rw_Bps=bw, decode=[], decode_sweep=[], prefill=[], graph=[], write_kv=[],
                   reference=[], overhead=[])

    def log(msg):
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for part in (lambda: bench_overhead(gen, results, log), lambda: bench_decode(gen, bw, results, log), lambda: bench_prefill(gen, results, log),
                 lambda: bench_graph(gen, results, log), lambda: bench_write(gen, bw, results, log),
                 lambda: bench_reference(gen, results, log),
                 None if args.no_sweep else (lambda: sweep_decode(gen, results, log))):
        if part is None:
            continue
        try:
            part()
        except Exception as exc:  # keep what was measured so far
            log(f"FAILED: {type(exc).__name__}: {exc}")
            results.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}"[:500])
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(results, f, indent=1)
    results["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = summary(results)
    with open(os.path.join(args.out, "attention.summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
