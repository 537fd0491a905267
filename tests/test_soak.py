"""Soak of the engine (issue 27 item 4): hundreds (CPU) or 10,000 (GPU) requests arriving a few
per step, ~10% aborted at random moments in whatever state they are in, under KV pressure (a small
GPU block pool and a small host swap space, TRAIL's published rules with c = 5 so the policy
preempts a lot), with the overlapped loop on. Keep, swap and recompute preemptions all happen
many times. Checked:

1. nothing lost or duplicated: every request gets exactly one final output (LENGTH / STOP, or
   ABORT for those aborted; abort() is True exactly for live requests), nothing arrives for a
   request after its final output, and each request's `new_token_ids` concatenate to its final
   `token_ids`;
2. the engine is idle at the end (every block and slot free);
3. keep, swap and recompute preemptions each happen at least N times;
4. every output token (aborted requests' too) is the argmax of a clean single-request forward over
   prompt + output so far, one teacher-forced forward per request, unless the token's logit is
   within GAP of the top logit (a near-tie a different batch composition may flip; counted).

The model is the tiny random Llama in float32 on CPU and on CUDA (the `gpu` size, with CUDA
graphs; float32 so the issue's 2^-7 near-tie rule is meaningful: bf16 logits are spaced 2^-5
apart at this model's scale). Greedy sampling without repetition penalty, so the argmax rule
applies."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tiny_engine_model import tiny_model_probe

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.request import FinishReason, SamplingParams
from trail.scheduler import State
from trail.scheduler_types import TRAIL_PAPER
from trail.segments import Segment

EOS = 7
# a token may differ from the reference's argmax only where the top-2 logit gap is below this: a
# near-tie that another batch composition (other kernels, another summation order) may flip.
GAP = 2.0 ** -7
MAX_EXCUSED = 0.02       # at most this fraction of the tokens checked may lean on the gap rule


@dataclass(frozen=True)
class Size:
    requests: int
    min_each: int                  # keep, swap and recompute preemptions, each at least
    max_batch: int
    num_gpu_blocks: int
    num_host_blocks: int
    arrivals: tuple[int, int]      # requests added per step: uniform in [lo, hi]
    max_prompt: int = 28
    max_new: int = 24
    abort_fraction: float = 0.1
    phase_steps: int = 25
    block_size: int = 4
    max_model_len: int = 64


CPU = Size(requests=300, min_each=20, max_batch=8, num_gpu_blocks=48, num_host_blocks=8, arrivals=(0, 3))
# the GPU size at 1,500 requests on CPU saw 212 keep, 216 swap, 167 recompute preemptions
GPU = Size(requests=10_000, min_each=100, max_batch=16, num_gpu_blocks=96, num_host_blocks=12, arrivals=(0, 4))


def _model(device: str):
    return tiny_model_probe(device, torch.float32)


def _engine(model, probe, size: Size) -> LLMEngine:
    # a slow recompute (1 token/s): a preemption swaps while the host space lasts, then recomputes;
    # a policy preemption while memory is not short keeps the victim's KV on the GPU
    config = EngineConfig(policy="trail", max_batch=size.max_batch, max_slots=size.requests + 1,
                          max_tokens_per_step=8 * size.max_batch, max_prefill_chunk=16,
                          max_model_len=size.max_model_len, block_size=size.block_size,
                          num_gpu_blocks=size.num_gpu_blocks, num_host_blocks=size.num_host_blocks,
                          prefill_tokens_per_s=1.0, overlap=True, policy_options=dict(TRAIL_PAPER, c=5.0))
    return LLMEngine(model, None, config, probe=probe, probe_layer=1, eos_token_ids=[EOS])


def _state(engine: LLMEngine, rid: int) -> str:
    """A live request's state, for the report (engine internals, read only)."""
    req = engine._requests[rid]
    state = engine.scheduler.state_of(req.serial)
    if state == State.RUNNING and engine.slots.gen[req.slot] == 0:
        return "prefilling"
    if state == State.WAITING and req.output_ids:
        return "dropped"
    return state.name


def _serve(engine: LLMEngine, size: Size, seed: int) -> dict:
    """Runs the soak; checks 1 and 2 as it goes; returns what it saw. Arrivals alternate between
    phases of short prompts (the batch cap binds, memory does not: kept preemptions) and long ones
    (memory binds: swaps, and recomputes once the host space is full). Each request added brings
    an abort with probability `abort_fraction`, spent at a random later step on a random live
    request of a random state; now and then a finished request is aborted too (must be refused)."""
    rng = np.random.default_rng(seed)
    vocab = engine.model.config.vocab_size
    prompts, params = {}, {}
    finals, streamed, aborted, abort_states = {}, {}, set(), {}
    aborts_due = late_aborts = step = 0
    to_add = size.requests
    while to_add or engine.has_unfinished():
        long_phase = (step // size.phase_steps) % 2 == 1
        for _ in range(min(to_add, int(rng.integers(size.arrivals[0], size.arrivals[1] + 1)))):
            lo, hi = (size.max_prompt // 2, size.max_prompt) if long_phase else (1, size.max_prompt // 4)
            prompt = rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist()
            sp = SamplingParams(max_new_tokens=int(rng.integers(1, size.max_new + 1)), temperature=0.0,
                                repetition_penalty=1.0, ignore_eos=bool(rng.random() < 0.5), detokenize=False)
            rid = engine.add_request(prompt, sp)
            assert rid not in prompts, "a request id was handed out twice"
            prompts[rid], params[rid] = prompt, sp
            aborts_due += bool(rng.random() < size.abort_fraction)
            to_add -= 1
        if aborts_due and engine.num_unfinished and (rng.random() < 0.3 or not to_add):
            by_state: dict[str, list[int]] = {}
            for rid in engine._requests:
                by_state.setdefault(_state(engine, rid), []).append(rid)
            state = sorted(by_state)[int(rng.integers(len(by_state)))]
            rid = by_state[state][int(rng.integers(len(by_state[state])))]
            assert rid not in finals
            assert engine.abort(rid), f"abort({rid}) of a live request returned False"
            assert not engine.abort(rid), "a second abort() of the same request returned True"
            aborted.add(rid)
            abort_states[state] = abort_states.get(state, 0) + 1
            aborts_due -= 1
        if finals and rng.random() < 0.05:
            done = list(finals)[int(rng.integers(len(finals)))]
            assert not engine.abort(done), f"abort({done}) after its final output returned True"
            late_aborts += 1
        assert not engine.abort(10**9)
        for out in engine.step():
            rid = out.request_id
            assert rid in prompts, f"an output for request {rid}, never added"
            assert rid not in finals, f"an output for request {rid} after its final output"
            got = streamed.setdefault(rid, [])
            got.extend(out.new_token_ids)
            assert got == list(out.token_ids), f"request {rid}: the new tokens do not add up to token_ids"
            if out.finished:
                finals[rid] = out
        step += 1
        assert step < 40 * size.requests, "the engine made no progress"
    engine.check_idle()

    assert set(finals) == set(prompts), f"{len(set(prompts) - set(finals))} requests got no final output"
    for rid, out in finals.items():
        n, sp = len(out.token_ids), params[rid]
        if rid in aborted:
            assert out.finish_reason == FinishReason.ABORT, (rid, out.finish_reason)
            assert n < sp.max_new_tokens and (sp.ignore_eos or EOS not in out.token_ids), (rid, out.token_ids)
        elif out.finish_reason == FinishReason.STOP:
            assert not sp.ignore_eos and out.token_ids[-1] == EOS and EOS not in out.token_ids[:-1], (rid, out)
        else:
            assert out.finish_reason == FinishReason.LENGTH, (rid, out.finish_reason)
            assert n == sp.max_new_tokens and (sp.ignore_eos or EOS not in out.token_ids), (rid, out.token_ids)
        assert n <= sp.max_new_tokens
    return dict(prompts=prompts, outputs={rid: list(o.token_ids) for rid, o in finals.items()}, aborted=aborted,
                abort_states=abort_states, late_aborts=late_aborts, steps=step)


def _reference_check(model, size: Size, prompts: dict, outputs: dict) -> dict:
    """One teacher-forced forward per request over prompt + output[:-1] in a fresh cache and
    runner (slot 0, every position's logits): each output token must be the argmax, unless within
    GAP of it. Returns counts."""
    cfg = model.config
    param = next(model.parameters())
    max_blocks = -(-size.max_model_len // size.block_size)
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=param.dtype,
                                block_size=size.block_size), max_blocks, 1, max_blocks, param.device)
    cache.assign_tables(torch.arange(max_blocks).view(1, max_blocks))
    runner = ModelRunner(model, cache, max_tokens=size.max_model_len + 1)
    gap = GAP
    checked = excused = requests = 0
    worst = 0.0
    for rid, out in outputs.items():
        if not out:
            continue
        prompt = prompts[rid]
        seq = prompt + out[:-1]
        batch = runner.prepare([Segment(slot=0, token_ids=seq, start=0)])
        idx = torch.arange(len(prompt) - 1, len(seq), device=param.device, dtype=batch.logits_indices.dtype)
        logits, _ = runner.forward(dataclasses.replace(batch, logits_indices=idx))
        logits = logits.float()
        tokens = torch.tensor(out, device=logits.device)
        top = logits.max(dim=-1).values
        behind = (top - logits.gather(1, tokens[:, None])[:, 0]).cpu()     # 0 where the token is the argmax
        bad = torch.nonzero(behind >= gap).flatten().tolist()
        assert not bad, (f"request {rid}: output position {bad[0]} token {out[bad[0]]} is "
                         f"{float(behind[bad[0]]):.4f} below the reference's top logit "
                         f"(prompt {prompt}, output {out})")
        excused += int((behind > 0).sum())
        worst = max(worst, float(behind.max()))
        checked += len(out)
        requests += 1
    assert excused <= MAX_EXCUSED * checked, f"{excused} of {checked} tokens only within {gap} of the top logit"
    return dict(requests_verified=requests, tokens_verified=checked, excused=excused, worst_excused_gap=worst)


def _soak(device: str, size: Size, seed: int = 0) -> dict:
    model, probe = _model(device)
    engine = _engine(model, probe, size)
    t0 = time.perf_counter()
    seen = _serve(engine, size, seed)
    serve_s = time.perf_counter() - t0
    totals = engine.telemetry.totals()
    for kind in ("keep", "swap", "recompute"):
        assert totals[kind] >= size.min_each, f"only {totals[kind]} {kind} preemptions (want {size.min_each}): {totals}"
    verified = _reference_check(model, size, seen["prompts"], seen["outputs"])
    report = dict(requests=len(seen["prompts"]), aborted=len(seen["aborted"]), late_aborts=seen["late_aborts"],
                  abort_states=seen["abort_states"], steps=seen["steps"],
                  keep=totals["keep"], swap=totals["swap"], recompute=totals["recompute"],
                  forced=totals["forced"], recomputed_tokens=totals["recomputed_tokens"],
                  serve_s=round(serve_s, 1), total_s=round(time.perf_counter() - t0, 1), **verified)
    print("soak:", report)
    return report


def test_soak_cpu():
    report = _soak("cpu", CPU)
    assert CPU.requests * 0.05 <= report["aborted"] <= CPU.requests * 0.2, report
    assert len(report["abort_states"]) >= 5, report          # aborts landed in most states


@pytest.mark.gpu
def test_soak_gpu():
    report = _soak("cuda", GPU)
    assert GPU.requests * 0.05 <= report["aborted"] <= GPU.requests * 0.2, report
    assert len(report["abort_states"]) >= 5, report
