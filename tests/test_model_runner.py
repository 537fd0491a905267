"""The runner's contract: which rows it samples, the tap's metadata, per-request seeds independent
of the batch, repetition-penalty history per slot, and bad segments rejected before any state
changes."""
from types import SimpleNamespace

import pytest
import torch

from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.models import random_model
from trail.sampling import SampleParams
from trail.segments import Segment


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=5, std=0.2)


def make_runner(model, slots=6, max_blocks=6, tap_layer=None):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), slots * max_blocks, slots,
                    max_blocks)
    cache.pool.zero_()
    perm = torch.randperm(slots * max_blocks, generator=torch.Generator().manual_seed(0))
    cache.assign_tables(perm.view(slots, max_blocks))
    return ModelRunner(model, cache, tap_layer=tap_layer)


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_only_sampling_segments_get_tokens_and_tap_describes_the_step(model):
    runner = make_runner(model, tap_layer=1)
    segs = [Segment(4, prompt(20, 0), 0, sample=False), Segment(1, prompt(7, 1), 0),
            Segment(0, prompt(3, 2), 0)]
    out = runner.step(segs)
    assert out.sampled == [1, 2] and out.next_tokens.shape == (2,)
    assert out.next_tokens.dtype == torch.int64
    tap = out.tap
    assert tap.states.shape == (30, 64)
    assert tap.cu_seqlens.tolist() == [0, 20, 27, 30] and tap.slot_ids.tolist() == [4, 1, 0]
    assert tap.starts.tolist() == [0, 0, 0] and tap.sampled.tolist() == [False, True, True]
    segs = [Segment(4, prompt(5, 3), 20), Segment(1, [int(out.next_tokens[0])], 7, "decode")]
    out = runner.step(segs)
    assert out.tap.starts.tolist() == [20, 7] and out.tap.is_decode.tolist() == [False, True]
    assert make_runner(model).step(segs[:1]).tap is None


def test_next_tokens_are_the_last_rows_argmax(model):
    runner = make_runner(model)
    segs = [Segment(2, prompt(9, 4), 0), Segment(3, prompt(14, 5), 0)]
    batch = runner.prepare(segs)
    logits_all, _ = model(batch.input_ids, batch.meta, runner.kv_cache)
    out = make_runner(model).step(segs)
    assert out.next_tokens.tolist() == [int(logits_all[8].argmax()), int(logits_all[22].argmax())]


def _sampled_run(model, slot_of, others, steps=6):
    """Request A (seeded sampling) next to other requests; returns A's tokens."""
    runner = make_runner(model)
    params = SampleParams(temperature=1.5, top_p=0.95, top_k=100, seed=42)
    a = prompt(11, 9)
    segs = [Segment(slot_of, a, 0, params=params)] + [
        Segment(s, prompt(n, s), 0, params=SampleParams(temperature=1.0, seed=s)) for s, n in others]
    toks = [int(runner.step(segs).next_tokens[0])]
    for i in range(steps - 1):
        toks.append(int(runner.step([Segment(slot_of, [toks[-1]], len(a) + i, "decode", params=params)])
                        .next_tokens[0]))
    return toks


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    alone = _sampled_run(model, 0, [])
    crowded = _sampled_run(model, 5, [(0, 30), (2, 4), (3, 17)])
    assert alone == crowded
    assert len(set(alone)) > 1                 # really sampled, not a fixed point


def test_repetition_penalty_history_follows_the_slot(model):
    runner = make_runner(model)
    p = prompt(12, 7)
    runner.step([Segment(1, p[:5], 0, sample=False)])
    runner.step([Segment(1, p[5:], 5)])
    assert runner.seen[1].nonzero().flatten().tolist() == sorted(set(p))
    q = prompt(4, 8)
    runner.step([Segment(1, q, 0)])                    # slot reused by a new request: history reset
    assert runner.seen[1].nonzero().flatten().tolist() == sorted(set(q))
    # a recompute re-feeds prompt + generated tokens from position 0: the history is exactly them
    runner.step([Segment(1, p + q, 0)])
    assert runner.seen[1].nonzero().flatten().tolist() == sorted(set(p + q))


@pytest.mark.parametrize("segs,match", [
    ([], "at least one"),
    ([Segment(9, [1], 0)], "slots must lie in"),
    ([Segment(1, [1], 0), Segment(1, [2], 0)], "twice"),
    ([Segment(1, [1, 2], 3, "decode")], "2 tokens"),
    ([Segment(1, [], 0)], "0 tokens"),
    ([Segment(1, [1], 0, "verify")], "kind"),
    ([Segment(1, [1], 96)], "capacity"),
    ([Segment(1, [1], 95, "decode")], None),   # in capacity: a valid row (control)
    ([Segment(1, [600], 0)], "token ids"),
    ([Segment(1, [1], 0, params=SimpleNamespace(temperature=-1.0, top_p=1.0, top_k=0,
                                                 repetition_penalty=1.0, seed=None))], "temperature"),
])
def test_bad_segments_are_rejected_without_side_effects(model, segs, match):
    runner = make_runner(model)
    runner.step([Segment(0, prompt(10, 1), 0)])
    pool, seen = runner.kv_cache.pool.clone(), runner.seen.clone()
    if match is None:
        runner.step(segs)
        return
    with pytest.raises(ValueError, match=match):
        runner.step(segs)
    assert torch.equal(runner.kv_cache.pool, pool) and torch.equal(runner.seen, seen)


def test_unmapped_blocks_are_an_error_not_block_zero(model):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), 8, 2, 4)
    runner = ModelRunner(model, cache)
    cache.allocate({0: 16})
    runner.step([Segment(0, prompt(16, 1), 0)])        # committed by the runner itself
    assert cache.tables_committed
    with pytest.raises(RuntimeError, match="need 2 KV blocks but 1 are mapped"):
        runner.step([Segment(0, [3], 16, "decode")])
    with pytest.raises(RuntimeError, match="slot 1"):
        runner.step([Segment(1, [3], 0)])


def test_cache_spec_and_tap_layer_are_checked(model):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers + 1, cfg.num_kv_heads, cfg.head_dim), 4, 2, 2)
    with pytest.raises(ValueError, match="does not fit"):
        ModelRunner(model, cache)
    with pytest.raises(ValueError, match="tap_layer"):
        make_runner(model, tap_layer=cfg.num_layers)
