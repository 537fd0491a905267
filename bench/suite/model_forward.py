"""GPU benchmark of our model forward (torch reference attention kernels, no CUDA graphs yet).

    python bench/suite/model_forward.py --out DIR [--model-dir HF_FOLDER] [--skip-8b]

1. correctness: SmolLM2-135M bf16 logits, ours and transformers', each against transformers fp32
   (max relative error, top-1 agreement) on 4 chat prompts;
2. SmolLM2 batch-64 paged decode: 64 real prompts prefilled, then timed decode steps (host prepare
   + forward + sample + the one token read-back), against transformers' bf16 `generate` per-step
   time on the same prompts and against the HBM floor (weight bytes + KV bytes read) / copy
   bandwidth measured in this run;
3. Llama-3-8B shape, random weights, decode step at B = 1, 16, 64 with 512 cached tokens each
   (the cache holds random values: timing only), against its HBM floor.
Writes DIR/forward.json and DIR/forward.summary.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.models import load_hf, preset, random_model
from trail.predictor.prompts import synthetic_chat_prompts
from trail.sampling import SampleParams
from trail.segments import Segment



def cuda_ms(fn, iters=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def hbm_copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting read + write."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").fill_(1)
    b = torch.empty_like(a)
    ms = cuda_ms(lambda: b.copy_(a), iters=10)
    del a, b
    return 2 * 2 * n / (ms * 1e-3)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def make_runner(model, slots, max_blocks, dtype, fill=None):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
                    slots * max_blocks, slots, max_blocks, device="cuda")
    if fill == "random":
        cache.pool.normal_()
    perm = torch.randperm(slots * max_blocks)
    cache.assign_tables(perm.view(slots, max_blocks))
    return ModelRunner(model, cache)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def correctness(tok, hf32, hf16, ours):
    ids = synthetic_chat_prompts(tok, 4)
    runner = make_runner(ours, 4, 16, torch.bfloat16)
    batch = runner.prepare([Segment(s, p, 0) for s, p in enumerate(ids)])
    logits, _ = ours(batch.input_ids, batch.meta, runner.kv_cache)
    res = {"ours_rel_err": 0.0, "hf_bf16_rel_err": 0.0, "ours_top1": 1.0, "hf_bf16_top1": 1.0}
    for got, p in zip(logits.split([len(p) for p in ids]), ids):
        x = torch.tensor([p], device="cuda")
        with torch.no_grad():
            ref, base = hf32(x).logits[0].float(), hf16(x).logits[0].float()
        res["ours_rel_err"] = max(res["ours_rel_err"], rel(got, ref))
        res["hf_bf16_rel_err"] = max(res["hf_bf16_rel_err"], rel(base, ref))
        res["ours_top1"] = min(res["ours_top1"], (got.argmax(-1) == ref.argmax(-1)).float().mean().item())
        res["hf_bf16_top1"] = min(res["hf_bf16_top1"], (base.argmax(-1) == ref.argmax(-1)).float().mean().item())
    return res


def decode_timing(runner, prompts_or_ctx, steps, params=None):
    """Prefill (or assume a filled cache of `ctx` tokens), then time decode steps end to end."""
    if isinstance(prompts_or_ctx, list):
        prompts = prompts_or_ctx
        out = runner.step([Segment(s, p, 0, params=params) for s, p in enumerate(prompts)])
        last = out.next_tokens.tolist()
        pos = [len(p) for p in prompts]
    else:
        b, ctx = prompts_or_ctx
        last, pos = [1] * b, [ctx] * b
    times = {"step": [], "prepare": []}
    kv_tokens_read = 0
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        segs = [Segment(s, [t], p, "decode", params=params) for s, (t, p) in enumerate(zip(last, pos))]
        batch = runner.prepare(segs)
        t1 = time.perf_counter()
        logits, _ = runner.forward(batch)
        tokens = runner.sample(logits, batch)
        new = tokens.tolist()                    # the engine's one sync per step
        t2 = time.perf_counter()
        if i >= 2:                               # two warm-up steps
            times["step"].append((t2 - t0) * 1e3)
            times["prepare"].append((t1 - t0) * 1e3)
            kv_tokens_read += sum(p + 1 for p in pos)
        last = new
        pos = [p + 1 for p in pos]
    # forward and sampler alone, replayed on the last batch (rewrites the same cache slots)
    fwd_ms = cuda_ms(lambda: runner.forward(batch), iters=5, warmup=1)
    smp_ms = cuda_ms(lambda: runner.sample(logits, batch), iters=5, warmup=1)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    return {"step_ms": mean["step"], "prepare_ms": mean["prepare"], "forward_ms": fwd_ms, "sample_ms": smp_ms,
            "mean_kv_tokens_per_step": kv_tokens_read / steps}


def hf_generate_step_ms(hf16, tok, prompts, steps):
    tok.padding_side = "left"
    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            hf16.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          repetition_penalty=1.1, pad_token_id=pad)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    return (run(steps + 1) - run(1)) / steps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", default=None, help="SmolLM2 HF folder (default: trail.assets cache)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--big-preset", default="llama3-8b", help="random-weights preset of part 3")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model_dir is None:
        from trail.assets import smollm2_hf_dir
        model_dir = smollm2_hf_dir()
    else:
        model_dir = Path(args.model_dir)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "kernels": os.environ.get("TRAIL_KERNELS", "auto") + " (paged attention: torch reference)"}
    bw = hbm_copy_bandwidth()
    res["hbm_copy_TBps"] = bw / 1e12

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    ours = load_hf(model_dir, device="cuda", dtype=torch.bfloat16)
    res["correctness"] = correctness(tok, hf32, hf16, ours)
    del hf32
    torch.cuda.empty_cache()

    prompts = synthetic_chat_prompts(tok, 64)
    runner = make_runner(ours, 64, -(-(max(map(len, prompts)) + args.steps + 4) // 16), torch.bfloat16)
    smol = decode_timing(runner, prompts, args.steps, SampleParams(repetition_penalty=1.1))
    kv_bytes = smol["mean_kv_tokens_per_step"] * runner.kv_cache.spec.bytes_per_token
    smol["floor_ms"] = (weight_bytes(ours) + kv_bytes) / bw * 1e3
    smol["hf_generate_step_ms"] = hf_generate_step_ms(hf16, tok, prompts, args.steps)
    res["smollm2_b64"] = smol
    del hf16, runner, ours
    torch.cuda.empty_cache()

    res["llama3_8b"] = {}
    if not args.skip_8b:
        model = random_model(preset(args.big_preset), device="cuda", dtype=torch.bfloat16)
        wb = weight_bytes(model)
        for b in (1, 16, 64):
            if time.time() - t_start > 150:
                res["llama3_8b"][b] = "skipped: time budget"
                continue
            ctx = 512
            runner = make_runner(model, b, ctx // 16 + 2, torch.bfloat16, fill="random")
            r = decode_timing(runner, (b, ctx), 8)
            r["floor_ms"] = (wb + r["mean_kv_tokens_per_step"] * runner.kv_cache.spec.bytes_per_token) / bw * 1e3
            res["llama3_8b"][b] = r
            del runner
            torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t_start

    (out_dir / "forward.json").write_text(json.dumps(res, indent=1))
    c, s = res["correctness"], res["smollm2_b64"]
    lines = [
        f"model_forward on {res['device']} (HBM copy {res['hbm_copy_TBps']:.2f} TB/s; attention = torch reference)",
        f"SmolLM2 bf16 vs transformers fp32: ours rel err {c['ours_rel_err']:.2e} top-1 {c['ours_top1']:.3f} | "
        f"transformers bf16 rel err {c['hf_bf16_rel_err']:.2e} top-1 {c['hf_bf16_top1']:.3f}",
        "decode step (ms)          ours step  fwd   sample prepare  floor  ours/floor  HF generate  HF/ours",
        f"SmolLM2 B=64 (ctx~{s['mean_kv_tokens_per_step'] / 64:.0f})     "
        f"{s['step_ms']:7.2f} {s['forward_ms']:6.2f} {s['sample_ms']:6.2f} {s['prepare_ms']:6.2f} "
        f"{s['floor_ms']:6.2f} {s['step_ms'] / s['floor_ms']:8.1f}x {s['hf_generate_step_ms']:10.2f} "
        f"{s['hf_generate_step_ms'] / s['step_ms']:7.2f}x",
    ]
    for b, r in res["llama3_8b"].items():
        if isinstance(r, str):
            lines.append(f"{args.big_preset} B={b}: {r}")
            continue
        lines.append(f"{args.big_preset} rand B={b:<3} ctx 512 {r['step_ms']:7.2f} {r['forward_ms']:6.2f} "
                     f"{r['sample_ms']:6.2f} {r['prepare_ms']:6.2f} {r['floor_ms']:6.2f} "
                     f"{r['step_ms'] / r['floor_ms']:8.1f}x")
    (out_dir / "forward.summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
