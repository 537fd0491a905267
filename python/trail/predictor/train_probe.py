"""`trail train-probe`: the probe MLP over remaining-length bins, the layer sweep, and the fit of
the filter's alpha / eps.

Training rows are the sampled probe inputs of `embed.SampledFeatures` (prompt mean at g = 0 and
16 decode positions per request), labels the bins of the remaining length L - g. A request that
hit the max_new_tokens cap is right-censored: its natural remaining length is only known to be
>= L - g, so its rows are trained on the probability mass of every bin at or above that bin
(`censored_nll`), never on the cap as if it were the answer. The stored prior `pi` is the
trained classifier's mean bin distribution over the training rows (with censored labels the
label histogram is not the natural-length prior). Requests are
split by id hash (`bins.split_of`): train 80%, validation 10% (early stopping on validation MAE,
the choice of width / learning rate (`select_config`), alpha/eps fitting), test 10% (never
touched here; `trail eval-probe` reports on it). Features are
standardised for training and the standardisation is folded into fc1, so the stored probe takes
raw layer states. After the MLP, alpha and eps are chosen on the validation requests by running
the filter (`filter_adapter`, i.e. `trail_kernels.probe_reference.probe_reference`) over every position.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from trail.predictor import bins as B
from trail.predictor.embed import DenseFeatures, SampledFeatures
from trail.predictor.probe_file import ProbeMLP, ProbeSpec

logger = logging.getLogger(__name__)

ALPHAS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
# the 2,000-request fit chose eps = 0.01, the grid's largest: larger floors let the posterior
# follow the per-step readout sooner (on the 2026-11-27 test split the raw readout beat the filter)
EPSS = (1e-4, 1e-2, 3e-2, 1e-1)


@dataclass
class TrainConfig:
    hidden: int = 512
    epochs: int = 40
    patience: int = 6
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 512
    seed: int = 0


WIDTHS = (256, 512, 1024)
LRS = (1e-3, 3e-4)


def censored_nll(logits: torch.Tensor, y: torch.Tensor, censored: torch.Tensor | None) -> torch.Tensor:
    """Mean negative log-likelihood of the labels: -log p[y] for an observed bin, -log sum_{k >= y}
    p[k] for a right-censored row (the natural length is at least what was seen)."""
    logp = torch.log_softmax(logits.float(), -1)
    exact = logp.gather(1, y[:, None]).squeeze(1)
    if censored is None or not bool(censored.any()):
        return -exact.mean()
    k = torch.arange(logits.shape[1], device=logits.device)
    tail = torch.logsumexp(logp.masked_fill(k[None, :] < y[:, None], float("-inf")), -1)
    return -torch.where(censored, tail, exact).mean()


def split_mask(ids: list[str], which: str) -> torch.Tensor:
    return torch.tensor([B.split_of(i) == which for i in ids], dtype=torch.bool)


def expected_remaining(logits: torch.Tensor, values: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """sum_k softmax(logits)_k * min(value_k, cap): the filter's readout for one observation."""
    return (torch.softmax(logits.float(), -1) * torch.minimum(values[None, :], cap[:, None])).sum(-1)


def train_mlp(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, rem_val: torch.Tensor,
              cap_val: torch.Tensor, values: list[float], num_bins: int, cfg: TrainConfig,
              progress: bool = False, desc: str = "train", censored: torch.Tensor | None = None
              ) -> tuple[ProbeMLP, dict]:
    """Censored likelihood on bins (`censored_nll`; plain cross-entropy where `censored` [N] is
    None or all False), AdamW + cosine, early stopping on the validation MAE of the expected
    remaining length (the capped readout against the seen remaining length, which is exact for
    censored requests too). Returns the best MLP (standardisation folded into fc1)."""
    dev = x.device
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    xf = x.float()
    mu = xf.mean(0)
    sd = xf.std(0).clamp_min(1e-4) if xf.shape[0] > 1 else torch.ones_like(mu)
    mlp = ProbeMLP(x.shape[1], num_bins, cfg.hidden).to(dev)
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(x.shape[0] / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    vals = torch.tensor(values, dtype=torch.float32, device=dev)
    xv = ((x_val.float() - mu) / sd) if x_val.numel() else x_val.float()
    cens = censored.to(dev).bool() if censored is not None else None
    best, best_mae, best_epoch, history, bad = None, math.inf, -1, [], 0
    for epoch in tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        mlp.train()
        perm = torch.randperm(x.shape[0], generator=gen).to(dev)
        total = torch.zeros((), device=dev)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size: (s + 1) * cfg.batch_size]
            loss = censored_nll(mlp((xf[idx] - mu) / sd), y[idx], None if cens is None else cens[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * idx.numel()
        mlp.eval()
        with torch.no_grad():
            mae = float((expected_remaining(mlp(xv), vals, cap_val) - rem_val).abs().mean()) if xv.numel() else math.nan
        history.append({"epoch": epoch, "train_nll": float(total) / x.shape[0], "val_mae": mae})
        if not xv.numel() or mae < best_mae:
            best, best_mae, best_epoch, bad = copy.deepcopy(mlp.state_dict()), mae, epoch, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    mlp.load_state_dict(best)
    _fold_standardisation(mlp, mu, sd)
    return mlp.eval(), {"best_epoch": best_epoch, "val_mae_samples": best_mae, "history": history}


@torch.no_grad()
def model_prior(mlp: ProbeMLP, x: torch.Tensor, floor: float = 1e-4) -> list[float]:
    """The classifier's mean bin distribution over rows `x` (floored, renormalised): the `pi` the
    filter divides by when the labels were censored."""
    if x.shape[0] == 0:
        raise ValueError("model_prior needs at least one row")
    acc = None
    for s in range(0, x.shape[0], 65536):
        p = torch.softmax(mlp(x[s: s + 65536].to(mlp.fc1.weight.device)).float(), -1).sum(0).double()
        acc = p if acc is None else acc + p
    pi = (acc / x.shape[0]).clamp_min(floor)
    return (pi / pi.sum()).tolist()


@torch.no_grad()
def _fold_standardisation(mlp: ProbeMLP, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """fc1((x - mu) / sd) == fc1'(x) with W' = W / sd, b' = b - W' mu."""
    w = mlp.fc1.weight / sd[None, :]
    mlp.fc1.bias -= w @ mu
    mlp.fc1.weight.copy_(w)


def layer_training_data(feats: SampledFeatures, layer: int, edges: list[float], max_new_tokens: int,
                        device: str | torch.device):
    """(x, bins, remaining, cap, censored) for the train and validation rows of one layer, and the
    bin values / label prior computed on the training labels (censored ones at their seen value)."""
    x_all = feats.layer(layer)
    out = {}
    for which in ("train", "val"):
        req, slot, g, rem = feats.rows(split_mask(feats.ids, which))
        dev_req, dev_slot = req.to(x_all.device), slot.to(x_all.device)
        x = x_all[dev_req, dev_slot].to(device)
        rem = rem.to(device).float()
        cens = feats.hit_cap.to(req.device)[req].to(device).bool()
        out[which] = (x, B.bin_index(rem, edges).to(device), rem, (max_new_tokens - g.to(device)).float(), cens)
    if out["train"][0].shape[0] == 0:
        raise ValueError("no training rows: every request hashed into validation/test (too few requests?)")
    values = B.bin_values(out["train"][2].cpu(), edges)
    pi = B.label_prior(out["train"][2].cpu(), edges)
    return out, values, pi


def train_layer_probe(feats: SampledFeatures, layer: int, edges: list[float], cfg: TrainConfig,
                      model_id: str, max_new_tokens: int, device: str | torch.device = "cpu",
                      progress: bool = False, censor: bool = True) -> tuple[ProbeMLP, ProbeSpec]:
    """One probe on `layer`; `censor=False` trains on capped lengths as if observed (the old
    labels, kept for comparison)."""
    data, values, pi = layer_training_data(feats, layer, edges, max_new_tokens, device)
    (x, y, _, _, cens), (xv, _, remv, capv, _) = data["train"], data["val"]
    mlp, info = train_mlp(x, y, xv, remv, capv, values, len(edges) - 1, cfg, progress, f"layer {layer}",
                          censored=cens if censor else None)
    if censor:
        pi = model_prior(mlp, x)
    n_req = {w: int(split_mask(feats.ids, w).sum()) for w in ("train", "val", "test")}
    spec = ProbeSpec(kind="layer", model=model_id, d=x.shape[1], h=cfg.hidden, bin_edges=list(edges),
                     bin_values=values, pi=pi, layer=layer, max_new_tokens=max_new_tokens,
                     training={"rows": int(x.shape[0]), "requests": n_req, "split": "sha1(id) % 100: <10 test, <20 val",
                               "num_decode_samples": feats.meta.get("num_decode"), "config": cfg.__dict__,
                               "best_epoch": info["best_epoch"], "epochs_run": len(info["history"]),
                               "labels": "censored at the cap" if censor else "capped lengths as observed",
                               "pi": "classifier mean over training rows" if censor else "training label histogram",
                               "censored_rows": int(cens.sum()),
                               "train_length_counts": length_counts(feats, "train", max_new_tokens)},
                     validation={"rows": int(xv.shape[0]), "mae_samples": info["val_mae_samples"]})
    return mlp, spec


def length_counts(feats: SampledFeatures, which: str, max_new_tokens: int) -> list[int]:
    """Histogram of total output lengths 0..max_new_tokens over one split (the no-feature
    baseline E[L - g | L > g] needs only this)."""
    lens = feats.total_len[split_mask(feats.ids, which).to(feats.total_len.device)].long().cpu()
    return torch.bincount(lens.clamp(0, max_new_tokens), minlength=max_new_tokens + 1).tolist()


def sweep_layers(feats: SampledFeatures, layers: list[int], edges: list[float], cfg: TrainConfig,
                 model_id: str, max_new_tokens: int, device="cpu", progress: bool = True):
    """One probe per layer; returns {layer: (mlp, spec)} (validation MAE in spec.validation)."""
    out = {}
    for layer in tqdm(layers, desc="sweep", unit="layer", disable=not progress):
        out[layer] = train_layer_probe(feats, layer, edges, cfg, model_id, max_new_tokens, device)
        logger.info("layer %d: validation MAE (sampled rows) %.2f", layer, out[layer][1].validation["mae_samples"])
    return out


def select_config(feats: SampledFeatures, layer: int, edges: list[float], cfg: TrainConfig, model_id: str,
                  max_new_tokens: int, device="cpu", widths=WIDTHS, lrs=LRS, progress: bool = True
                  ) -> tuple[ProbeMLP, ProbeSpec, list[dict]]:
    """Width x learning rate grid on one layer, each run early-stopped on validation (which sets
    the number of epochs); the lowest validation MAE wins. Test requests are never looked at."""
    runs, best = [], None
    grid = [(h, lr) for h in widths for lr in lrs]
    for h, lr in tqdm(grid, desc=f"width/lr (layer {layer})", unit="cfg", disable=not progress):
        c = TrainConfig(**dict(cfg.__dict__, hidden=h, lr=lr))
        mlp, spec = train_layer_probe(feats, layer, edges, c, model_id, max_new_tokens, device)
        mae = spec.validation["mae_samples"]
        runs.append({"hidden": h, "lr": lr, "val_mae_samples": mae, "best_epoch": spec.training["best_epoch"]})
        logger.info("layer %d h=%d lr=%g: validation MAE %.2f (best epoch %d)", layer, h, lr, mae,
                    spec.training["best_epoch"])
        if best is None or mae < best[1].validation["mae_samples"]:
            best = (mlp, spec)
    best[1].training["config_search"] = runs
    return best[0], best[1], runs


def fit_filter(mlp: ProbeMLP, spec: ProbeSpec, dense_val: DenseFeatures, alphas=ALPHAS, epss=EPSS,
               device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Grid search of (alpha, eps) minimising the request-mean MAE of the filter's remaining
    estimate over every position of the validation requests; sets them on `spec`."""
    from trail.predictor.filter_adapter import probe_params, request_mae, run_filter

    grid = [(a, e) for a in alphas for e in epss]
    table = []
    for a, e in tqdm(grid, desc="fit alpha/eps", unit="pt", disable=not progress):
        est = run_filter(probe_params(mlp, spec, alpha=a, eps=e, device=device), dense_val, spec.max_new_tokens)
        table.append({"alpha": a, "eps": e, "mae": request_mae(est, dense_val)})
    best = min(table, key=lambda r: (r["mae"] if not math.isnan(r["mae"]) else math.inf))
    spec.alpha, spec.eps = best["alpha"], best["eps"]
    spec.validation.update({"requests": len(dense_val.ids), "filter_mae": best["mae"], "filter_grid": table})
    logger.info("filter fit: alpha=%g eps=%g validation MAE %.2f", best["alpha"], best["eps"], best["mae"])
    return best
