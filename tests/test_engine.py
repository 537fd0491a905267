"""The engine (trail/engine.py) on CPU with real parts: preemption by keep / swap / recompute
(TRAIL's published rules with c = 5, so that everything is preemptible) changes no request's tokens (real SmolLM2 in float64, so batch composition cannot flip a greedy
near-tie), abort in every state returns every block and slot, a seeded soak with cancellations
loses and duplicates nothing, and a bad request disturbs no other."""
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny_engine_model import tiny_model_probe

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models.loader import load_hf, load_tokenizer
from trail.predictions import RecordedPredictions
from trail.predictor.probe_file import load_probe_params, shipped_probe_dir
from trail.request import FinishReason, SamplingParams
from trail.scheduler import State
from trail.scheduler_types import TRAIL_PAPER

PROMPTS = ["The capital of France is", "A haiku about schedulers:", "Three colours:",
           "A hash table is", "Hello in Spanish is"]
LENGTHS = [13, 5, 10, 3, 8]        # replayed output lengths (EOS ignored), short to long


@pytest.fixture(scope="module")
def smollm2_f64(smollm2_dir):
    model = load_hf(smollm2_dir, device="cpu", dtype=torch.float64)
    tok = load_tokenizer(smollm2_dir)
    probe, spec = load_probe_params(shipped_probe_dir("SmolLM2-135M-Instruct") / "probe",
                                    expect_d=model.config.hidden_size)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    return model, tok, probe, spec, ids


def _run(smollm2, policy, **cfg):
    model, tok, probe, spec, ids = smollm2
    config = EngineConfig(policy=policy, max_model_len=24, block_size=4, prefill_tokens_per_s=cfg.pop("rate", 1000.0),
                          **cfg)
    engine = LLMEngine(model, tok, config, probe=probe, probe_layer=spec.layer, probe_max_new=spec.max_new_tokens)
    params = SamplingParams(max_new_tokens=16, repetition_penalty=1.1)
    final = {}
    for i in range(len(ids)):        # one arrival per step: later short requests meet running long ones
        engine.add_request(ids[i], replace(params, replay_length=LENGTHS[i]), request_id=i)
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    engine.check_idle()
    return [final[i].token_ids for i in range(len(ids))], engine.telemetry.totals()


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_preemption_keeps_every_request_s_tokens(smollm2_f64, overlap):
    reference, totals = _run(smollm2_f64, "fcfs", max_batch=5, num_gpu_blocks=64, num_host_blocks=0)
    assert [len(t) for t in reference] == LENGTHS and totals["swap"] + totals["recompute"] + totals["keep"] == 0
    # a pool of 7 blocks of 4 tokens (prompts take 1-2, a request up to 5): memory forces evictions.
    # swap is cheaper than a (slow) recompute when host space is there ...
    swapped, t_swap = _run(smollm2_f64, "trail", max_batch=4, num_gpu_blocks=7, num_host_blocks=32, rate=1.0,
                           policy_options=dict(TRAIL_PAPER, c=5.0), overlap=overlap)
    # ... without host space every eviction recomputes (every chunk of it marked RECOMPUTE)
    recomputed, t_rec = _run(smollm2_f64, "trail", max_batch=4, num_gpu_blocks=7, num_host_blocks=0,
                             max_prefill_chunk=4, policy_options=dict(TRAIL_PAPER, c=5.0), overlap=overlap)
    # ample memory, batch of 2: newcomers with shorter true remaining preempt, KV kept on the GPU
    kept, t_keep = _run(smollm2_f64, "oracle", max_batch=2, num_gpu_blocks=64, num_host_blocks=0,
                        policy_options=dict(TRAIL_PAPER, c=5.0), overlap=overlap)
    assert t_swap["swap"] > 0 and t_swap["swap_in_bytes"] > 0, t_swap
    assert t_rec["recompute"] > 0 and t_rec["recomputed_tokens"] > 0 and t_rec["swap"] == 0, t_rec
    assert t_keep["keep"] > 0, t_keep
    assert swapped == reference
    assert recomputed == reference
    assert kept == reference


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_probe()


def _tiny_engine(tiny, policy="trail", predictions=None, **cfg):
    model, probe = tiny
    cfg.setdefault("max_model_len", 96)
    cfg.setdefault("prefill_tokens_per_s", 1e4)
    return LLMEngine(model, None, EngineConfig(policy=policy, **cfg), probe=probe, probe_layer=1,
                     eos_token_ids=[7], predictions=predictions)


def _state_name(engine, rid) -> str:
    req = engine._requests[rid]
    state = engine.scheduler.state_of(req.serial)
    if state == State.RUNNING and engine.slots.gen[req.slot] == 0:
        return "prefilling"
    if state == State.WAITING and req.output_ids:
        return "dropped"          # dropped for recompute: waits to re-prefill prompt + output
    return state.name


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_abort_in_every_state_returns_every_block_and_slot(tiny, overlap):
    rng = random.Random(0)
    seen_states = set()
    for trial in range(8):
        engine = _tiny_engine(tiny, max_batch=3, max_tokens_per_step=24, max_prefill_chunk=8, block_size=4,
                              num_gpu_blocks=24, num_host_blocks=12 if trial % 2 else 0, overlap=overlap,
                              policy_options=dict(TRAIL_PAPER, c=5.0))
        ids, finals = [], {}
        for step in range(300):
            if step < 40 and step % 2 == 0:
                ids.append(engine.add_request([rng.randrange(8, 500) for _ in range(rng.randrange(2, 30))],
                                              SamplingParams(max_new_tokens=rng.randrange(4, 60), ignore_eos=True)))
            live = [i for i in ids if i not in finals and i in engine._requests]
            # abort one request in a state not aborted yet (else, now and then, any)
            by_state = {}
            for rid in live:
                by_state.setdefault(_state_name(engine, rid), rid)
            fresh = [st for st in by_state if st not in seen_states]
            if fresh or (live and rng.random() < 0.05):
                st = fresh[0] if fresh else _state_name(engine, live[0])
                victim = by_state.get(st, live[0])
                seen_states.add(st)
                assert engine.abort(victim) and not engine.abort(victim)
            for out in engine.step():
                if out.finished:
                    assert out.request_id not in finals, "a request finished twice"
                    finals[out.request_id] = out
            if step >= 40 and not engine.has_unfinished():
                break
        assert set(finals) == set(ids)
        engine.check_idle()
    assert {"WAITING", "RUNNING", "prefilling", "KEPT", "SWAPPED", "dropped"} <= seen_states, seen_states


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_seeded_soak_with_cancellations_loses_and_duplicates_nothing(tiny, overlap):
    rng = np.random.default_rng(7)
    engine = _tiny_engine(tiny, max_batch=4, max_tokens_per_step=40, max_prefill_chunk=16, num_gpu_blocks=14,
                          num_host_blocks=8, overlap=overlap, policy_options=dict(TRAIL_PAPER, margin=2.0))
    added, finals, tokens_seen, max_new = [], {}, {}, {}
    for step in range(3000):
        if step < 250 and rng.random() < 0.4:
            params = SamplingParams(max_new_tokens=int(rng.integers(1, 40)), temperature=float(rng.choice([0, 0.8])),
                                    seed=int(rng.integers(0, 1000)))
            added.append(engine.add_request(rng.integers(8, 500, int(rng.integers(1, 40))).tolist(), params))
            max_new[added[-1]] = params.max_new_tokens
        if added and rng.random() < 0.05:
            engine.abort(int(rng.choice(added)))
        for out in engine.step():
            assert out.request_id not in finals, "output after the request finished"
            tokens_seen.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert tokens_seen[out.request_id] == out.token_ids, "new tokens and the full list disagree"
            if out.finished:
                finals[out.request_id] = out
        if step >= 250 and not engine.has_unfinished():
            break
    assert not engine.has_unfinished(), f"not done after 3000 steps: {engine.scheduler.snapshot()}"
    assert set(finals) == set(added), "a request was lost"
    for rid, out in finals.items():
        n = len(out.token_ids)
        assert out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT)
        if out.finish_reason == FinishReason.LENGTH:
            assert n == max_new[rid]
        if out.finish_reason == FinishReason.STOP:
            assert out.token_ids[-1] == 7 and 7 not in out.token_ids[:-1]
        assert n <= max_new[rid]
    totals = engine.telemetry.totals()
    assert totals["swap"] + totals["recompute"] + totals["keep"] > 0, totals
    engine.check_idle()


def test_a_bad_request_disturbs_no_other(tiny):
    def serve(with_bad: bool):
        engine = _tiny_engine(tiny, max_batch=4, num_gpu_blocks=40)
        ids = [engine.add_request(list(range(10 + i, 30 + i)), SamplingParams(max_new_tokens=12, ignore_eos=True))
               for i in range(3)]
        engine.step()
        if with_bad:
            bad = [([], SamplingParams(), "empty prompt"),
                   ([5] * 90, SamplingParams(max_new_tokens=10), "exceeds max_model_len"),
                   ([1, 2, 600], SamplingParams(), r"\[0, 512\)"),
                   ("text", SamplingParams(), "needs a tokenizer")]
            for prompt, params, msg in bad:
                with pytest.raises(ValueError, match=msg):
                    engine.add_request(prompt, params)
            with pytest.raises(ValueError, match="already in use"):
                engine.add_request([1, 2], SamplingParams(max_new_tokens=4), request_id=ids[0])
            with pytest.raises(ValueError, match="temperature"):
                SamplingParams(temperature=-1)
            with pytest.raises(ValueError, match="top_p"):
                SamplingParams(top_p=0)
        while engine.has_unfinished():
            engine.step()
        engine.check_idle()
        return [engine.telemetry.requests[i]["output_len"] for i in range(3)]

    assert serve(True) == serve(False)


def test_stop_ids_strings_and_lengths(smollm2_dir):
    model = load_hf(smollm2_dir, device="cpu")
    tok = load_tokenizer(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    engine = LLMEngine(model, tok, EngineConfig(policy="fcfs", max_model_len=256, prefill_tokens_per_s=100.0),
                       eos_token_ids=[2])
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    free = engine.generate([prompt], SamplingParams(max_new_tokens=24), progress=False)[0]
    assert free.finish_reason == FinishReason.LENGTH and len(free.token_ids) == 24
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    by_id = engine.generate([prompt], SamplingParams(max_new_tokens=24, stop_token_ids=(stop_id,)), progress=False)[0]
    assert by_id.finish_reason == FinishReason.STOP and by_id.token_ids == free.token_ids[:first + 1]
    needle = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    by_text = engine.generate([prompt], SamplingParams(max_new_tokens=24, stop=(needle,)), progress=False)[0]
    assert by_text.finish_reason == FinishReason.STOP
    assert by_text.text == free.text[:free.text.index(needle)]
    engine.check_idle()
    assert math.isnan(engine.telemetry.online_mae)     # no probe: no prediction telemetry


def test_from_pretrained_loads_the_shipped_probe_and_prompt_predictor(smollm2_dir):
    """The README's snippet: a folder in, the shipped probe and bag-of-embeddings predictor found."""
    from trail import EngineConfig as PublicConfig
    from trail import LLMEngine as PublicEngine

    engine = PublicEngine.from_pretrained(smollm2_dir, PublicConfig(policy="trail", max_batch=4, max_model_len=256,
                                                                      prefill_tokens_per_s=100.0))
    assert engine.probe is not None and engine.prompt_predictor is not None and engine.runner.tap_layer == 19
    assert list(engine.eos_ids) == [2]
    out = engine.generate(["Name three colours."], SamplingParams(max_new_tokens=6), progress=False)[0]
    assert len(out.token_ids) <= 6 and out.text and out.metrics.prompt_prediction > 0
    assert len(out.metrics.predictions) == len(out.token_ids)      # one prediction per step, prompt step first
    engine.check_idle()


def test_from_pretrained_takes_the_prompt_predictor_beside_a_probe_path(smollm2_dir, tmp_path, monkeypatch):
    """A probe given by path brings the prompt predictor trained with it, not the shipped one."""
    import shutil

    import trail.engine_loading as engine_module

    shipped = shipped_probe_dir("SmolLM2-135M-Instruct")
    for f in ("probe.json", "probe.safetensors", "prompt_boe.json", "prompt_boe.safetensors"):
        shutil.copy(shipped / f, tmp_path / f)
    loaded = []
    real = engine_module.prompt_predictor_fn
    monkeypatch.setattr(engine_module, "prompt_predictor_fn", lambda path, *a: (loaded.append(path), real(path, *a))[1])
    config = EngineConfig(policy="trail", max_batch=2, max_model_len=64, prefill_tokens_per_s=100.0)
    LLMEngine.from_pretrained(smollm2_dir, config, probe=str(tmp_path / "probe"))
    LLMEngine.from_pretrained(smollm2_dir, config)
    assert loaded == [tmp_path / "prompt_boe", shipped / "prompt_boe"]


def test_recorded_predictions_replace_the_probe_for_their_request_only(tiny):
    rec = np.array([40.0, 31.0, 22.5, 9.0])
    with pytest.raises(ValueError, match="recorded predictions of request 3"):
        RecordedPredictions({3: [1.0, -2.0]})
    engine = _tiny_engine(tiny, max_batch=4, block_size=4, num_gpu_blocks=64,
                          predictions=RecordedPredictions({100: rec}))
    rng = np.random.default_rng(1)
    a = engine.add_request(rng.integers(8, 500, 6).tolist(), SamplingParams(max_new_tokens=8, ignore_eos=True),
                           request_id=100)
    b = engine.add_request(rng.integers(8, 500, 6).tolist(), SamplingParams(max_new_tokens=8, ignore_eos=True))
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    engine.check_idle()
    got = final[a].metrics.predictions
    # g = 0..7 output tokens fed: the recorded value at g, the last one beyond the end
    assert got == [(g, float(rec[min(g, len(rec) - 1)])) for g in range(8)]
    other = [p for _, p in final[b].metrics.predictions]
    assert len(other) == 8 and not set(other) <= set(rec.tolist())
    assert np.isnan(engine.predictions._current).all()


def test_overlap_completes_each_step_on_the_next_call(tiny):
    """With overlap a step's tokens arrive with the next call, a request without a probe readout
    yet is scheduled on its prompt-time prediction, and the last call drains the step in flight."""
    engine = _tiny_engine(tiny, max_batch=4, block_size=4, num_gpu_blocks=64, overlap=True)
    rid = engine.add_request([11, 12, 13, 14, 15], SamplingParams(max_new_tokens=3, ignore_eos=True))
    slot = engine._requests[rid].slot
    assert engine.predictions.values[slot] == engine.predictions._prompt[slot]
    assert engine.step() == [] and engine._in_flight is not None       # prefill launched, nothing back
    assert engine.predictions.values[slot] == engine.predictions._prompt[slot]       # its readout is not in yet
    first = engine.step()                                               # decode 1 launched, prefill done
    assert [len(o.token_ids) for o in first] == [1] and engine.predictions._has_readout[slot]
    got = [first]
    while engine.has_unfinished():
        got.append(engine.step())
    assert [len(o.token_ids) for outs in got for o in outs] == [1, 2, 3] and got[-1][-1].finished
    engine.check_idle()


def test_metrics_as_dict_equals_a_deep_copy_and_does_not_alias():
    """RequestMetrics.as_dict (shallow, fast) gives what dataclasses.asdict gives, and later
    appends to the live metrics do not show in a dict already taken."""
    import dataclasses

    from trail.request import RequestMetrics

    m = RequestMetrics(0.5, first_scheduled=0.6, first_token=0.7, finished=1.9, token_times=[0.7, 0.8, 0.95],
                       forced_preemptions=1, swapped_out_blocks=3, recomputed_tokens=4, prompt_prediction=120.0,
                       predictions=[(0, 130.0), (1, 111.5), (2, 90.25)])
    m.preemptions["swap"] = 2
    want = dataclasses.asdict(m)
    want.update(latency=m.latency, ttft=m.ttft, prediction_mae=m.prediction_mae(3))
    got = m.as_dict(3)
    assert got == want
    m.token_times.append(2.0)
    m.predictions.append((3, 1.0))
    m.preemptions["keep"] += 1
    assert got == want


def test_negative_eos_id_is_refused(tiny):
    model, probe = tiny
    with pytest.raises(ValueError, match="eos_token_ids must be non-negative"):
        LLMEngine(model, None, EngineConfig(policy="fcfs", max_model_len=96, prefill_tokens_per_s=1e4),
                  eos_token_ids=[7, -1])
