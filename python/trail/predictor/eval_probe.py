"""`trail eval-probe`: how well each method estimates the remaining output length at every
decode position of a trace's requests.

Positions: g = 0 (prompt time / prefill) .. L - 1 for a request of L output tokens; the truth is
L - g. MAE is defined once: per request the mean |error| over its positions, then the mean over
requests (`mae`); `mae_pooled` averages over all positions of all requests. Each figure is
reported over all requests and over those that ended with EOS. Methods:
  (i)   trail_baseline[P]  prompt predictor P's expected total minus generated, floored at 0
                           (the comparison behind TRAIL's 2.66x)
  (ii)  prompt_filter[P]   P's distribution pushed through the filter's predict step, no evidence
  (iii) no_feature         the training set's E[L - g | L > g]
  (iv)  prefill_probe      the probe on the prompt mean, then the predict step only
  (v)   trail_every8, trail_every1   TRAIL's plain-product refinement
  (vi)  filter             our filter (tempered by alpha, divided by pi, floored) every step
Every filter-based estimate is `trail_kernels.probe_reference.probe_reference` (via filter_adapter).

Ranking (what a scheduler uses, `ranking.py`): `ranking.alive` — per method, the rank correlation
between predicted and true remaining length among the requests alive at the same position g;
`ranking.admission` — per prompt-time predictor (the prompt predictors' expected totals, the
prefill probe's first readout), the ranking of the true totals at admission.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from tqdm.auto import tqdm

from trail.predictor import bins as B
from trail.predictor import ranking as R
from trail.predictor.embed import DenseFeatures
from trail.predictor.filter_adapter import (NEVER, per_request_abs_err, positions, probe_params,
                                            run_filter, truth)
from trail.predictor.probe_file import ProbeMLP, ProbeSpec

logger = logging.getLogger(__name__)

CURVE_BUCKET = 16


def no_feature_estimate(spec: ProbeSpec, g: torch.Tensor) -> torch.Tensor:
    """E[L - g | L > g] from the training length histogram stored in the probe file."""
    counts = spec.training.get("train_length_counts")
    if not counts:
        raise ValueError("probe file has no training.train_length_counts (needed for the no-feature baseline)")
    c = torch.tensor(counts, dtype=torch.float64)
    lengths = torch.arange(len(c), dtype=torch.float64)
    # tail sums over L > g: S0(g) = sum c_L, S1(g) = sum L c_L
    s0 = torch.flip(torch.cumsum(torch.flip(c, [0]), 0), [0])
    s1 = torch.flip(torch.cumsum(torch.flip(c * lengths, [0]), 0), [0])
    gg = g.long().clamp(0, len(c) - 1)
    nxt = (gg + 1).clamp(max=len(c) - 1)
    tail0 = torch.where(gg + 1 < len(c), s0[nxt], torch.zeros_like(s0[nxt]))
    tail1 = torch.where(gg + 1 < len(c), s1[nxt], torch.zeros_like(s1[nxt]))
    est = torch.where(tail0 > 0, tail1 / tail0.clamp_min(1e-12) - gg.double(), torch.ones_like(tail0))
    return est.float()


def _summ(est: torch.Tensor, dense: DenseFeatures, eos_req: torch.Tensor, eos_pos: torch.Tensor) -> dict:
    per = per_request_abs_err(est, dense)
    err = (est.float().cpu() - truth(dense)).abs()
    out = {"mae": float(per.mean()), "mae_pooled": float(err.mean())}
    out["mae_eos"] = float(per[eos_req].mean()) if eos_req.any() else math.nan
    out["mae_pooled_eos"] = float(err[eos_pos].mean()) if eos_pos.any() else math.nan
    return out


def _curve(est: torch.Tensor, dense: DenseFeatures, g: torch.Tensor, max_new: int) -> list[float]:
    err = (est.float().cpu() - truth(dense)).abs()
    buckets = g // CURVE_BUCKET
    nb = max_new // CURVE_BUCKET + 1
    s = torch.zeros(nb, dtype=torch.float64).index_add_(0, buckets, err.double())
    c = torch.zeros(nb, dtype=torch.float64).index_add_(0, buckets, torch.ones_like(err, dtype=torch.float64))
    return [float(a / b) if b > 0 else math.nan for a, b in zip(s, c)]


def evaluate(dense: DenseFeatures, mlp: ProbeMLP, spec: ProbeSpec, prompt_log_probs: dict | None = None,
             prompt_specs: dict | None = None, device: str | torch.device = "cpu", progress: bool = False,
             estimates_out: dict | None = None, rank_step: int = 8) -> dict:
    """All methods on the requests in `dense`. `prompt_log_probs[name]`: [N, K] log bin
    distributions of the total length from prompt predictor `name` (its spec in prompt_specs).
    `estimates_out`: a dict to receive every method's per-position estimates (fp32 [sum L],
    aligned with dense.feats) and the prompt-time totals (`prompt_total[name]`, [N])."""
    if dense.layer != spec.layer:
        raise ValueError(f"features are from layer {dense.layer}, the probe reads layer {spec.layer}")
    if dense.feats.shape[1] != spec.d:
        raise ValueError(f"features have d={dense.feats.shape[1]}, the probe expects d={spec.d}")
    prompt_log_probs, prompt_specs = prompt_log_probs or {}, prompt_specs or {}
    max_new = int(spec.max_new_tokens)
    g = positions(dense)
    lens = dense.total_len.long().cpu()
    eos_req = ~dense.hit_cap.bool().cpu()
    seg = torch.repeat_interleave(torch.arange(len(lens)), lens)
    eos_pos = eos_req[seg]
    first = dense.cu.long().cpu()[:-1]
    est: dict[str, torch.Tensor] = {}
    totals: dict[str, torch.Tensor] = {}     # prompt-time expected totals, by prompt predictor
    bar = tqdm(total=2 * len(prompt_log_probs) + 4, desc="eval methods", unit="method", disable=not progress,
               leave=False)

    for name, logp in prompt_log_probs.items():
        pspec = prompt_specs[name]
        if [float(e) for e in pspec.bin_edges] != [float(e) for e in spec.bin_edges]:
            raise ValueError(f"prompt predictor {name} has bin edges {pspec.bin_edges}, the probe {spec.bin_edges}")
        total = totals[name] = (logp.exp().cpu() * torch.tensor(pspec.bin_values)).sum(-1)
        est[f"(i) trail_baseline[{name}]"] = (total[seg] - g.float()).clamp_min(0)
        est[f"(ii) prompt_filter[{name}]"] = run_filter(
            probe_params(mlp, spec, update_every=NEVER, device=device), dense, max_new, init_log_post=logp, progress=progress).cpu()
        bar.update(2)
    est["(iii) no_feature"] = no_feature_estimate(spec, g)
    est["(iv) prefill_probe"] = run_filter(probe_params(mlp, spec, update_every=NEVER, device=device),
                                           dense, max_new, progress=progress).cpu()
    bar.update(1)
    est["(v) trail_every8"] = run_filter(probe_params(mlp, spec, rule="trail", update_every=8, device=device),
                                         dense, max_new, progress=progress).cpu()
    bar.update(1)
    est["(v) trail_every1"] = run_filter(probe_params(mlp, spec, rule="trail", update_every=1, device=device),
                                         dense, max_new, progress=progress).cpu()
    bar.update(1)
    filt, post_arg = run_filter(probe_params(mlp, spec, device=device), dense, max_new, record_argmax=True,
                                progress=progress)
    est["(vi) filter"] = filt.cpu()
    bar.update(1)
    bar.close()

    methods = {k: _summ(v, dense, eos_req, eos_pos) for k, v in est.items()}
    curves = {k: _curve(v, dense, g, max_new) for k, v in est.items()}

    # prompt-time totals and bin accuracy
    true_total_bin = B.bin_index(lens.float(), spec.bin_edges)
    prompt_time = {"no_feature": _total_stats(est["(iii) no_feature"][first], lens, eos_req, None, None)}
    for name, logp in prompt_log_probs.items():
        prompt_time[name] = _total_stats(totals[name], lens, eos_req, logp.argmax(-1).cpu(), true_total_bin)
    prompt_time["prefill_probe"] = _total_stats(est["(iv) prefill_probe"][first], lens, eos_req,
                                                post_arg.cpu()[first], true_total_bin)
    totals["prefill_probe"] = est["(iv) prefill_probe"][first]
    started = lens > 0
    ranking = {"admission": {k: R.ranking_stats(v[started].numpy(), lens[started].numpy()) for k, v in totals.items()},
               "alive": {}}
    cu_np, lens_np = dense.cu.long().cpu().numpy(), lens.numpy()
    for k, v in tqdm(est.items(), desc="rank correlation", unit="method", disable=not progress, leave=False):
        a = R.alive_rank_correlation(v.numpy(), cu_np, lens_np, step=rank_step)
        ranking["alive"][k] = {"spearman": a["spearman"], "kendall_tau_b": a["kendall_tau_b"], "steps": a["steps"],
                               "step": a["step"]}
    if estimates_out is not None:
        estimates_out.update(est)
        estimates_out["prompt_total"] = totals
    with torch.no_grad():
        q_arg = torch.cat([mlp(dense.feats[s: s + 65536].to(mlp.fc1.weight.device)).argmax(-1).cpu()
                           for s in range(0, dense.feats.shape[0], 65536)]) if dense.feats.shape[0] else torch.zeros(0, dtype=torch.long)
    true_bin = B.bin_index(truth(dense), spec.bin_edges)
    bin_acc = {"probe_q_all_positions": _acc(q_arg, true_bin, eos_pos),
               "filter_posterior_all_positions": _acc(post_arg.cpu(), true_bin, eos_pos)}
    ref = methods["(vi) filter"]["mae"]
    ratios = {k: (v["mae"] / ref if ref > 0 else math.nan) for k, v in methods.items()}
    return {"requests": len(dense.ids), "eos_requests": int(eos_req.sum()), "positions": int(g.numel()),
            "layer": spec.layer, "alpha": spec.alpha, "eps": spec.eps, "max_new_tokens": max_new,
            "methods": methods, "ratio_to_filter": ratios, "prompt_time_total": prompt_time,
            "bin_accuracy": bin_acc, "ranking": ranking, "curves": {"bucket": CURVE_BUCKET, "mae": curves}}


def _acc(pred, true, eos_mask):
    ok = (pred == true).float()
    return {"all": float(ok.mean()) if ok.numel() else math.nan,
            "eos": float(ok[eos_mask].mean()) if eos_mask.any() else math.nan}


def _total_stats(total, lens, eos_req, arg, true_bin):
    err = (total.float() - lens.float()).abs()
    out = {"mae_total": float(err.mean()),
           "mae_total_eos": float(err[eos_req].mean()) if eos_req.any() else math.nan}
    if arg is not None:
        out["bin_accuracy"] = _acc(arg, true_bin, eos_req)
    return out


def format_table(res: dict) -> str:
    lines = [f"{res['requests']} requests ({res['eos_requests']} ended with EOS), {res['positions']} positions, "
             f"layer {res['layer']}, alpha {res['alpha']:g}, eps {res['eps']:g}",
             f"{'method':34s} {'MAE':>8s} {'pooled':>8s} {'MAE eos':>8s} {'pool eos':>8s} {'x filter':>8s}"]
    for k, v in res["methods"].items():
        lines.append(f"{k:34s} {v['mae']:8.2f} {v['mae_pooled']:8.2f} {v['mae_eos']:8.2f} "
                     f"{v['mae_pooled_eos']:8.2f} {res['ratio_to_filter'][k]:8.2f}")
    lines.append("total length at prompt time (MAE all / eos, bin accuracy all):")
    for k, v in res["prompt_time_total"].items():
        acc = v.get("bin_accuracy", {}).get("all", math.nan)
        lines.append(f"  {k:32s} {v['mae_total']:8.2f} {v['mae_total_eos']:8.2f} {acc:8.3f}")
    for k, v in res["bin_accuracy"].items():
        lines.append(f"bin accuracy {k}: {v['all']:.3f} (eos {v['eos']:.3f})")
    rk = res.get("ranking")
    if rk:
        lines.append("ranking at admission (prompt-time total vs true total): spearman, kendall tau-b, pair accuracy")
        for k, v in rk["admission"].items():
            lines.append(f"  {k:32s} {v['spearman']:8.3f} {v['kendall_tau_b']:8.3f} {v['pairwise_accuracy']:8.3f}")
        lines.append("rank correlation among requests alive at the same step (mean over g): spearman, kendall tau-b")
        for k, v in rk["alive"].items():
            lines.append(f"  {k:32s} {v['spearman']:8.3f} {v['kendall_tau_b']:8.3f}")
    return "\n".join(lines)


def select_requests(ids: Sequence[str], split: str) -> list[bool]:
    if split == "all":
        return [True] * len(ids)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be all, train, val or test, got {split!r}")
    return [B.split_of(i) == split for i in ids]
