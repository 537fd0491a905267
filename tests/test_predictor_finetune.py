"""Fine-tuned prompt predictors (the strong TRAIL baseline): the encoder really trains."""
import pytest
import torch

from trail.predictor import bins as B
from trail.predictor.finetune_prompt import FinetuneConfig, finetune
from trail.predictor.trace import TraceRecord


def _records(n=240):
    """Token 5 in the prompt means a long answer (often capped at 32), token 6 a short one; the
    frozen embedding rows of 5 and 6 are identical, so only a trained table can tell them apart."""
    recs = []
    for i in range(n):
        long = i % 2 == 0
        out = list(range(10, 10 + (32 if long and i % 4 == 0 else 24 if long else 3)))
        recs.append(TraceRecord(f"ft{i}", "t", "p", [1, 5 if long else 6, 2], out,
                                "length" if len(out) == 32 else "eos"))
    return recs


def test_boe_finetune_learns_what_frozen_embeddings_cannot_see():
    recs = _records()
    emb = torch.randn(8, 4)
    emb[6] = emb[5]
    edges = B.default_edges(4, 32)
    cfg = FinetuneConfig(hidden=16, epochs=30, patience=30, batch_size=32, lr_head=3e-3, lr_encoder=3e-2)
    logp, spec, info = finetune("boe_ft", recs, edges, 32, embeddings=emb, cfg=cfg)
    assert logp.shape == (len(recs), 4) and spec.bin_edges == edges and abs(sum(spec.pi) - 1) < 1e-6
    total = (logp.exp() * torch.tensor(spec.bin_values)).sum(-1)
    long = torch.tensor([i % 2 == 0 for i in range(len(recs))])
    assert float(total[long].min()) > float(total[~long].max())     # separated only by training the table
    assert info["val_mae_total"] < 6.0, info
    with pytest.raises(ValueError, match="unknown fine-tuned"):
        finetune("bert", recs, edges, 32)


def test_minilm_finetune_runs_when_the_encoder_is_installed():
    from trail.predictor.prompt_predictors import minilm_dir

    try:
        minilm_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    recs = [TraceRecord(r.id, "t", "write a long essay" if i % 2 == 0 else "say yes", r.prompt_ids, r.output_ids,
                        r.finish) for i, r in enumerate(_records(40))]
    logp, spec, info = finetune("minilm_ft", recs, B.default_edges(4, 32), 32,
                                cfg=FinetuneConfig(hidden=16, epochs=1, batch_size=16))
    assert logp.shape == (40, 4) and spec.d == 384 and len(info["history"]) == 1
