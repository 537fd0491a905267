"""Per-step predictions recorded on evaluated requests, in the npz format the simulator reads
(`trail.sim.load_recorded`; the same as bench/sim_record_predictions.py writes):

    ids, split, prompt_len (int32), output_len (int32), hit_cap (bool), prompt_pred (float32: the
    prompt-time expected total that orders admission), cu (int64 [N+1]), pred (float16 [sum L]:
    predicted remaining at g = 0..L-1, g = 0 being the readout right after the prefill update),
    meta (JSON string: model, layer, alpha, max_new_tokens, prompt_predictor, ...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trail.predictor import bins as B
from trail.predictor.trace import TraceRecord

REQUIRED = ("prompt_len", "output_len", "prompt_pred", "cu", "pred", "meta")


def save_recorded(path: str | os.PathLike, records: Sequence[TraceRecord], cu: torch.Tensor, pred: torch.Tensor,
                  prompt_pred: torch.Tensor, meta: dict) -> Path:
    """Write the npz for `records` (in the order of `cu`); `meta` must name max_new_tokens."""
    if "max_new_tokens" not in meta:
        raise ValueError("recorded predictions: meta must hold max_new_tokens")
    n = len(records)
    cu = cu.long().cpu()
    lens = np.array([r.output_len for r in records], dtype=np.int32)
    if cu.shape != (n + 1,) or not np.array_equal(np.diff(cu.numpy()), lens):
        raise ValueError("recorded predictions: cu must delimit each record's output_len positions")
    if pred.shape != (int(cu[-1]),) or prompt_pred.shape != (n,):
        raise ValueError(f"recorded predictions: pred {tuple(pred.shape)} / prompt_pred {tuple(prompt_pred.shape)} "
                         f"do not match {n} requests and {int(cu[-1])} positions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, ids=np.array([r.id for r in records]), split=np.array([B.split_of(r.id) for r in records]),
        prompt_len=np.array([len(r.prompt_ids) for r in records], dtype=np.int32), output_len=lens,
        hit_cap=np.array([r.hit_cap for r in records]),
        prompt_pred=prompt_pred.float().cpu().numpy().astype(np.float32), cu=cu.numpy(),
        pred=pred.float().cpu().clamp_min(0).numpy().astype(np.float16), meta=np.array(json.dumps(meta)))
    return path


def check_recorded(path: str | os.PathLike) -> dict:
    """Opens an npz and checks it has what the simulator reads; returns its meta."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recorded predictions not found: {path}")
    with np.load(path) as d:
        missing = [k for k in REQUIRED if k not in d.files]
        if missing:
            raise ValueError(f"{path}: not a recorded-predictions file, missing {missing}")
        meta = json.loads(str(d["meta"]))
        if "max_new_tokens" not in meta:
            raise ValueError(f"{path}: meta has no max_new_tokens")
        cu, lens = d["cu"], d["output_len"]
        if len(cu) != len(lens) + 1 or int(cu[-1]) != len(d["pred"]) or not np.array_equal(np.diff(cu), lens):
            raise ValueError(f"{path}: cu does not delimit output_len predictions per request")
    return meta
