"""The fused probe kernel (trail_kernels/probe_triton.py) on the GPU.

    python bench/suite/kernels_probe.py --out DIR      -> DIR/probe.json, DIR/probe.summary.txt

Measured in one run, decode steps (one row per request, every call a predict + an evidence update):
  - the fused kernel (one launch) at batch 1/64/256/1024 for d = 4096 and 576 (h = 512, K = 10,
    bf16 states and weights), the L2 flushed before each call (triton.testing.do_bench);
  - baselines from the same run: the unfused torch reference (`probe_reference`), and the bare
    probe MLP in torch (two cuBLAS GEMMs + log_softmax, no filter at all);
  - its memory floor: bytes it must read once (weights + states + per-slot rows) over the HBM copy
    bandwidth measured here (read + write bytes of a 1 GiB device copy per second);
  - a sweep of tile configs (the heuristic's pick is reported beside the best one);
  - one prefill step (pool pass + fused pass) against the reference;
  - the decode launch captured alone in a CUDA graph: replay time, and syncs during eager launches
    and replays counted with torch.cuda.set_sync_debug_mode('error') (any sync raises).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from trail_kernels.probe import probe_step  # noqa: E402
from trail_kernels.probe_params import ProbeParams  # noqa: E402
from trail_kernels.probe_reference import probe_reference  # noqa: E402
from trail_kernels.probe_state import ProbeState  # noqa: E402
from trail_kernels.probe_triton import pick_config  # noqa: E402
from trail_kernels.row_flags import FIRST_CHUNK, LAST_CHUNK, PREFILL  # noqa: E402

D_VALUES = (4096, 576)
BATCHES = (1, 64, 256, 1024)
H, K = 512, 10
DEVICE = "cuda"
SWEEP = [dict(BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=bd, num_warps=w, num_stages=s)
         for bm, bh, bd, w, s in [(16, 16, 128, 4, 3), (16, 32, 256, 4, 3), (32, 32, 128, 4, 3),
                                  (64, 32, 128, 4, 3), (64, 64, 128, 4, 3), (64, 64, 64, 4, 4),
                                  (128, 64, 64, 8, 3), (32, 16, 256, 4, 2)]]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=200)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms * 1e-3)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5])  # median, L2 flushed


def i32(values):
    return torch.as_tensor(values, dtype=torch.int32, device=DEVICE)


class DecodeCase:
    """A decode step of `batch` requests whose posteriors exist (after one prompt step)."""

    def __init__(self, d: int, batch: int, gen: torch.Generator):
        self.params = ProbeParams.random(d, H, K, generator=gen, open_ended=True, scale=4.0, eps=1e-6,
                                         alpha=0.8).to(DEVICE, torch.bfloat16)
        self.state = ProbeState.for_params(self.params, max_slots=batch, max_rows=batch, device=DEVICE)
        prompt = torch.randn(batch * 4, d, generator=gen).to(DEVICE, torch.bfloat16)
        one_shot = PREFILL | FIRST_CHUNK | LAST_CHUNK
        probe_step(prompt, i32(range(0, 4 * batch + 1, 4)), i32(range(batch)), i32([one_shot] * batch),
                   i32([0] * batch), i32([1000] * batch), self.params, self.state, impl="triton")
        self.ref_state = self.state.clone()
        self.states = torch.randn(batch, d, generator=gen).to(DEVICE, torch.bfloat16)
        self.cu = i32(range(batch + 1))
        self.slots = i32(torch.randperm(batch, generator=gen))
        self.flags = i32([0] * batch)
        self.max_new = i32([1000] * batch)
        # a fresh num_generated per call, so every call predicts one step and applies an update
        # (each closure walks its own cycle, so the kernel and the reference see the same inputs)
        self.gen_list = [i32([g] * batch) for g in range(1, 257)]
        self.batch, self.d = batch, d

    def fused(self, config=None):
        gens = itertools.cycle(self.gen_list)
        return lambda: probe_step(self.states, self.cu, self.slots, self.flags, next(gens), self.max_new,
                                  self.params, self.state, has_prefill=False, impl="triton", config=config)

    def reference(self):
        gens = itertools.cycle(self.gen_list)
        return lambda: probe_reference(self.states, self.cu, self.slots, self.flags, next(gens),
                                       self.max_new, self.params, self.ref_state, has_prefill=False,
                                       validate=False)

    def max_diff_vs_reference(self, calls: int = 3) -> float:
        """Fresh copies of the state, the same `calls` steps through both: max |log p| difference."""
        fused_state, ref_state = self.state.clone(), self.state.clone()
        for g in self.gen_list[:calls]:
            probe_step(self.states, self.cu, self.slots, self.flags, g, self.max_new, self.params, fused_state,
                       has_prefill=False, impl="triton")
            probe_reference(self.states, self.cu, self.slots, self.flags, g, self.max_new, self.params, ref_state,
                            has_prefill=False, validate=False)
        return (fused_state.log_post - ref_state.log_post).abs().max().item()

    def torch_mlp(self):
        w1, b1 = self.params.fc1_weight, self.params.fc1_bias.to(torch.bfloat16)
        w2, b2 = self.params.fc2_weight, self.params.fc2_bias.to(torch.bfloat16)
        return lambda: torch.log_softmax(torch.nn.functional.linear(
            torch.relu(torch.nn.functional.linear(self.states, w1, b1)), w2, b2).float(), -1)

    def floor_bytes(self) -> int:
        p = self.params
        weights = sum(t.numel() * t.element_size() for t in (p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias))
        rows = self.batch * (self.d * self.states.element_size()    # the newest states
                             + 5 * 4                                # cu, slot, flags, gen, max_new
                             + 2 * K * 4 + 3 * 2 * 4)               # posterior, counters, readout (r+w)
        return weights + rows


def graph_replay(case: DecodeCase, steps: int = 50, replays: int = 20) -> dict:
    """The decode launch in CUDA graphs: one graph of `steps` x (num_generated += 1; probe) and one
    of `steps` x (num_generated += 1) alone; the difference per step is the probe's GPU time in a
    graph. Also the replay wall time of a one-launch graph, and syncs under sync-debug 'error'."""
    static_gen = i32([1] * case.batch)
    launch = lambda: probe_step(case.states, case.cu, case.slots, case.flags, static_gen, case.max_new,  # noqa: E731
                                case.params, case.state, has_prefill=False, impl="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()
    torch.cuda.current_stream().wait_stream(side)
    graphs = {}
    for name, body in (("one", lambda: launch()),
                       ("probe", lambda: [(static_gen.add_(1), launch()) for _ in range(steps)]),
                       ("add", lambda: [static_gen.add_(1) for _ in range(steps)])):
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            body()
    torch.cuda.synchronize()
    syncs = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            launch()
            graphs["one"].replay()
            graphs["probe"].replay()
    except RuntimeError as exc:           # raised by any synchronizing call
        syncs += 1
        print("sync detected:", exc, file=sys.stderr)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def timed(graph, n):
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n * 1e3    # us per replay

    probe_us, add_us = timed(graphs["probe"], replays), timed(graphs["add"], replays)
    one_us = timed(graphs["one"], 200)
    t = time.perf_counter()
    for _ in range(200):
        launch()
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - t) / 200 * 1e6
    return dict(d=case.d, batch=case.batch, probe_in_graph_us=(probe_us - add_us) / steps,
                add_in_graph_us=add_us / steps, one_launch_graph_replay_us=one_us, eager_launch_wall_us=eager_us,
                syncs=syncs)


def prefill_case(d: int, n_prompts: int, prompt_len: int, gen: torch.Generator) -> dict:
    params = ProbeParams.random(d, H, K, generator=gen, open_ended=True, scale=4.0, eps=1e-6).to(DEVICE, torch.bfloat16)
    state = ProbeState.for_params(params, max_slots=n_prompts, max_rows=n_prompts, device=DEVICE)
    ref_state = state.clone()
    states = torch.randn(n_prompts * prompt_len, d, generator=gen).to(DEVICE, torch.bfloat16)
    args = (states, i32(range(0, n_prompts * prompt_len + 1, prompt_len)), i32(range(n_prompts)),
            i32([PREFILL | FIRST_CHUNK | LAST_CHUNK] * n_prompts), i32([0] * n_prompts), i32([1000] * n_prompts))
    fused = bench_ms(lambda: probe_step(*args, params, state, impl="triton"))
    ref = bench_ms(lambda: probe_reference(*args, params, ref_state, validate=False))
    err = (state.log_post - ref_state.log_post).abs().max().item()
    nbytes = states.numel() * 2 + params.fc1_weight.numel() * 2
    return dict(d=d, prompts=n_prompts, prompt_len=prompt_len, fused_us=fused * 1e3, reference_us=ref * 1e3,
                read_bytes=nbytes, max_abs_diff_log_post=err)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweep")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_probe: needs a CUDA device")
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   copy_bandwidth_rw_Bps=bw, decode=[], prefill=[], graph=[])

    for d in D_VALUES:
        for batch in BATCHES:
            case = DecodeCase(d, batch, gen)
            fused = bench_ms(case.fused())
            ref = bench_ms(case.reference())
            mlp = bench_ms(case.torch_mlp())
            floor_s = case.floor_bytes() / bw
            diff = case.max_diff_vs_reference()
            row = dict(d=d, batch=batch, config=pick_config(batch, d, H), fused_us=fused * 1e3,
                       reference_us=ref * 1e3, torch_mlp_us=mlp * 1e3, floor_us=floor_s * 1e6,
                       floor_bytes=case.floor_bytes(), fraction_of_floor=floor_s / (fused * 1e-3),
                       max_abs_diff_log_post_vs_reference=diff)
            if not args.no_sweep:
                sweep = []
                for cfg in SWEEP:
                    try:
                        sweep.append(dict(config=cfg, us=bench_ms(case.fused(cfg)) * 1e3))
                    except Exception as exc:  # a config the compiler rejects (e.g. shared memory)
                        sweep.append(dict(config=cfg, error=f"{type(exc).__name__}: {exc}"[:200]))
                ok = [s for s in sweep if "us" in s]
                row["sweep"] = sweep
                if ok:
                    best = min(ok, key=lambda s: s["us"])
                    row["best_us"], row["best_config"] = best["us"], best["config"]
            results["decode"].append(row)
            print(f"d={d} batch={batch}: fused {row['fused_us']:.1f} us, reference {row['reference_us']:.1f} us, "
                  f"floor {row['floor_us']:.2f} us, best {row.get('best_us', float('nan')):.1f} us", flush=True)
            del case
            torch.cuda.empty_cache()

    for d in D_VALUES:
        results["prefill"].append(prefill_case(d, 16, 256, gen))
    for d in D_VALUES:
        results["graph"].append(graph_replay(DecodeCase(d, 64, gen)))
    results["seconds"] = time.time() - t0

    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"probe kernel on {results['device']}; HBM copy {bw / 1e12:.2f} TB/s (read+write, this run); "
             "h=512 K=10 bf16; decode step = predict + update; L2 flushed per call",
             f"{'d':>5} {'batch':>5} {'fused us':>9} {'ref us':>8} {'x ref':>6} {'mlp us':>7} {'floor us':>8} "
             f"{'%floor':>6} {'best us':>8}  best config (BM,BH,BD,warps,stages)"]
    for r in results["decode"]:
        best = r.get("best_config")
        best_s = f"{best['BLOCK_M']},{best['BLOCK_H']},{best['BLOCK_D']},{best['num_warps']},{best['num_stages']}" if best else "-"
        lines.append(f"{r['d']:>5} {r['batch']:>5} {r['fused_us']:>9.1f} {r['reference_us']:>8.1f} "
                     f"{r['reference_us'] / r['fused_us']:>6.1f} {r['torch_mlp_us']:>7.1f} {r['floor_us']:>8.2f} "
                     f"{100 * r['fraction_of_floor']:>5.1f}% {r.get('best_us', float('nan')):>8.1f}  {best_s}")
    for p in results["prefill"]:
        lines.append(f"prefill d={p['d']} {p['prompts']}x{p['prompt_len']} tokens: fused (pool + probe) "
                     f"{p['fused_us']:.1f} us, reference {p['reference_us']:.1f} us, "
                     f"max |dlog p| {p['max_abs_diff_log_post']:.2e}")
    for g in results["graph"]:
        lines.append(f"CUDA graph d={g['d']} batch={g['batch']}: probe {g['probe_in_graph_us']:.1f} us per step inside "
                     f"a 50-step graph (L2 warm); one-launch graph replay {g['one_launch_graph_replay_us']:.1f} us wall; eager launch "
                     f"{g['eager_launch_wall_us']:.1f} us wall; syncs {g['syncs']}")
    lines.append(f"total {results['seconds']:.0f} s")
    with open(os.path.join(args.out, "probe.summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
