"""CUDA graphs on the GPU (decode steps, and mixed steps of prefill chunks + decodes): a replayed
step gives what the eager step gives (fp32, TF32 off: tap states, probe readout, tokens), padded
rows touch no real KV entry or probe slot, replay allocates nothing, and the engine with graphs
streams the same tokens as with enforce_eager."""
import numpy as np
import pytest
import torch

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.models import random_model
from trail.request import SamplingParams
from trail.sampling import SampleParams
from trail.segments import Segment
from trail_kernels.probe_params import ProbeParams
from trail_kernels.probe_state import ProbeState

pytestmark = pytest.mark.gpu

PROBE_FIELDS = ("log_post", "pool_sum", "pool_count", "post_gen", "upd_gen", "expected_remaining")


@pytest.fixture
def fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _setup(slots=12, max_blocks=16):
    model = random_model("smollm2-135m", device="cuda", dtype=torch.float32, seed=0)
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float32),
                    slots * max_blocks, slots, max_blocks, "cuda")
    cache.pool.normal_()                           # stale garbage everywhere: pads must not read it
    runner = ModelRunner(model, cache, tap_layer=19, max_tokens=256, max_rows=8)
    probe = ProbeParams.random(cfg.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0)).to("cuda")
    state = ProbeState.for_params(probe, max_slots=slots, max_rows=8, device="cuda")
    runner.attach_probe(probe, state)
    return model, cache, runner, state


def test_replay_matches_eager_and_pads_touch_nothing(fp32):
    model, cache, runner, state = _setup()
    assert runner.capture_graphs([4, 8]) == 4
    slots = [0, 3, 5, 7, 11]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 49152, (int(n),), generator=gen).tolist() for n in (20, 33, 7, 50, 16)]
    cache.allocate({s: len(p) + 4 for s, p in zip(slots, prompts)})
    params = [None, SampleParams(temperature=0.9, top_k=40, seed=1), None,
              SampleParams(temperature=1.0, seed=2), SampleParams(temperature=0.7, top_p=0.9, seed=4)]
    first = runner.step([Segment(s, p, 0, params=q) for s, p, q in zip(slots, prompts, params)])
    toks = first.next_tokens.tolist()
    plan = runner.plan_from_segments([Segment(s, [t], len(p), "decode", params=q)
                                      for s, t, p, q in zip(slots, toks, prompts, params)])
    plan.num_generated, plan.max_new_tokens = np.ones(5, np.int64), np.full(5, 100, np.int64)
    saved = {f: getattr(state, f).clone() for f in PROBE_FIELDS}

    # eager, unpadded
    batch = runner.prepare_plan(plan, pad_to=5)
    assert batch.graph is None
    logits, tap = runner.forward(batch)
    from trail_kernels.probe import probe_step
    expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                          tap.max_new_tokens, runner.probe, state, has_prefill=False)[:12].clone()
    eager_tokens, eager_states = runner.sample(logits, batch).clone(), tap.states.clone()
    eager_post = state.log_post.clone()
    pool_before = cache.pool.clone()
    for f in PROBE_FIELDS:                          # in place: the graph holds these addresses
        getattr(state, f).copy_(saved[f])

    # graph: bucket 8, three pad rows
    batch = runner.prepare_plan(plan)
    assert batch.graph == ("decode", 8, False) and batch.meta.slot_ids.shape == (8,)
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    tokens, g_expected, g_tap = runner.replay(batch)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, "replay allocated"
    torch.cuda.synchronize()
    torch.testing.assert_close(g_tap.states[:5], eager_states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_expected[:12], expected, rtol=1e-4, atol=1e-3)
    real = torch.tensor(slots, device="cuda")
    torch.testing.assert_close(state.log_post[real], eager_post[real], rtol=1e-4, atol=1e-4)
    others = torch.tensor([s for s in range(12) if s not in slots], device="cuda")
    assert torch.equal(state.log_post[others], saved["log_post"][others])   # no real slot but the rows'
    # the same cache entries, rewritten with the same values: pads wrote nothing
    assert (cache.pool - pool_before).abs().max() < 1e-3
    # tokens: equal, except at a near-tie of the eager logits
    for i, (a, b) in enumerate(zip(tokens.tolist(), eager_tokens.tolist())):
        assert a == b or (params[i] is None and abs(float(logits[i, a] - logits[i, b])) < 1e-4)


def test_mixed_graph_replay_matches_eager(fp32):
    model, cache, runner, state = _setup()
    assert runner.capture_graphs([4], [48, 96], mixed_rows=8) == 6
    gen = torch.Generator().manual_seed(4)
    warm = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in (21, 9)]
    cache.allocate({0: 40, 2: 40, 6: 60, 9: 40})
    first = runner.step([Segment(0, warm[0], 0), Segment(2, warm[1], 0)])
    toks = first.next_tokens.tolist()
    new = torch.randint(0, 49152, (30,), generator=gen).tolist()
    params = [SampleParams(temperature=0.8, top_k=50, seed=9), None, SampleParams(temperature=1.0, seed=5), None]
    plan = runner.plan_from_segments([
        Segment(0, [toks[0]], 21, "decode", params=params[0]), Segment(2, [toks[1]], 9, "decode"),
        Segment(6, new[:24], 0, sample=False),                      # a first chunk (no token drawn)
        Segment(9, new[24:], 0, params=params[2])])                 # a whole short prompt
    plan.num_generated, plan.max_new_tokens = np.array([1, 1, 0, 0]), np.full(4, 100)
    saved = {f: getattr(state, f).clone() for f in PROBE_FIELDS}
    seen = runner.seen.clone()

    batch = runner.prepare_plan(plan, pad_to=4)                     # eager, unpadded
    assert batch.graph is None
    logits, tap = runner.forward(batch)
    from trail_kernels.probe import probe_step
    expected = probe_step(tap.states, tap.cu_seqlens, tap.slot_ids, tap.flags, tap.num_generated,
                          tap.max_new_tokens, runner.probe, state, has_prefill=True)[:12].clone()
    eager_tokens, eager_states = runner.sample(logits, batch).clone(), tap.states.clone()
    eager_post, eager_seen = state.log_post.clone(), runner.seen[:12].clone()
    pool_before = cache.pool.clone()
    for f in PROBE_FIELDS:
        getattr(state, f).copy_(saved[f])
    runner.seen.copy_(seen)

    batch = runner.prepare_plan(plan)                               # 32 tokens + 4 pads -> bucket 48
    assert batch.graph == ("mixed", 48, False) and batch.meta.slot_ids.shape == (8,)
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    tokens, g_expected, g_tap = runner.replay(batch)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, "replay allocated"
    torch.cuda.synchronize()
    assert tokens.shape == (3,) and batch.sampled == [0, 1, 3]
    torch.testing.assert_close(g_tap.states[:32], eager_states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_expected[:12], expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(state.log_post[:12], eager_post[:12], rtol=1e-4, atol=1e-4)
    assert torch.equal(runner.seen[:12], eager_seen)
    assert (cache.pool - pool_before).abs().max() < 1e-3
    for i, (a, b) in enumerate(zip(tokens.tolist(), eager_tokens.tolist())):
        assert a == b or (i == 1 and abs(float(logits[i, a] - logits[i, b])) < 1e-4)


def test_graph_step_allocates_nothing(fp32):
    model, cache, runner, state = _setup()
    runner.capture_graphs([4])
    cache.allocate({0: 40, 1: 40})
    out = runner.step([Segment(0, list(range(10, 30)), 0), Segment(1, list(range(40, 52)), 0)])
    toks = out.next_tokens.tolist()
    segs = [Segment(0, [toks[0]], 20, "decode"), Segment(1, [toks[1]], 12, "decode")]
    runner.step(segs)                                # warm
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    plan = runner.plan_from_segments([Segment(0, [toks[0]], 21, "decode"), Segment(1, [toks[1]], 13, "decode")])
    batch = runner.prepare_plan(plan)
    assert batch.graph == ("decode", 4, True)
    runner.replay(batch)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def _run_engine(enforce_eager: bool, overlap: bool = False):
    model = random_model("smollm2-135m", device="cuda", dtype=torch.float32, seed=0)
    probe = ProbeParams.random(model.config.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
    config = EngineConfig(policy="trail", max_batch=8, max_model_len=256, num_gpu_blocks=200,
                          prefill_tokens_per_s=1000.0, enforce_eager=enforce_eager, overlap=overlap)
    engine = LLMEngine(model, None, config, probe=probe, probe_layer=19)
    replays = []
    real = engine.runner.replay
    engine.runner.replay = lambda batch: (replays.append(1), real(batch))[1]
    gen = torch.Generator().manual_seed(5)
    for i in range(10):
        p = torch.randint(0, 49152, (int(torch.randint(5, 40, (1,), generator=gen)),), generator=gen).tolist()
        sp = SamplingParams(max_new_tokens=24, ignore_eos=True, **({} if i % 2 else dict(temperature=0.8, seed=i)))
        engine.add_request(p, sp)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = (o.token_ids, [p for _, p in o.metrics.predictions])
    engine.check_idle()
    return outs, len(replays)


def test_engine_with_graphs_streams_what_eager_streams(fp32):
    eager, n_eager = _run_engine(True)
    graph, n_graph = _run_engine(False)
    assert n_eager == 0 and n_graph > 20    # decode and mixed steps both replay
    same = sum(eager[r][0] == graph[r][0] for r in eager)
    assert same >= 9, f"{same}/10 identical token streams"          # fp32: at most a near-tie apart
    for r in eager:
        if eager[r][0] == graph[r][0]:
            np.testing.assert_allclose(graph[r][1], eager[r][1], rtol=1e-3, atol=1e-2)


def test_overlapped_loop_streams_what_the_serial_loop_streams(fp32):
    serial, _ = _run_engine(False)
    overlapped, n_graph = _run_engine(False, overlap=True)
    assert n_graph > 20
    same = sum(serial[r][0] == overlapped[r][0] for r in serial)
    assert same >= 9, f"{same}/10 identical token streams"
