"""The predictor pipeline's steps joined up: what `trail train-probe` / `trail eval-probe` run,
and what the one-go GPU driver (bench/predictor_gpu_run.py) runs after collect and embed.

A probe directory holds `probe.{safetensors,json}` (layer probe), `prompt_boe.*`,
`prompt_minilm.*` (when the encoder is available), and with a sweep `sweep.json` +
`mae_vs_layer.png`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from trail.jsonio import write_json
from trail.predictor import embed as E
from trail.predictor import eval_probe, plots
from trail.predictor import prompt_predictors as PP
from trail.predictor.bins import default_edges, encode_id_set, split_of
from trail.predictor.probe_file import load_probe, paths, resolve_layer_probe, save_probe
from trail.predictor.trace import Trace
from trail.predictor.train_probe import (TrainConfig, fit_filter, select_config, split_mask, sweep_layers,
                                        train_layer_probe)
from trail.predictor.train_prompt import train_prompt_predictor

logger = logging.getLogger(__name__)


def train_all(feats: E.SampledFeatures, trace: Trace, lm, out_dir: str | os.PathLike, *,
              layer: int | None = None, sweep: bool = False, edges: list[float] | None = None,
              cfg: TrainConfig | None = None, device: str | torch.device = "cpu",
              minilm: str | os.PathLike | None | bool = None, fit_grid: dict | None = None,
              progress: bool = True, select: bool = False, select_grid: dict | None = None,
              dense_val: E.DenseFeatures | None = None, sweep_epochs: int | None = None) -> dict:
    """Train the layer probe (one per layer with `sweep`, keeping the best on validation; with
    `select` then a width x learning-rate search on that layer, on validation), fit alpha/eps on
    the validation requests' dense features (`dense_val`, else embedded here), train the prompt
    predictors, and save everything under `out_dir`. Labels are censored at the cap.
    `sweep_epochs`: a shorter schedule for the layer sweep alone (it only ranks layers)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or TrainConfig()
    max_new = trace.max_new_tokens
    edges = edges or default_edges(10, float(max_new))
    if [r.id for r in trace.records] != feats.ids:
        raise ValueError("features and trace disagree on the requests (embed this trace first)")
    summary: dict = {"out_dir": str(out)}
    if sweep:
        scfg = TrainConfig(**dict(cfg.__dict__, epochs=sweep_epochs)) if sweep_epochs else cfg
        trained = sweep_layers(feats, feats.layers, edges, scfg, lm.model_id, max_new, device, progress)
        maes = {k: v[1].validation["mae_samples"] for k, v in trained.items()}
        layer = min(maes, key=maes.get)
        write_json(out / "sweep.json", {"val_mae_samples": maes, "chosen": layer}, indent=1)
        plots.mae_vs_layer(maes, out / "mae_vs_layer.png", f"{lm.model_id}: probe validation MAE")
        mlp, spec = trained[layer]
        summary["sweep"] = maes
    else:
        if layer is None:
            layer = feats.layers[len(feats.layers) // 3] if len(feats.layers) > 1 else feats.layers[0]
            logger.info("no layer given and no sweep: using layer %d", layer)
        if not select:          # select_config trains the layer's probe itself
            mlp, spec = train_layer_probe(feats, layer, edges, cfg, lm.model_id, max_new, device, progress)
    if select:
        mlp, spec, runs = select_config(feats, layer, edges, cfg, lm.model_id, max_new, device, progress=progress,
                                        **(select_grid or {}))
        summary["config_search"] = runs
    summary["layer"] = layer
    spec.training["trace"] = {k: trace.settings.get(k) for k in ("model", "max_new_tokens", "temperature", "top_p",
                                                                  "repetition_penalty", "chat_template", "backend")}
    spec.training["trace_requests"] = len(trace)
    spec.training["seen_ids"] = encode_id_set([i for i in feats.ids if split_of(i) != "test"])

    val = trace.subset([i for i, v in zip(feats.ids, split_mask(feats.ids, "val").tolist()) if v])
    if len(val):
        if dense_val is None:
            dense_val = E.embed_dense(lm, val, layer, store_device=device, progress=progress)
        elif dense_val.layer != layer:
            raise ValueError(f"dense_val is of layer {dense_val.layer}, the chosen layer is {layer}")
        else:
            dense_val = dense_val.select([r.id for r in val.records])
        best = fit_filter(mlp, spec, dense_val, device=device, progress=progress, **(fit_grid or {}))
        summary["filter_fit"] = best
    else:
        logger.warning("no validation requests: alpha/eps left at %g/%g", spec.alpha, spec.eps)
    save_probe(out / "probe", mlp, spec)

    summary["prompt_predictors"] = train_prompt_predictors(trace, lm, out, edges, cfg, device, minilm, progress)
    write_json(out / "train_summary.json", summary, indent=1, default=str)
    return summary


def train_prompt_predictors(trace: Trace, lm, out: Path, edges, cfg, device, minilm, progress: bool = True) -> dict:
    done = {}
    recs = trace.records
    x = PP.prompt_features("prompt_boe", recs, embeddings=lm.input_embeddings.detach().float().to(device))
    mlp, spec = train_prompt_predictor("prompt_boe", recs, x, edges, cfg, lm.model_id, trace.max_new_tokens)
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
    x = enc.encode([r.prompt for r in recs], progress=progress).to(device)
    mlp, spec = train_prompt_predictor("prompt_minilm", recs, x, edges, cfg, lm.model_id,
                                       trace.max_new_tokens, encoder_name=PP.MINILM_NAME)
    save_probe(out / "prompt_minilm", mlp, spec)
    done["prompt_minilm"] = spec.validation
    return done


def evaluate_dir(trace: Trace, probe_dir: str | os.PathLike, lm, out_dir: str | os.PathLike, *,
                 split: str = "auto", device: str | torch.device = "cpu",
                 minilm: str | os.PathLike | None = None, progress: bool = True,
                 features: str | os.PathLike | E.DenseFeatures | None = None, ids=None, limit: int | None = None,
                 record_npz: str | os.PathLike | None = None, extra_prompt: dict | None = None,
                 title: str | None = None, rank_step: int = 8) -> dict:
    """eval-probe: every method of eval_probe on the requests `eval_select.choose_requests` keeps
    (default: all the probe never saw), with the probe and prompt predictors found in `probe_dir`
    (or a probe path). `features`: dense features of the probe's layer from `trail embed
    --dense-layer` (a path or the object), used instead of running the forward. `record_npz`:
    also write the filter's per-step predictions in the simulator's format. `extra_prompt`:
    {name: (log_probs [N_trace, K] aligned with trace.records, spec)} of more prompt predictors
    (e.g. fine-tuned ones that are not probe files). Writes eval.json, the table and the plot."""
    from trail.predictor import eval_select

    probe_path, _ = resolve_layer_probe(probe_dir)
    mlp, spec = load_probe(probe_path, expect_model=lm.model_id, expect_d=lm.hidden_size,
                           expect_kind="layer", device=device)
    diff = eval_select.warn_on_settings(trace, spec)
    sub, how = eval_select.choose_requests(trace, spec, split, ids=ids, limit=limit)
    dense = _dense_for(sub, spec, lm, features, device, progress)
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
    if extra_prompt:
        pos = {r.id: i for i, r in enumerate(trace.records)}
        rows = torch.tensor([pos[r.id] for r in sub.records], dtype=torch.long)
        for name, (lp, ps) in extra_prompt.items():
            logps[name], pspecs[name] = lp.cpu()[rows], ps
    est: dict = {}
    res = eval_probe.evaluate(dense, mlp, spec, logps, pspecs, device=device, progress=progress, estimates_out=est,
                              rank_step=rank_step)
    res.update(split=split, selection=how, trace_model=trace.settings.get("model"), settings_differences=diff,
               probe=str(probe_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if record_npz:
        from trail.predictor.recorded import save_recorded

        init = "boe" if "boe" in est["prompt_total"] else "prefill_probe"
        save_recorded(record_npz, sub.records, dense.cu, est["(vi) filter"], est["prompt_total"][init],
                      {"model": lm.model_id, "layer": spec.layer, "alpha": spec.alpha, "eps": spec.eps,
                       "max_new_tokens": spec.max_new_tokens, "prompt_predictor": init, "probe": str(probe_path),
                       "selection": how})
        res["recorded_npz"] = str(record_npz)
    write_json(out / "eval.json", res, indent=1)
    table = eval_probe.format_table(res)
    (out / "eval.summary.txt").write_text(table + "\n")
    plots.mae_vs_generated(res["curves"]["mae"], res["curves"]["bucket"], out / "mae_vs_generated.png",
                           title or f"{lm.model_id}, layer {spec.layer}, {res['requests']} requests")
    logger.info("\n%s", table)
    return res


def _dense_for(sub: Trace, spec, lm, features, device, progress) -> E.DenseFeatures:
    """Dense features of `sub` at the probe's layer: from `features` when given (checked against
    the trace), else by the forward."""
    if features is None:
        return E.embed_dense(lm, sub, spec.layer, store_device=device, progress=progress)
    dense = features if isinstance(features, E.DenseFeatures) else E.DenseFeatures.load(features, device=device)
    if dense.layer != spec.layer:
        raise ValueError(f"features are of layer {dense.layer}, the probe reads layer {spec.layer}: "
                         f"`trail embed TRACE --dense-layer {spec.layer}`")
    if dense.meta.get("model") not in (None, lm.model_id):
        logger.warning("features were embedded with %s, evaluating with %s", dense.meta.get("model"), lm.model_id)
    try:
        dense = dense.select([r.id for r in sub.records])
    except KeyError as exc:
        raise ValueError(f"features file lacks requests to evaluate: {exc.args[0]}; embed them with "
                         f"`trail embed TRACE --dense-layer {spec.layer} --split all`") from None
    want = torch.tensor([r.output_len for r in sub.records], dtype=torch.int32)
    if not torch.equal(dense.total_len.cpu().int(), want):
        raise ValueError("features and trace disagree on output lengths: the features were embedded from another trace")
    logger.info("reusing %d requests' features (%d positions) from the features file", len(dense.ids),
                dense.feats.shape[0])
    return dense
