"""The predictor pipeline's steps joined up: what `trail train-probe` / `trail eval-probe` run,
and what the one-go GPU driver (bench/predictor_gpu_run.py) runs after collect and embed.

A probe directory holds `probe.{safetensors,json}` (layer probe), `prompt_boe.*`,
`prompt_minilm.*` (when the encoder is available), and with a sweep `sweep.json` +
`mae_vs_layer.png`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from trail.predictor import embed as E
from trail.predictor import eval_probe, plots
from trail.predictor import prompt_predictors as PP
from trail.predictor.bins import default_edges
from trail.predictor.probe_file import load_probe, paths, save_probe
from trail.predictor.trace import Trace
from trail.predictor.train_probe import TrainConfig, fit_filter, split_mask, sweep_layers, train_layer_probe

logger = logging.getLogger(__name__)


def train_all(feats: E.SampledFeatures, trace: Trace, lm, out_dir: str | os.PathLike, *,
              layer: int | None = None, sweep: bool = False, edges: list[float] | None = None,
              cfg: TrainConfig | None = None, device: str | torch.device = "cpu",
              minilm: str | os.PathLike | None | bool = None, fit_grid: dict | None = None,
              progress: bool = True) -> dict:
    """Train the layer probe (one per layer with `sweep`, keeping the best on validation), fit
    alpha/eps, train the prompt predictors, and save everything under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or TrainConfig()
    max_new = trace.max_new_tokens
    edges = edges or default_edges(10, float(max_new))
    if [r.id for r in trace.records] != feats.ids:
        raise ValueError("features and trace disagree on the requests (embed this trace first)")
    summary: dict = {"out_dir": str(out)}
    if sweep:
        trained = sweep_layers(feats, feats.layers, edges, cfg, lm.model_id, max_new, device, progress)
        maes = {k: v[1].validation["mae_samples"] for k, v in trained.items()}
        layer = min(maes, key=maes.get)
        (out / "sweep.json").write_text(json.dumps({"val_mae_samples": maes, "chosen": layer}, indent=1))
        plots.mae_vs_layer(maes, out / "mae_vs_layer.png", f"{lm.model_id}: probe validation MAE")
        mlp, spec = trained[layer]
        summary["sweep"] = maes
    else:
        if layer is None:
            layer = feats.layers[len(feats.layers) // 3] if len(feats.layers) > 1 else feats.layers[0]
            logger.info("no layer given and no sweep: using layer %d", layer)
        mlp, spec = train_layer_probe(feats, layer, edges, cfg, lm.model_id, max_new, device, progress)
    summary["layer"] = layer
    spec.training["trace"] = {k: trace.settings.get(k) for k in ("model", "max_new_tokens", "temperature",
                                                                  "repetition_penalty", "backend")}
    spec.training["trace_requests"] = len(trace)

    val = trace.subset([i for i, v in zip(feats.ids, split_mask(feats.ids, "val").tolist()) if v])
    if len(val):
        dense_val = E.embed_dense(lm, val, layer, store_device=device, progress=progress)
        best = fit_filter(mlp, spec, dense_val, device=device, progress=progress, **(fit_grid or {}))
        summary["filter_fit"] = best
    else:
        logger.warning("no validation requests: alpha/eps left at %g/%g", spec.alpha, spec.eps)
    save_probe(out / "probe", mlp, spec)

    summary["prompt_predictors"] = train_prompt_predictors(trace, lm, out, edges, cfg, device, minilm)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def train_prompt_predictors(trace: Trace, lm, out: Path, edges, cfg, device, minilm) -> dict:
    done = {}
    recs = trace.records
    x = PP.prompt_features("prompt_boe", recs, embeddings=lm.input_embeddings.detach().float().to(device))
    mlp, spec = PP.train_prompt_predictor("prompt_boe", recs, x, edges, cfg, lm.model_id, trace.max_new_tokens)
    save_probe(out / "prompt_boe", mlp, spec)
    done["prompt_boe"] = spec.validation
    if minilm is False:
        logger.info("prompt predictor (a) minilm: skipped (disabled)")
        return done
    try:
        enc = PP.MiniLMEncoder(None if minilm is True else minilm, device)
    except (FileNotFoundError, OSError) as exc:
        logger.warning("prompt predictor (a) minilm SKIPPED: %s (train it later on CPU from the trace "
                       "with `trail train-probe --prompt-only`)", exc)
        done["prompt_minilm"] = f"skipped: {exc}"
        return done
    x = enc.encode([r.prompt for r in recs], progress=False).to(device)
    mlp, spec = PP.train_prompt_predictor("prompt_minilm", recs, x, edges, cfg, lm.model_id,
                                          trace.max_new_tokens, encoder_name=PP.MINILM_NAME)
    save_probe(out / "prompt_minilm", mlp, spec)
    done["prompt_minilm"] = spec.validation
    return done


def evaluate_dir(trace: Trace, probe_dir: str | os.PathLike, lm, out_dir: str | os.PathLike, *,
                 split: str = "test", device: str | torch.device = "cpu",
                 minilm: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """eval-probe: every method of eval_probe on the `split` requests of `trace`, with the probe
    and prompt predictors found in `probe_dir` (or a probe path). Writes JSON, table, plot."""
    probe_path = Path(probe_dir)
    if probe_path.is_dir():
        probe_path = probe_path / "probe"
    mlp, spec = load_probe(probe_path, expect_model=lm.model_id, expect_d=lm.hidden_size,
                           expect_kind="layer", device=device)
    if trace.max_new_tokens != spec.max_new_tokens:
        logger.warning("trace max_new_tokens %d != probe's %d", trace.max_new_tokens, spec.max_new_tokens)
    keep = eval_probe.select_requests([r.id for r in trace.records], split)
    sub = Trace(trace.settings, [r for r, k in zip(trace.records, keep) if k])
    if not len(sub):
        raise ValueError(f"no requests of the trace fall in split {split!r}")
    dense = E.embed_dense(lm, sub, spec.layer, store_device=device, progress=progress)
    logps, pspecs = {}, {}
    emb = lm.input_embeddings.detach().float().to(device)
    for name in ("prompt_boe", "prompt_minilm"):
        path = paths(probe_path.with_name(name))[1]
        if not path.is_file():
            continue
        try:
            pp = PP.PromptPredictor(path, embeddings=emb, minilm_path=minilm, expect_model=lm.model_id,
                                    device=device)
        except (FileNotFoundError, OSError) as exc:
            logger.warning("prompt predictor %s not evaluated: %s", name, exc)
            continue
        key = name.replace("prompt_", "")
        logps[key], pspecs[key] = pp.log_probs(sub.records), pp.spec
    res = eval_probe.evaluate(dense, mlp, spec, logps, pspecs, device=device)
    res["split"], res["trace_model"] = split, trace.settings.get("model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    table = eval_probe.format_table(res)
    (out / "eval.summary.txt").write_text(table + "\n")
    plots.mae_vs_generated(res["curves"]["mae"], res["curves"]["bucket"], out / "mae_vs_generated.png",
                           f"{lm.model_id}, layer {spec.layer}, {res['requests']} requests ({split})")
    logger.info("\n%s", table)
    return res
