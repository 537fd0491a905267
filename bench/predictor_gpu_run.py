"""The predictor pipeline for real, in one process on one GPU: collect >= 2,000 prompts with
SmolLM2-135M-Instruct, embed all layers, sweep, train the probe and prompt predictors, fit the
filter, evaluate on the held-out requests. All-layer features stay on this machine; under --out
it leaves the trace (gzip), the probe files, the metrics, plots and a timing summary.

    python bench/predictor_gpu_run.py --out DIR [--num 2000] [--alpaca PATH] [--trace PATH]

Resumable: the trace is appended batch by batch to DIR/trace.jsonl; run again with the same
--out (or --trace pointing at a carried trace) and collection continues where it stopped.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("predictor_gpu_run")


def pick_backend(args, lm, prompts):
    """Our runner when asked, or (auto) when its greedy outputs on a few prompts agree with
    transformers' (bf16 may flip near-ties, so agreement is measured as matching prefix length)."""
    if args.backend == "hf":
        return None
    from trail.assets import smollm2_hf_dir
    from trail.predictor import hf_backend
    from trail.predictor.runner_backend import RunnerGenerator

    try:
        runner = RunnerGenerator(smollm2_hf_dir(), lm.device, lm.dtype, max_slots=args.batch_size,
                                 max_len=args.max_prompt_tokens + args.max_new_tokens)
        if args.backend == "runner":
            return runner
        ids = [hf_backend.chat_ids(lm.tokenizer, p.text) for p in prompts[:16]]
        n = 32
        list(runner.generate(ids[:2], 4, lm.eos_token_ids(), repetition_penalty=1.1))  # kernel JIT warm-up
        t = time.time()
        ours = {i: o for i, o, _ in runner.generate(ids, n, lm.eos_token_ids(), repetition_penalty=1.1)}
        t_ours = time.time() - t
        t = time.time()
        ref = hf_backend.generate(lm, ids, n, repetition_penalty=1.1)
        t_hf = time.time() - t
    except Exception:
        logger.exception("our runner failed the canary: collecting with transformers generate")
        return None

    def prefix(a, b):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return k / max(len(a), len(b))

    agree = sum(prefix(ours[i], ref[i][0]) for i in range(len(ids))) / len(ids)
    logger.info("canary (16 prompts x %d tokens): runner %.2f s, transformers %.2f s, agreement %.2f",
                n, t_ours, t_hf, agree)
    if agree < 0.7:
        logger.warning("runner disagrees with transformers (%.2f < 0.7): collecting with transformers", agree)
        return None
    if t_ours > 1.5 * t_hf:
        logger.warning("runner slower than transformers at batch 16 (%.2f s vs %.2f s): collecting with "
                       "transformers", t_ours, t_hf)
        return None
    return runner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/predictor"))
    ap.add_argument("--num", type=int, default=2000, help="prompts to collect")
    ap.add_argument("--alpaca", default=os.environ.get("TRAIL_ALPACA"),
                    help="alpaca_en_demo.json or the llamafactory sdist (.tar.gz); half the prompts at most")
    ap.add_argument("--trace", default=None, help="start from (a copy of) this trace")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--num-decode", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--minilm-dir", default=os.environ.get("TRAIL_MINILM_DIR"))
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--backend", choices=("auto", "runner", "hf"), default="auto",
                    help="collection through our model runner or transformers generate; auto: the runner "
                         "if it passes a canary against transformers, else transformers")
    ap.add_argument("--keep-features", action="store_true", help="also save the all-layer features (~1 GB)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from trail.predictor import collect as C
    from trail.predictor import embed as E
    from trail.predictor import hf_backend, pipeline
    from trail.predictor import prompts as P
    from trail.predictor.train_probe import TrainConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.time()

    def mark(name):
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)
        logger.info("[%s] done in %.1f s (total %.1f s)", name, timings[name], time.time() - t0)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        logger.warning("no CUDA device: this run will be slow")
    lm = hf_backend.load(device=device)
    mark("load")

    trace_path = out / "trace.jsonl"
    if not args.trace and (out / "trace.jsonl.gz").exists():
        args.trace = str(out / "trace.jsonl.gz")
    if args.trace and not trace_path.exists():
        src = Path(args.trace)
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as f, open(trace_path, "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            shutil.copy(src, trace_path)
    # enough prompts that `num` survive the prompt-length filter
    candidates = P.load_prompts(int(args.num * 1.2) + 50, sharegpt=True, alpaca=args.alpaca, seed=0)
    prompts = [p for p in candidates
               if len(hf_backend.chat_ids(lm.tokenizer, p.text)) <= args.max_prompt_tokens][: args.num]
    logger.info("prompts: %d (%s)", len(prompts),
                {s: sum(p.source == s for p in prompts) for s in {p.source for p in prompts}})
    runner = pick_backend(args, lm, prompts)
    mark("canary")
    kw = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=1.1, temperature=0.0,
              batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens)
    fallback = False
    try:
        trace = C.collect(prompts, trace_path, lm, runner=runner, **kw)
    except Exception:
        if runner is None:
            raise
        logger.exception("collection through our runner FAILED; finishing with transformers generate")
        del runner
        torch.cuda.empty_cache() if device == "cuda" else None
        runner, fallback = None, True
        trace = C.collect(prompts, trace_path, lm, **kw)
    stats = C.summarize(trace)
    (out / "collect.json").write_text(json.dumps(stats, indent=1))
    logger.info("trace: %s", stats)
    mark("collect")

    feats = E.embed_sampled(lm, trace, None, args.num_decode, store_device=device)
    if args.keep_features:
        feats.save(out / "features_all_layers.safetensors")
    mark("embed")

    minilm = False if args.no_minilm else (args.minilm_dir or True)
    probes = out / "probes"
    summary = pipeline.train_all(feats, trace, lm, probes, sweep=True, cfg=TrainConfig(epochs=args.epochs),
                                 device=device, minilm=minilm)
    del feats
    torch.cuda.empty_cache() if device == "cuda" else None
    mark("train")

    res = pipeline.evaluate_dir(trace, probes, lm, out / "eval", split="test", device=device,
                                minilm=args.minilm_dir)
    mark("eval")

    with open(trace_path, "rb") as f, gzip.open(out / "trace.jsonl.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace_path.unlink()
    mark("pack")
    report = {"timings_s": timings, "collect": stats, "collect_backend": trace.settings.get("backend"),
              "collect_fell_back_to_transformers": fallback, "layer": summary["layer"],
              "filter_fit": summary.get("filter_fit"), "prompt_predictors": summary["prompt_predictors"],
              "eval_test": {k: v["mae"] for k, v in res["methods"].items()},
              "ratio_to_filter": res["ratio_to_filter"], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    (out / "predictor_run.json").write_text(json.dumps(report, indent=1, default=str))
    print((out / "eval" / "eval.summary.txt").read_text())
    print(json.dumps({"timings_s": timings, "layer": summary["layer"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
