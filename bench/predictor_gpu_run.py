"""Issue 15 on one GPU in one process, inside a wall-clock budget: collect with our own engine
(bf16, greedy, repetition penalty 1.1, max 512 new tokens) as many ShareGPT first turns as fit
plus the Alpaca demo prompts, embed a few candidate layers, sweep them, choose width / learning
rate on validation, train with censored labels, fit alpha / eps, fine-tune the bag-of-embeddings
prompt baseline end to end, evaluate in distribution and across datasets (ShareGPT -> Alpaca and
the reverse), compare with the shipped probe on the same test requests, record per-step
predictions (the simulator's npz) and, time permitting, judge them in the simulator.

    python bench/predictor_gpu_run.py --out DIR [--num 9472] [--budget-s 530] [--layers 13,15,...]

Prompts come from tests/data/prompts_sharegpt_alpaca.jsonl.gz (bench.common.PROMPTS: first human
turns of ShareGPT and the Alpaca demo set, templated length <= 1,024 tokens, shuffled; no dataset
package needed). Work happens in --work (default /tmp/trail_predictor_work): the trace there is appended
as requests finish, so a second run with the same --work resumes collection (--trace seeds it from
a trace that came back from an earlier machine). Whatever happens (an error in a phase, the
budget running out, SIGTERM), the results so far are packed into --out as at most 5 files:
predictor_results.tar.gz (probes, eval JSON / tables / plots, npz, summary), trace.jsonl.gz (split
into trace.partN.jsonl.gz when over 15 MiB), predictor_run.json and predictor_tables.md.

On a host with two GPUs, the main run can leave the shipped probe's evaluation and the
cross-dataset probes to a second process (`--skip eval_shipped,cross_sharegpt_only,
cross_alpaca_only` here, `--cross-from MAIN_WORK --work OTHER` there): it waits for the main run's
collection (MAIN_WORK/collect.done) and works from its trace (bench/jobs/round1.jobs).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import math
import os
import shutil
import signal
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch

if not __package__:      # run as `python bench/predictor_gpu_run.py`: import bench.* from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PROMPTS as DEFAULT_PROMPTS  # noqa: E402

logger = logging.getLogger("predictor_gpu_run")
SOURCES = ("sharegpt", "alpaca")
MAX_PART_BYTES = 15 * 2**20


class Stop(Exception):
    """SIGTERM (the wrapper's timeout): stop and pack."""


class Run:
    """Phases with timings, a deadline, errors recorded (not raised), and the summary."""

    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.end = self.t0 + args.budget_s
        self.summary: dict = {"args": vars(args), "phases": {}, "errors": {}, "skipped": {}}
        self.skip = {x for x in (args.skip or "").split(",") if x}

    def left(self) -> float:
        return self.end - time.monotonic()

    @contextlib.contextmanager
    def phase(self, name: str, need_s: float = 0.0):
        """Runs the body unless less than `need_s` seconds are left; an exception is logged and
        recorded, and the run goes on (later phases check what they need)."""
        if name in self.skip:
            self.summary["skipped"][name] = "--skip"
            yield False
            return
        if self.left() < need_s:
            self.summary["skipped"][name] = f"{self.left():.0f} s left < {need_s:.0f} s needed"
            logger.warning("[%s] skipped: %s", name, self.summary["skipped"][name])
            yield False
            return
        t = time.monotonic()
        logger.info("[%s] start (%.0f s left)", name, self.left())
        try:
            yield True
        except Stop:
            self.summary["errors"][name] = "stopped by SIGTERM"
            raise
        except Exception as exc:      # noqa: BLE001  (a failed phase must not lose the others' results)
            self.summary["errors"][name] = f"{type(exc).__name__}: {exc}"
            logger.error("[%s] FAILED:\n%s", name, traceback.format_exc())
        finally:
            self.summary["phases"][name] = round(time.monotonic() - t, 1)
            logger.info("[%s] %.1f s (total %.1f s)", name, self.summary["phases"][name], time.monotonic() - self.t0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/predictor/gpu_run"))
    ap.add_argument("--work", default="/tmp/trail_predictor_work")
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    ap.add_argument("--num", type=int, default=100000, help="ShareGPT prompts at most (default: all in the file)")
    ap.add_argument("--num-alpaca", type=int, default=100000, help="Alpaca prompts at most (default: all)")
    ap.add_argument("--trace", default=None,
                    help="seed the work trace from an earlier run's trace (.jsonl[.gz], or a comma list of its parts)")
    ap.add_argument("--budget-s", type=float, default=530.0, help="wall seconds for everything, packing included")
    ap.add_argument("--reserve-s", type=float, default=240.0, help="seconds kept for the phases after collection")
    ap.add_argument("--batch-size", type=int, default=256, help="engine max_batch during collection")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--backend", choices=("runner", "hf"), default="runner",
                    help="collect with our engine (default) or transformers generate")
    ap.add_argument("--layers", default="11,14,16,17,19,21,24", help="candidate layers embedded and swept")
    ap.add_argument("--num-decode", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--sweep-epochs", type=int, default=12, help="shorter schedule for the layer sweep")
    ap.add_argument("--rank-step", type=int, default=16, help="g grid of the alive-at-step rank correlation")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--widths", default="256,512,1024")
    ap.add_argument("--lrs", default="1e-3,3e-4")
    ap.add_argument("--ft-epochs", type=int, default=6, help="epochs of the fine-tuned prompt baseline")
    ap.add_argument("--minilm-dir", default=os.environ.get("TRAIL_MINILM_DIR"),
                    help="all-MiniLM-L6-v2 folder: also train the frozen and fine-tuned MiniLM baselines")
    ap.add_argument("--judge-n", type=int, default=2000)
    ap.add_argument("--judge-seeds", default="0,1,2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip", default="", help="phases not to run, comma list (e.g. cross_sharegpt_only,judge)")
    ap.add_argument("--cross-from", default=None,
                    help="cross-dataset phases only, on another GPU: wait for the main run's collection in this "
                         "work folder, then train ShareGPT-only / Alpaca-only probes at --cross-layer")
    ap.add_argument("--cross-layer", type=int, default=19)
    ap.add_argument("--cross-width", type=int, default=512)
    ap.add_argument("--cross-lr", type=float, default=1e-3)
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------
def select_prompts(args, lm):
    from trail.predictor import hf_backend
    from trail.predictor import prompts as P

    allp = P.read_prompt_file(args.prompts)
    quota = {"sharegpt": args.num, "alpaca": args.num_alpaca}
    out = []
    for p in allp:                                  # the file is shuffled: keep its order
        if quota.get(p.source, 0) > 0 and len(hf_backend.chat_ids(lm.tokenizer, p.text)) <= args.max_prompt_tokens:
            quota[p.source] -= 1
            out.append(p)
    return out


def seed_trace(srcs: str, dst: Path) -> None:
    """Start the work trace from an earlier run's trace: one file, or its parts (comma list of
    trace.partN.jsonl.gz, each a valid trace with the same header). No-op when dst exists."""
    if dst.exists():
        return
    head, body = None, []
    for src in [Path(x) for x in srcs.split(",") if x]:
        if not src.exists():
            raise FileNotFoundError(f"--trace {src}: not found")
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rt", encoding="utf-8") as f:
            lines = [x for x in f.read().split("\n") if x.strip()]
        if head is None:
            head = lines[0]
        elif json.loads(lines[0]) != json.loads(head):
            raise ValueError(f"--trace {src}: header differs from the first part's")
        body += lines[1:]
    if head is not None:
        dst.write_text(head + "\n" + "".join(x + "\n" for x in body), encoding="utf-8")


def build_runner(a, lm, prompts):
    """Our engine for collection, warmed up (kernel compiles, graph buckets) on a few prompts so
    the measured rate is the steady one; the warm-up outputs are not written to the trace."""
    from trail.assets import smollm2_hf_dir
    from trail.predictor import hf_backend
    from trail.predictor.runner_backend import collect_engine

    runner = collect_engine(smollm2_hf_dir(), lm, a.batch_size, a.max_prompt_tokens, a.max_new_tokens)
    warm = [hf_backend.chat_ids(lm.tokenizer, p.text) for p in prompts[:8]]
    t = time.monotonic()
    n = sum(1 for _ in runner.generate(warm, 16, lm.eos_token_ids(), repetition_penalty=a.repetition_penalty))
    logger.info("engine warm-up: %d requests x 16 tokens in %.1f s", n, time.monotonic() - t)
    return runner


def collect_phase(run: Run, lm, prompts, trace_path: Path):
    from trail.predictor import collect as C
    from trail.predictor.trace import read_trace

    a = run.args
    before = {r.id for r in read_trace(trace_path).records} if trace_path.exists() else set()
    kw = dict(max_new_tokens=a.max_new_tokens, repetition_penalty=a.repetition_penalty, temperature=0.0,
              batch_size=a.batch_size, max_prompt_tokens=a.max_prompt_tokens,
              deadline=run.end - a.reserve_s)
    t_build = time.monotonic()
    runner = None
    if a.backend == "runner":
        try:
            runner = build_runner(a, lm, prompts)
        except Exception:      # noqa: BLE001
            logger.error("our engine could not be built; collecting with transformers generate:\n%s",
                         traceback.format_exc())
            run.summary["collect_fell_back_to_transformers"] = True
            _free()
    t_start = time.monotonic()
    try:
        trace = C.collect(prompts, trace_path, lm, runner=runner, **kw)
    except Stop:
        raise
    except Exception:
        if runner is None:
            raise
        logger.error("collection through our engine FAILED; finishing with transformers generate:\n%s",
                     traceback.format_exc())
        run.summary["collect_fell_back_to_transformers"] = True
        runner = None
        _free()
        trace = C.collect(prompts, trace_path, lm, **kw)
    wall = time.monotonic() - t_start
    del runner
    _free()
    new = [r for r in trace.records if r.id not in before]
    out_tok, in_tok = sum(r.output_len for r in new), sum(len(r.prompt_ids) for r in new)
    stats = C.summarize(trace)
    stats.update(new_requests=len(new), collect_wall_s=round(wall, 1), engine_build_s=round(t_start - t_build, 1),
                 requests_per_s=len(new) / wall if wall > 0 else math.nan,
                 output_tokens_per_s=out_tok / wall if wall > 0 else math.nan,
                 prompt_plus_output_tokens_per_s=(out_tok + in_tok) / wall if wall > 0 else math.nan,
                 prompts_offered=len(prompts), backend=trace.settings.get("backend"))
    logger.info("collected %d new requests in %.1f s: %.1f req/s, %.0f output tok/s", len(new), wall,
                stats["requests_per_s"], stats["output_tokens_per_s"])
    run.summary["collect"] = stats
    return trace


def _free():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ids(trace, source=None, split=None):
    from trail.predictor.bins import split_of

    return [r.id for r in trace.records if (source is None or r.source == source)
            and (split is None or split_of(r.id) == split)]


def eval_table_row(res: dict) -> dict:
    m = res["methods"]
    adm = res.get("ranking", {}).get("admission", {})
    alive = res.get("ranking", {}).get("alive", {})
    row = {"requests": res["requests"], "filter_mae": m["(vi) filter"]["mae"], "filter_mae_eos": m["(vi) filter"]["mae_eos"],
           "prefill_probe_mae": m["(iv) prefill_probe"]["mae"], "no_feature_mae": m["(iii) no_feature"]["mae"],
           "trail_every8_mae": m["(v) trail_every8"]["mae"],
           "alive_spearman_filter": alive.get("(vi) filter", {}).get("spearman"),
           "admission_spearman": {k: v["spearman"] for k, v in adm.items()},
           "admission_pair_acc": {k: v["pairwise_accuracy"] for k, v in adm.items()}}
    for k, v in m.items():
        if k.startswith("(i) trail_baseline["):
            name = k[len("(i) trail_baseline["):-1]
            row[f"baseline_{name}_mae"] = v["mae"]
            row[f"baseline_{name}_over_filter"] = res["ratio_to_filter"][k]
    return row


def run_all(run: Run) -> None:
    from trail.predictor import embed as E
    from trail.predictor import hf_backend, pipeline
    from trail.predictor.bins import default_edges
    from trail.predictor.probe_file import load_spec
    from trail.predictor.trace import read_trace
    from trail.predictor.train_probe import TrainConfig

    a, S = run.args, run.summary
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    S["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    trace_path = work / "trace.jsonl"
    (work / "collect.done").unlink(missing_ok=True)    # set again once this run's collection ends
    if a.trace:
        seed_trace(a.trace, trace_path)
    st = {}

    with run.phase("load") as ok:
        if ok:
            st["lm"] = hf_backend.load(device=device)
    lm = st.get("lm")
    if lm is None:
        return
    with run.phase("prompts") as ok:
        if ok:
            st["prompts"] = select_prompts(a, lm)
            S["prompts"] = {s: sum(p.source == s for p in st["prompts"]) for s in SOURCES}
    with run.phase("collect", need_s=a.reserve_s * 0.5) as ok:
        if ok and st.get("prompts"):
            st["trace"] = collect_phase(run, lm, st["prompts"], trace_path)
    if "trace" not in st and trace_path.exists():
        st["trace"] = read_trace(trace_path)
    trace = st.get("trace")
    if trace is None or len(trace) == 0:
        return
    pack_trace(trace_path, Path(a.out))           # checkpoint: the trace comes back even if later phases die
    (work / "collect.done").touch()               # a --cross-from run on another GPU starts from here
    edges = default_edges(10, float(trace.max_new_tokens))
    layers = [int(x) for x in a.layers.split(",")]
    cfg = TrainConfig(epochs=a.epochs, patience=a.patience, batch_size=a.train_batch)
    minilm = a.minilm_dir if a.minilm_dir else False

    with run.phase("embed", need_s=60) as ok:
        if ok:
            st["feats"] = E.embed_sampled(lm, trace, layers, a.num_decode, store_device=device)
    feats = st.get("feats")
    if feats is None:
        return
    probes = work / "probes"
    with run.phase("train", need_s=60) as ok:
        if ok:
            summ = pipeline.train_all(feats, trace, lm, probes, sweep=len(layers) > 1, layer=layers[0], edges=edges,
                                      cfg=cfg, device=device, minilm=minilm, select=True, sweep_epochs=a.sweep_epochs,
                                      select_grid={"widths": [int(x) for x in a.widths.split(",")],
                                                   "lrs": [float(x) for x in a.lrs.split(",")]})
            S["train"] = summ
            st["layer"] = summ["layer"]
    if "layer" not in st:
        return
    layer = st["layer"]
    best = load_spec(probes / "probe")
    best_cfg = TrainConfig(**dict(cfg.__dict__, hidden=best.h, lr=best.training["config"]["lr"]))

    extra = {}
    with run.phase("finetune_prompt", need_s=45) as ok:
        if ok:
            from trail.predictor.finetune_prompt import FinetuneConfig, finetune

            kinds = ["boe_ft"] + (["minilm_ft"] if a.minilm_dir else [])
            for kind in kinds:
                logp, pspec, info = finetune(kind, trace.records, edges, trace.max_new_tokens,
                                             embeddings=lm.input_embeddings, minilm_path=a.minilm_dir, device=device,
                                             cfg=FinetuneConfig(epochs=a.ft_epochs), deadline=run.end - 150,
                                             progress=True)
                extra[kind] = (logp, pspec)
                S.setdefault("finetune", {})[kind] = {"val_mae_total": info["val_mae_total"],
                                                      "seconds": info["seconds"], "epochs": len(info["history"])}

    test_ids = _ids(trace, split="test")
    alpaca_ids = _ids(trace, "alpaca")
    dense = {}
    with run.phase("dense_features", need_s=40) as ok:
        if ok:
            want = list(dict.fromkeys(test_ids + alpaca_ids))
            dense[layer] = E.embed_dense(lm, trace.subset(want), layer, store_device=device)
            if "eval_shipped" not in run.skip:
                st["shipped"] = shipped_dense(lm, trace, dense, device)

    evaluate = make_evaluator(run, trace, lm, work, device, dense, extra)

    if layer in dense:
        with run.phase("eval_in_distribution", need_s=25) as ok:
            if ok:
                evaluate("new_on_test", probes, test_ids, layer, record=work / "recorded_test_new.npz")
                for src in SOURCES:
                    ids = _ids(trace, src, "test")
                    if ids:
                        evaluate(f"new_on_test_{src}", probes, ids, layer)
        if st.get("shipped"):
            eval_shipped(run, trace, st["shipped"], evaluate, work)
        cross_phases(run, lm, trace, feats, layer, edges, best_cfg, evaluate, work, device)
    del st["feats"]
    _free()
    with run.phase("judge", need_s=90) as ok:
        if ok:
            from trail.predictor.sim_judge import format_judge, judge

            seeds = [int(x) for x in a.judge_seeds.split(",")]
            for name in ("new", "shipped"):
                npz = work / f"recorded_test_{name}.npz"
                if npz.exists() and run.left() > 45:
                    res = judge(npz, (0.9, 1.0, 1.1), seeds, n=a.judge_n, progress=False)
                    S.setdefault("judge", {})[name] = res
                    (work / f"judge_{name}.md").write_text(format_judge(res) + "\n")


def make_evaluator(run: Run, trace, lm, work: Path, device: str, dense: dict, extra: dict):
    """evaluate(name, probe_dir, ids, dense_layer, record=None, use_extra=True): one eval folder
    under work/eval and its table row in the summary."""
    from trail.predictor import pipeline

    a, evals = run.args, run.summary.setdefault("eval", {})

    def evaluate(name, probe_dir, ids, dense_layer, record=None, use_extra=True):
        res = pipeline.evaluate_dir(trace, probe_dir, lm, work / "eval" / name, ids=ids, device=device,
                                    features=dense.get(dense_layer), extra_prompt=extra if use_extra else None,
                                    record_npz=record, minilm=a.minilm_dir, progress=False, rank_step=a.rank_step,
                                    title=f"{name}: {len(ids)} requests")
        evals[name] = eval_table_row(res)
        return res
    return evaluate


def shipped_dense(lm, trace, dense: dict, device: str):
    """The shipped probe's folder (None if there is none), with dense test features at its layer
    added to `dense`."""
    from trail.predictor import embed as E
    from trail.predictor.probe_file import load_spec, shipped_probe_dir

    try:
        shipped = shipped_probe_dir(lm.model_id)
    except FileNotFoundError as exc:
        logger.warning("no shipped probe to compare with: %s", exc)
        return None
    sl = load_spec(shipped / "probe").layer
    if sl not in dense:
        dense[sl] = E.embed_dense(lm, trace.subset(_ids(trace, split="test")), sl, store_device=device)
    return shipped


def eval_shipped(run: Run, trace, shipped: Path, evaluate, work: Path) -> None:
    """The shipped probe on the same test requests, its per-step predictions recorded."""
    from trail.predictor.probe_file import load_spec

    with run.phase("eval_shipped", need_s=20) as ok:
        if ok:
            sl = load_spec(shipped / "probe").layer
            evaluate("shipped_on_test", shipped, _ids(trace, split="test"), sl,
                     record=work / "recorded_test_shipped.npz", use_extra=False)
            for src in SOURCES:
                ids = _ids(trace, src, "test")
                if ids:
                    evaluate(f"shipped_on_test_{src}", shipped, ids, sl, use_extra=False)


def cross_phases(run: Run, lm, trace, feats, layer: int, edges, cfg, evaluate, work: Path, device: str) -> None:
    """Generalisation (item 6): a probe trained on one dataset only, tested on both."""
    from trail.predictor import pipeline

    alpaca_ids = _ids(trace, "alpaca")
    for src, other in (("sharegpt", "alpaca"), ("alpaca", "sharegpt")):
        with run.phase(f"cross_{src}_only", need_s=25) as ok:
            if not ok:
                continue
            ids = _ids(trace, src)
            sub_trace, sub_feats = trace.subset(ids), feats.select(ids)
            pdir = work / f"probes_{src}_only"
            pipeline.train_all(sub_feats, sub_trace, lm, pdir, layer=layer, sweep=False, edges=edges,
                               cfg=cfg, device=device, minilm=False, dense_val=None)
            for tgt in (src, other):
                tids = _ids(trace, tgt, "test")
                if tids:
                    evaluate(f"{src}_only_on_test_{tgt}", pdir, tids, layer, use_extra=False)
            if other == "alpaca" and alpaca_ids:
                evaluate(f"{src}_only_on_all_alpaca", pdir, alpaca_ids, layer, use_extra=False)


def run_cross(run: Run) -> None:
    """--cross-from: the shipped probe's evaluation and the cross-dataset phases on a GPU of their
    own, beside the main run (which then skips them). The layer / width / lr are given
    (--cross-*), not the main run's choice, which comes too late."""
    from trail.predictor import embed as E
    from trail.predictor import hf_backend
    from trail.predictor.bins import default_edges
    from trail.predictor.trace import read_trace
    from trail.predictor.train_probe import TrainConfig

    a, S = run.args, run.summary
    src, work = Path(a.cross_from), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    S["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lm = None
    with run.phase("load") as ok:
        if ok:
            lm = hf_backend.load(device=device)
    if lm is None:
        return
    with run.phase("wait_for_collection") as ok:
        while ok and not (src / "collect.done").exists():
            if run.left() < 150:
                raise TimeoutError(f"{src / 'collect.done'} did not appear in time")
            time.sleep(5)
    if not (src / "collect.done").exists():
        return
    trace = read_trace(src / "trace.jsonl")
    layer = a.cross_layer
    cfg = TrainConfig(epochs=a.epochs, patience=a.patience, batch_size=a.train_batch, hidden=a.cross_width,
                      lr=a.cross_lr)
    S["cross"] = {"layer": layer, "hidden": a.cross_width, "lr": a.cross_lr, "requests": len(trace)}
    edges = default_edges(10, float(trace.max_new_tokens))
    feats, dense = None, {}
    with run.phase("embed", need_s=60) as ok:
        if ok:
            feats = E.embed_sampled(lm, trace, [layer], a.num_decode, store_device=device)
            want = list(dict.fromkeys(_ids(trace, split="test") + _ids(trace, "alpaca")))
            dense[layer] = E.embed_dense(lm, trace.subset(want), layer, store_device=device)
    if feats is None:
        return
    evaluate = make_evaluator(run, trace, lm, work, device, dense, {})
    if "eval_shipped" not in run.skip:
        shipped = shipped_dense(lm, trace, dense, device)
        if shipped is not None:
            eval_shipped(run, trace, shipped, evaluate, work)
    cross_phases(run, lm, trace, feats, layer, edges, cfg, evaluate, work, device)


# ------------------------------------------------------------------------------------------------
def tables(S: dict) -> str:
    def f(x, spec=".2f"):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [f"# Predictor run ({S.get('device')})", ""]
    c = S.get("collect")
    if c:
        lines += [f"Collection ({c.get('backend')}): {c['requests']} requests in the trace ({c.get('sources')}), "
                  f"{c['new_requests']} new in {c['collect_wall_s']} s (after a {c['engine_build_s']} s engine build "
                  f"and warm-up) = {f(c['requests_per_s'])} req/s, "
                  f"{f(c['output_tokens_per_s'], '.0f')} output tok/s ({f(c['prompt_plus_output_tokens_per_s'], '.0f')} "
                  f"prompt+output tok/s); hit the cap: {f(100 * c['hit_cap_fraction'], '.1f')}%, mean length "
                  f"{f(c['mean_len'], '.0f')}", ""]
    tr = S.get("train") or {}
    if tr.get("sweep"):
        lines += ["Layer sweep (validation MAE, sampled rows): " + ", ".join(
            f"{k}: {f(v)}" for k, v in sorted(tr["sweep"].items(), key=lambda kv: int(kv[0]))) + f"; chosen {tr.get('layer')}", ""]
    if tr.get("config_search"):
        lines += ["Width / lr on validation: " + ", ".join(
            f"h={r['hidden']} lr={r['lr']:g}: {f(r['val_mae_samples'])} (epoch {r['best_epoch']})"
            for r in tr["config_search"]), ""]
    if tr.get("filter_fit"):
        lines += [f"Filter fit on validation (per-request MAE): alpha {tr['filter_fit']['alpha']}, eps "
                  f"{tr['filter_fit']['eps']}, MAE {f(tr['filter_fit']['mae'])}", ""]
    ev = S.get("eval") or {}
    if ev:
        names = sorted({k[len("baseline_"):-len("_mae")] for r in ev.values() for k in r
                        if k.startswith("baseline_") and k.endswith("_mae")})
        lines += ["| probe on requests | n | filter MAE | eos | prefill probe | " + " | ".join(f"{n} baseline (x filter)" for n in names)
                  + " | alive spearman | admission spearman (prompt predictors / prefill probe) |",
                  "|---|---|---|---|---|" + "---|" * len(names) + "---|---|"]
        for k, r in ev.items():
            lines.append(f"| {k} | {r['requests']} | {f(r['filter_mae'])} | {f(r['filter_mae_eos'])} | "
                         f"{f(r['prefill_probe_mae'])} | " + " | ".join(
                             f"{f(r.get(f'baseline_{n}_mae'))} ({f(r.get(f'baseline_{n}_over_filter'))}x)" for n in names)
                         + f" | {f(r['alive_spearman_filter'], '.3f')} | "
                         + ", ".join(f"{n} {f(v, '.3f')}" for n, v in r["admission_spearman"].items()) + " |")
        lines.append("")
    for name, res in (S.get("judge") or {}).items():
        lines += [f"Simulator ({name} probe's recorded predictions):", ""]
        for load, rows in res["loads"].items():
            lines.append(f"- load {load}: oracle fraction trail {f(rows['trail'].get('oracle_fraction'), '.3f')}, "
                         f"sjf_prompt {f(rows['sjf_prompt'].get('oracle_fraction'), '.3f')}; mean/fcfs trail "
                         f"{f(rows['trail']['mean_latency_vs_fcfs'], '.3f')}, oracle {f(rows['oracle']['mean_latency_vs_fcfs'], '.3f')}")
        lines.append("")
    if S.get("errors"):
        lines += ["Errors: " + json.dumps(S["errors"]), ""]
    if S.get("skipped"):
        lines += ["Skipped: " + json.dumps(S["skipped"]), ""]
    lines.append("Phase seconds: " + json.dumps(S.get("phases")))
    return "\n".join(lines) + "\n"


def pack_trace(trace_path: Path, out: Path) -> list[Path]:
    """trace.jsonl -> out/trace.jsonl.gz, or valid partial traces trace.partN.jsonl.gz (each with
    the header) when one file would pass 15 MiB."""
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("trace*.jsonl.gz")):
        old.unlink()
    if not trace_path.exists():
        return []
    one = out / "trace.jsonl.gz"
    with open(trace_path, "rb") as f, gzip.open(one, "wb", compresslevel=9) as g:
        shutil.copyfileobj(f, g)
    if one.stat().st_size <= MAX_PART_BYTES:
        return [one]
    lines = trace_path.read_text(encoding="utf-8").split("\n")
    head, body = lines[0], [x for x in lines[1:] if x.strip()]
    parts = math.ceil(one.stat().st_size / (MAX_PART_BYTES * 0.9))
    one.unlink()
    paths = []
    per = math.ceil(len(body) / parts)
    for k in range(parts):
        p = out / f"trace.part{k}.jsonl.gz"
        with gzip.open(p, "wt", encoding="utf-8", compresslevel=9) as g:
            g.write(head + "\n" + "".join(x + "\n" for x in body[k * per: (k + 1) * per]))
        paths.append(p)
    return paths


def pack(run: Run) -> None:
    a, S = run.args, run.summary
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    S["total_s"] = round(time.monotonic() - run.t0, 1)
    (work / "predictor_run.json").write_text(json.dumps(S, indent=1, default=str))
    (work / "predictor_tables.md").write_text(tables(S))
    if not a.cross_from:
        pack_trace(work / "trace.jsonl", out)
    with tarfile.open(out / "predictor_results.tar.gz", "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and p.name != "trace.jsonl":     # the trace travels as its own file(s)
                tar.add(p, arcname=str(p.relative_to(work)))
    shutil.copy(work / "predictor_run.json", out / "predictor_run.json")
    shutil.copy(work / "predictor_tables.md", out / "predictor_tables.md")
    logger.info("packed results into %s: %s", out, sorted(x.name for x in out.iterdir()))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = Run(args)

    def on_term(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        run_cross(run) if args.cross_from else run_all(run)
    except Stop:
        logger.warning("SIGTERM: packing what is done")
        rc = 3
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)      # packing must not be interrupted
        pack(run)
    print(tables(run.summary))
    return 1 if run.summary["errors"] and rc == 0 else rc


if __name__ == "__main__":
    sys.exit(main())
