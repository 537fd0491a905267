"""An engine step is atomic (issue 22 item 3): an exception injected in any phase of a step
(schedule, preemption apply, swap-out, swap-in, prepare, forward, probe, sample, graph replay,
sync, postprocess, and Ctrl-C), with the overlapped loop on and off, under KV pressure with
swaps, is rolled back: every request's tokens equal a clean run's, nothing leaks. A request id
reused right after abort() or after its final output never gets the old request's in-flight
token. A sticky device error ends every request and refuses further steps.

The model is a tiny random Llama in float64 on CPU (float32 on CUDA, where the `gpu` variants
run with CUDA graphs and the overlapped loop), so a recompute reproduces greedy tokens exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_engine_model import tiny_model_probe

import trail.model_runner
from trail.engine import EngineDeadError, LLMEngine
from trail.engine_config import EngineConfig
from trail.request import FinishReason, SamplingParams
from trail.scheduler_types import TRAIL_PAPER
from trail_kernels.probe_params import ProbeParams

N_REQ = 10


class InjectedFault(RuntimeError):
    pass


def _model(device: str):
    return tiny_model_probe(device, torch.float64 if device == "cpu" else torch.float32)


@pytest.fixture(scope="module")
def cpu_model():
    return _model("cpu")


def _engine(model_probe, overlap: bool, eager: bool = True, graph_tokens=(16, 48)) -> LLMEngine:
    model, probe = model_probe
    # 7 blocks of 4 tokens for up to 4 running requests of up to 5 blocks: memory forces evictions;
    # host space and a slow recompute make them swaps (c = 5: the policy preempts too)
    config = EngineConfig(policy="trail", max_batch=4, max_slots=32, max_model_len=28, block_size=4,
                          num_gpu_blocks=7, num_host_blocks=32, prefill_tokens_per_s=1.0, overlap=overlap,
                          enforce_eager=eager, cuda_graph_tokens=graph_tokens, policy_options=dict(TRAIL_PAPER, c=5.0))
    return LLMEngine(model, None, config, probe=probe, probe_layer=1, eos_token_ids=[7])


def _workload():
    rng = np.random.default_rng(11)
    prompts = [rng.integers(8, 500, int(rng.integers(3, 9))).tolist() for _ in range(N_REQ)]
    lengths = [int(x) for x in rng.integers(3, 14, N_REQ)]
    return prompts, lengths


def _serve(engine: LLMEngine, arm=None) -> tuple[dict, int]:
    """Runs the workload (one arrival per step, so short requests meet running long ones);
    returns ({id: token ids}, faults seen). Checks that each request's streamed new tokens add up
    to its token ids (no output lost or repeated by a fault) and that it has one final output."""
    prompts, lengths = _workload()
    finals, faults, pending, streamed = {}, 0, list(range(N_REQ)), {}
    if arm is not None:
        arm(engine)
    steps = 0
    while pending or engine.has_unfinished():
        if pending:
            i = pending.pop(0)
            engine.add_request(prompts[i], SamplingParams(max_new_tokens=16, replay_length=lengths[i]),
                               request_id=i)
        try:
            outs = engine.step()
        except (InjectedFault, KeyboardInterrupt, torch.cuda.OutOfMemoryError):
            faults += 1
            continue
        for o in outs:
            assert o.request_id not in finals, f"request {o.request_id}: an output after its final one"
            streamed.setdefault(o.request_id, []).extend(o.new_token_ids)
            assert streamed[o.request_id] == list(o.token_ids), f"request {o.request_id}: lost or repeated tokens"
            if o.finished:
                finals[o.request_id] = o
        steps += 1
        assert steps < 2000, "the engine made no progress"
    engine.check_idle()
    assert all(finals[i].finish_reason == FinishReason.LENGTH for i in range(N_REQ))
    return {i: finals[i].token_ids for i in range(N_REQ)}, faults


def _arm(target, name: str, at_call: int, exc=InjectedFault):
    """Makes `target(engine)`'s attribute `name` raise on its `at_call`-th call."""
    def arm(engine):
        obj = target(engine)
        if obj is trail.model_runner:
            obj = _ModulePatch(obj)
        real = getattr(obj, name)
        calls = [0]

        def faulty(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at_call:
                raise exc(f"injected into {name}")
            return real(*args, **kwargs)

        setattr(obj, name, faulty)
    return arm


class _ModulePatch:
    """setattr on a module through an object the test can undo (see the probe phase)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)

    def __setattr__(self, name, value):
        if name == "module":
            object.__setattr__(self, name, value)
        else:
            setattr(self.module, name, value)


PHASES = {
    "schedule": (lambda e: e.core.scheduler, "step", 5),
    "preempt_apply": (lambda e: e.core, "_preempt", 2),
    "swap_out": (lambda e: e.kv, "swap_out", 2),
    "swap_in": (lambda e: e.kv, "swap_in", 2),
    "prepare": (lambda e: e.runner, "prepare_plan", 6),
    "forward": (lambda e: e.runner, "forward", 6),
    "probe": (lambda e: trail.model_runner, "probe_step", 6),
    "sample": (lambda e: e.runner, "sample", 6),
    "sync": (lambda e: e, "_sync", 6),
    "postprocess": (lambda e: e.slots, "commit", 6),
    "release": (lambda e: e.core, "release", 2),        # finished requests: reasons set, not released
    "finish": (lambda e: e, "_finish", 3),              # released, the second of them not finished
}


@pytest.fixture(scope="module")
def clean(cpu_model):
    runs = {overlap: _serve(_engine(cpu_model, overlap))[0] for overlap in (False, True)}
    assert runs[False] == runs[True]
    return runs[False]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("phase", [*PHASES, "ctrl_c"])
def test_a_fault_in_any_phase_is_rolled_back(cpu_model, clean, phase, overlap, monkeypatch):
    target, name, at = PHASES.get(phase, (lambda e: e.runner, "forward", 9))
    exc = KeyboardInterrupt if phase == "ctrl_c" else InjectedFault
    engine = _engine(cpu_model, overlap)
    arm = _arm(target, name, at, exc)
    if phase == "probe":       # a module function: restored after this test
        monkeypatch.setattr(trail.model_runner, "probe_step", trail.model_runner.probe_step)
    tokens, faults = _serve(engine, arm)
    assert faults == 1, f"the fault at {phase} never fired (the workload does not reach that phase)"
    assert tokens == clean
    totals = engine.telemetry.totals()
    assert totals["swap"] > 0, totals      # the run was under KV pressure


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_a_reused_request_id_never_gets_the_old_request_s_token(cpu_model, overlap):
    """Abort a running request and add a new one under the same id at once (it lands in the same
    slot), and likewise right after a request's final output: the new request's tokens are a clean
    run's of its own prompt."""
    prompts, _ = _workload()
    alone = _engine(cpu_model, overlap)
    expect = alone.generate([prompts[1]], SamplingParams(max_new_tokens=6, ignore_eos=True), progress=False)[0]

    engine = _engine(cpu_model, overlap)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.add_request(prompts[0], SamplingParams(max_new_tokens=20, ignore_eos=True), request_id=5)
    for _ in range(4):
        engine.step()                                  # request 5 decoding, a token in flight
    slot = engine._requests[5].slot
    assert engine.abort(5)
    engine.add_request(prompts[1], params, request_id=5)
    assert engine._requests[5].slot == slot
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert [o.finish_reason for o in finals] == [FinishReason.ABORT, FinishReason.LENGTH]
    assert finals[1].token_ids == expect.token_ids

    # reuse right after the final output (with overlap, the step after it may still be in flight)
    engine.add_request(prompts[0], SamplingParams(max_new_tokens=3, ignore_eos=True), request_id=6)
    done = None
    while done is None:
        done = next((o for o in engine.step() if o.finished), None)
    engine.add_request(prompts[1], params, request_id=6)
    out = None
    while engine.has_unfinished():
        out = next((o for o in engine.step() if o.finished), out)
    assert out.request_id == 6 and out.token_ids == expect.token_ids
    engine.check_idle()


@pytest.mark.parametrize("where", ["release", "finish"])
def test_an_abort_cut_short_by_ctrl_c_still_ends_its_request(cpu_model, clean, where):
    """Ctrl-C inside `abort()` (before its blocks are released, or after, before its slot is
    unbound): the abort raises, the next step completes it (one final output, reason 'abort'),
    the other requests' tokens equal a clean run's, and nothing leaks."""
    engine = _engine(cpu_model, overlap=True)
    prompts, lengths = _workload()
    for i in range(N_REQ):
        engine.add_request(prompts[i], SamplingParams(max_new_tokens=16, replay_length=lengths[i]), request_id=i)
    for _ in range(3):
        engine.step()
    obj, name = (engine.core, "release") if where == "release" else (engine, "_finish")
    real = getattr(obj, name)

    def interrupted(*args, **kwargs):
        setattr(obj, name, real)
        raise KeyboardInterrupt
    setattr(obj, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.abort(0)
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id not in finals
            if o.finished:
                finals[o.request_id] = o
    assert finals[0].finish_reason == FinishReason.ABORT
    assert all(finals[i].token_ids == clean[i] for i in range(1, N_REQ))
    engine.check_idle()


def test_a_sticky_device_error_ends_every_request_and_the_engine(cpu_model):
    engine = _engine(cpu_model, overlap=True)
    prompts, _ = _workload()
    for i in range(3):
        engine.add_request(prompts[i], SamplingParams(max_new_tokens=8, ignore_eos=True), request_id=i)
    engine.step()
    _arm(lambda e: e.runner, "forward", 1,
         lambda msg: RuntimeError("CUDA error: an illegal memory access was encountered"))(engine)
    with pytest.raises(EngineDeadError) as info:
        engine.step()
    assert sorted(o.request_id for o in info.value.outputs) == [0, 1, 2]
    assert all(o.finish_reason == FinishReason.ERROR and "illegal memory access" in o.error
               for o in info.value.outputs)
    with pytest.raises(EngineDeadError, match="build a new engine"):
        engine.step()
    with pytest.raises(EngineDeadError):
        engine.add_request(prompts[0])


def test_a_device_oom_is_transient(cpu_model, clean):
    """A device OOM in the forward pass is not sticky: the step is rolled back and the engine
    goes on."""
    engine = _engine(cpu_model, overlap=True)
    tokens, faults = _serve(engine, _arm(lambda e: e.runner, "forward", 4, torch.cuda.OutOfMemoryError))
    assert faults == 1 and tokens == clean


@pytest.mark.gpu
@pytest.mark.parametrize("phase", ["forward_eager", "graph", "sync", "swap_out", "ctrl_c"])
def test_gpu_a_fault_is_rolled_back_with_overlap_and_graphs(phase):
    model_probe = _model("cuda")
    clean_tokens, _ = _serve(_engine(model_probe, overlap=True, eager=False))
    target = {"forward_eager": (lambda e: e.runner, "forward", 3), "graph": (lambda e: e.runner, "replay", 6),
              "sync": (lambda e: e, "_sync", 6), "swap_out": (lambda e: e.kv, "swap_out", 2),
              "ctrl_c": (lambda e: e.runner, "replay", 8)}[phase]
    exc = KeyboardInterrupt if phase == "ctrl_c" else InjectedFault
    # steps of more than 8 tokens (a prefill beside the decodes) miss the mixed-step graph and run
    # eager, so the eager forward is reached; the other phases run graphed
    engine = _engine(model_probe, overlap=True, eager=False, graph_tokens=(8,) if phase == "forward_eager" else (16, 48))
    tokens, faults = _serve(engine, _arm(*target, exc))
    assert faults == 1 and tokens == clean_tokens


def test_a_request_whose_text_decoding_fails_ends_alone(cpu_model, smollm2_dir):
    """A fault one request causes (its text decoding) ends that request with FinishReason.ERROR
    and a message; the others run on with the tokens of a clean run (real SmolLM2 tokenizer)."""
    from trail.models.loader import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    prompts, _ = _workload()
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)

    def serve(sabotage: bool):
        model, probe = cpu_model
        engine = LLMEngine(model, tok, _engine(cpu_model, True).config, probe=probe, probe_layer=1,
                           eos_token_ids=[7])
        for i in range(3):
            engine.add_request(prompts[i], params, request_id=i)
        if sabotage:
            def broken(jobs):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            engine._requests[1].stream._decode = broken
        finals = {}
        while engine.has_unfinished():
            finals.update((o.request_id, o) for o in engine.step() if o.finished)
        engine.check_idle()
        return finals

    clean_run, faulty = serve(False), serve(True)
    assert faulty[1].finish_reason == FinishReason.ERROR and "text decoding failed" in faulty[1].error
    assert len(faulty[1].token_ids) == 1
    for i in (0, 2):
        assert faulty[i].finish_reason == FinishReason.LENGTH and faulty[i].error is None
        assert faulty[i].token_ids == clean_run[i].token_ids and faulty[i].text == clean_run[i].text


def test_generate_queues_all_prompts_or_none(cpu_model):
    """generate() with a bad prompt among good ones queues none of them (before: the good ones
    before it stayed queued and were served later, their outputs dropped)."""
    engine = _engine(cpu_model, overlap=True)
    prompts, _ = _workload()
    with pytest.raises(ValueError, match="prompt token ids"):
        engine.generate([prompts[0], prompts[1], [10**9]], SamplingParams(max_new_tokens=4), progress=False)
    assert not engine.has_unfinished() and engine.scheduler.num_active == 0
    engine.check_idle()
    outs = engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, ignore_eos=True), progress=False)
    assert [len(o.token_ids) for o in outs] == [4, 4]


def test_the_constructor_checks_the_probe_against_the_model(cpu_model):
    model, _ = cpu_model
    narrow = ProbeParams.random(model.config.hidden_size // 2, 16, 8, max_len=64,
                                generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="width"):
        LLMEngine(model, None, EngineConfig(policy="trail", max_model_len=28, block_size=4, num_gpu_blocks=16,
                                            prefill_tokens_per_s=1.0), probe=narrow, probe_layer=1)
    _, probe = cpu_model
    with pytest.raises(ValueError, match="probe_layer"):
        LLMEngine(model, None, EngineConfig(policy="trail", max_model_len=28, block_size=4, num_gpu_blocks=16,
                                            prefill_tokens_per_s=1.0), probe=probe, probe_layer=99)
