"""Records per-step predictions of the shipped probe on the requests it never trained on, for the
simulator: teacher-forced SmolLM2 forwards (layer-L states at every output position), the shipped
filter (`probe_reference` via filter_adapter) at every g, and the prompt-time totals of the
shipped bag-of-embeddings prompt predictor (what `sjf_prompt` and trail's pre-prefill order use).

    python bench/sim_record_predictions.py [--splits test,val] [--out python/trail/data/sim/recorded_predictions.npz]
    python bench/sim_record_predictions.py --trace tests/data/trace_smollm2_2026-11-27b_test.jsonl.gz \
        --splits test --posteriors bench/results/sim/posteriors_2026-11-27b.npz [--limit 500]

(defaults: the val + test requests of tests/data/trace_smollm2_val_test.jsonl.gz, written over the
package's recorded predictions, trail.sim.DEFAULT_RECORDED)

Output (npz): ids, split, prompt_len, output_len, hit_cap, prompt_pred (boe expected total),
cu (int64 [N+1]), pred (float16 [sum L]: predicted remaining at g = 0..L-1 of each request, g = 0
being the value right after the prefill update, i.e. trail's initial prediction minus 0).

`--posteriors PATH` (then `--out` is written only when given): the filter's posterior over the
remaining-length bins at every position as well, for the Gittins ranking (trail.gittins,
trail.sim_workload.load_posteriors): ids, cu, post (float16 [sum L, K]), pred (float16 [sum L], the
same filter's expected remaining), meta (bin_edges, bin_values, max_new_tokens, ...).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

if not __package__:      # run as `python bench/sim_record_predictions.py`: bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PACKAGE_SIM_DATA, TRACE  # noqa: E402
from trail.predictor import bins as B  # noqa: E402
from trail.predictor import hf_backend  # noqa: E402
from trail.predictor.embed import embed_dense  # noqa: E402
from trail.predictor.filter_adapter import probe_params, run_filter  # noqa: E402
from trail.predictor.probe_file import load_probe, shipped_probe_dir  # noqa: E402
from trail.predictor.prompt_predictors import PromptPredictor  # noqa: E402
from trail.predictor.recorded import save_recorded  # noqa: E402
from trail.predictor.trace import read_trace  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--splits", default="test,val")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None, help="recorded predictions npz (default: the package's, "
                    "trail/data/sim/recorded_predictions.npz, unless --posteriors is given)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's dtype on CPU (the committed recordings were made on an H100 in bf16)")
    ap.add_argument("--posteriors", default=None, help="also write the per-position posteriors here (npz)")
    args = ap.parse_args()
    if args.out is None and args.posteriors is None:
        args.out = str(PACKAGE_SIM_DATA / "recorded_predictions.npz")
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(2)
    trace = read_trace(args.trace)
    splits = args.splits.split(",")
    recs = [r for r in trace.records if B.split_of(r.id) in splits]
    if args.limit:
        recs = recs[: args.limit]
    sub = trace.subset([r.id for r in recs])
    pdir = shipped_probe_dir(f"HuggingFaceTB/{MODEL}")
    mlp, spec = load_probe(pdir / "probe.json")
    lm = hf_backend.load(dtype=getattr(torch, args.dtype))
    t0 = time.time()
    dense = embed_dense(lm, sub, spec.layer, max_tokens=4096)
    t_embed = time.time() - t0
    post = torch.zeros(int(dense.cu[-1]), len(spec.bin_values)) if args.posteriors else None
    pred = run_filter(probe_params(mlp, spec), dense, int(spec.max_new_tokens), posterior_out=post).numpy()
    logging.info("filter done, %.0f s", time.time() - t0)
    if args.posteriors:
        save_posteriors(args.posteriors, sub.records, dense.cu, post, pred, spec, trace.max_new_tokens, t_embed,
                        f"{lm.device} {args.dtype}")
        logging.info("wrote %s: %d requests, %d positions", args.posteriors, len(sub.records), len(pred))
    if args.out is None:
        return
    boe = PromptPredictor(pdir / "prompt_boe.json", embeddings=lm.input_embeddings.detach().float().cpu())
    prompt_pred = boe.expected_total(sub.records).cpu().numpy()
    recs = sub.records
    save_recorded(args.out, recs, dense.cu, torch.from_numpy(pred), torch.from_numpy(prompt_pred),
                  {"model": lm.model_id, "layer": spec.layer, "alpha": spec.alpha, "splits": splits,
                   "max_new_tokens": trace.max_new_tokens, "embed_seconds": t_embed, "prompt_predictor": "prompt_boe"})
    logging.info("wrote %s: %d requests, %d positions, embed %.0f s", args.out, len(recs), len(pred), t_embed)


def save_posteriors(path, records, cu, post, pred, spec, max_new_tokens: int, embed_s: float, device: str) -> None:
    import json

    import numpy as np

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": f"HuggingFaceTB/{MODEL}", "layer": spec.layer, "alpha": spec.alpha, "eps": spec.eps,
            "bin_edges": list(map(float, spec.bin_edges)), "bin_values": list(map(float, spec.bin_values)),
            "max_new_tokens": max_new_tokens, "embed_seconds": embed_s, "device": device,
            "probe": "shipped (trail.predictor.probe_file.shipped_probe_dir)"}
    np.savez_compressed(path, ids=np.array([r.id for r in records]), cu=cu.long().numpy(),
                        output_len=np.array([r.output_len for r in records], dtype=np.int32),
                        post=post.numpy().astype(np.float16), pred=np.asarray(pred).clip(0).astype(np.float16),
                        meta=np.array(json.dumps(meta)))


if __name__ == "__main__":
    main()
