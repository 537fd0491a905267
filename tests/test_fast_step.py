"""The fast step's CPU-checkable parts: persistent step buffers (the same memory every step),
graph buckets, padded decode rows (what a CUDA-graph bucket adds) changing nothing real, and the
engine config switches. The graphs themselves are tested on the GPU (test_cuda_graphs_gpu.py)."""
import numpy as np
import pytest
import torch

from trail.engine_config import EngineConfig
from trail.graph_buckets import bucket_for, graph_batch_sizes, mixed_token_sizes
from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.models import random_model
from trail.sampling import SampleParams
from trail.segments import Segment
from trail_kernels.probe import probe_step
from trail_kernels.probe_params import ProbeParams
from trail_kernels.probe_state import ProbeState


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=5, std=0.2)


def make_runner(model, slots=6, max_blocks=6):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), slots * max_blocks, slots, max_blocks)
    cache.pool.zero_()
    perm = torch.randperm(slots * max_blocks, generator=torch.Generator().manual_seed(0))
    cache.assign_tables(perm.view(slots, max_blocks))
    return ModelRunner(model, cache, tap_layer=1, max_tokens=64, max_rows=6)


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_step_buffers_are_reused_across_steps(model):
    runner = make_runner(model)
    host, dev = runner.buffers.host.data_ptr(), runner.buffers.dev.data_ptr()
    a = runner.step([Segment(0, prompt(9, 0), 0), Segment(3, prompt(4, 1), 0)])
    ptrs = (a.batch.input_ids.data_ptr(), a.batch.meta.positions.data_ptr(), a.batch.temperature.data_ptr())
    b = runner.step([Segment(0, [int(a.next_tokens[0])], 9, "decode"), Segment(3, [int(a.next_tokens[1])], 4, "decode")])
    assert (b.batch.input_ids.data_ptr(), b.batch.meta.positions.data_ptr(), b.batch.temperature.data_ptr()) == ptrs
    assert (runner.buffers.host.data_ptr(), runner.buffers.dev.data_ptr()) == (host, dev)
    assert b.batch.meta.positions.tolist() == [9, 4] and b.batch.meta.slot_mapping.shape == (2,)
    # a step larger than the buffers grows them once (no graphs on CPU to invalidate)
    runner.step([Segment(1, prompt(80, 2), 0)])
    assert runner.buffers.max_tokens >= 80


def test_graph_buckets():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert graph_batch_sizes(5, (1, 4, 8)) == [1, 4, 5]
    sizes = graph_batch_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 3, 17, 48, 49, 64, 65)] == [1, 4, 24, 48, 64, 64, None]


def assert_same_real_state(plain: dict, padded: dict) -> None:
    """An unpadded and a padded run of one step: the same tokens, logits, repetition history,
    probe state of real slots, and KV entries (pads write none; values equal up to GEMM blocking)."""
    assert torch.equal(plain["tokens"], padded["tokens"])
    torch.testing.assert_close(plain["logits"], padded["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(plain["pool"] != 0, padded["pool"] != 0)
    torch.testing.assert_close(plain["pool"], padded["pool"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain["post"], padded["post"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain["expected"], padded["expected"], rtol=1e-5, atol=1e-4)
    assert torch.equal(plain["seen"], padded["seen"])


def test_padded_decode_rows_change_nothing_real(model):
    """The same decode step unpadded and padded to a bucket (pads: no KV slot, context 0, the
    probe's scratch slot, the scratch row of `seen`): identical tokens, logits, KV pool, probe
    state of real slots and repetition history."""
    probe = ProbeParams.random(model.config.hidden_size, 32, 10, generator=torch.Generator().manual_seed(0))
    runs = []
    for pad in (None, 6):
        runner = make_runner(model)
        state = ProbeState.for_params(probe, max_slots=6, max_rows=6)
        runner.attach_probe(probe, state)
        runner.set_sampling(2, SampleParams(temperature=0.8, top_k=20, seed=3))
        first = runner.step([Segment(2, prompt(7, 3), 0), Segment(4, prompt(5, 4), 0)])
        probe_step(first.tap.states, first.tap.cu_seqlens, first.tap.slot_ids, first.tap.flags,
                   first.tap.num_generated, first.tap.max_new_tokens, probe, state)
        plan = runner.plan_from_segments([Segment(2, [int(first.next_tokens[0])], 7, "decode",
                                                  params=SampleParams(temperature=0.8, top_k=20, seed=3)),
                                          Segment(4, [int(first.next_tokens[1])], 5, "decode")])
        plan.num_generated, plan.max_new_tokens = np.array([1, 1]), np.array([50, 50])
        batch = runner.prepare_plan(plan, pad_to=pad)
        logits, tap = runner.forward(batch)
        expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                              tap.max_new_tokens, probe, state, has_prefill=False)
        tokens = runner.sample(logits, batch)
        runs.append(dict(tokens=tokens[:2].clone(), logits=logits[:2].clone(), pool=runner.kv_cache.pool.clone(),
                         post=state.log_post[:6].clone(), expected=expected[:6].clone(),
                         seen=runner.seen[:6].clone(), rows=len(tokens), probe_slots=batch.probe_slots.tolist()))
    plain, padded = runs
    assert padded["rows"] == 6 and padded["probe_slots"] == [2, 4, 6, 6, 6, 6]
    assert_same_real_state(plain, padded)


def test_mixed_step_padded_like_its_graph_changes_nothing_real(model):
    """A mixed step (a decode, a first prompt chunk that samples nothing, a last chunk that
    samples) unpadded and padded as a mixed-step graph pads it (3 pad rows, 9 spare tokens on the
    last one, a sampling and a reset entry per row): identical tokens, logits, KV pool, probe
    state of real slots and repetition history."""
    probe = ProbeParams.random(model.config.hidden_size, 32, 10, generator=torch.Generator().manual_seed(0))
    runs = []
    for rows, tokens in ((None, None), (6, 30)):
        runner = make_runner(model)
        state = ProbeState.for_params(probe, max_slots=6, max_rows=6)
        runner.attach_probe(probe, state)
        runner.set_sampling(1, SampleParams(temperature=0.9, top_k=30, seed=7))
        first = runner.step([Segment(1, prompt(6, 5), 0), Segment(5, prompt(4, 6), 0, sample=False)])
        probe_step(first.tap.states, first.tap.cu_seqlens, first.tap.slot_ids, first.tap.flags,
                   first.tap.num_generated, first.tap.max_new_tokens, probe, state)
        plan = runner.plan_from_segments([
            Segment(1, [int(first.next_tokens[0])], 6, "decode", params=SampleParams(temperature=0.9, top_k=30, seed=7)),
            Segment(0, prompt(8, 8), 0, sample=False),       # a first chunk: resets slot 0, samples nothing
            Segment(5, prompt(3, 9), 4)])                    # the last chunk of slot 5's prompt
        plan.num_generated, plan.max_new_tokens = np.array([1, 0, 0]), np.array([50, 50, 50])
        batch = runner.prepare_plan(plan, pad_to=rows, pad_tokens_to=tokens)
        logits, tap = runner.forward(batch)
        expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                              tap.max_new_tokens, probe, state, has_prefill=True)
        out = runner.sample(logits, batch)
        assert batch.sampled == [0, 2]
        runs.append(dict(tokens=out[:2].clone(), logits=logits[:2].clone(), pool=runner.kv_cache.pool.clone(),
                         post=state.log_post[:6].clone(), pool_sum=state.pool_sum[:6].clone(),
                         expected=expected[:6].clone(), seen=runner.seen[:6].clone(), n_logits=len(logits),
                         cu=batch.meta.cu_seqlens_q.tolist()))
    plain, padded = runs
    assert padded["n_logits"] == 6 and padded["cu"] == [0, 1, 9, 12, 13, 14, 30]
    assert_same_real_state(plain, padded)
    torch.testing.assert_close(plain["pool_sum"], padded["pool_sum"], rtol=1e-5, atol=1e-5)


def test_mixed_token_buckets():
    sizes = mixed_token_sizes(2048, 49)
    assert sizes[0] > 49 and sizes[-1] == 2048 + 49 and sizes == sorted(set(sizes))
    assert all(b <= max(1.3 * a, a + 32) for a, b in zip(sizes, sizes[1:]))     # pads by <= ~30% or 32 tokens
    assert mixed_token_sizes(100_000, 9)[-1] == 8192 + 9
    assert mixed_token_sizes(512, 9, (64, 32)) == [32, 64]
    with pytest.raises(ValueError, match="cuda_graph_tokens"):
        EngineConfig(max_batch=8, cuda_graph_tokens=(9,))


def test_cpu_runner_captures_nothing(model):
    runner = make_runner(model)
    assert runner.capture_graphs([1, 2]) == 0 and runner.graph_sizes == []
    batch = runner.prepare([Segment(0, prompt(3, 0), 0)])
    assert batch.graph is None


def test_engine_config_graph_fields():
    assert EngineConfig().enforce_eager is False and EngineConfig().cuda_graph_sizes is None
    EngineConfig(max_batch=8, cuda_graph_sizes=(1, 8))
    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        EngineConfig(max_batch=8, cuda_graph_sizes=(1, 16))
