"""On the GPU: the bf16 SmolLM2 forward is as close to the fp32 one as transformers' bf16 forward
is, and 64 ragged prompts decode through the paged cache (bf16 and fp32) to the same logits as
full-sequence forwards of transformers."""
import pytest
import torch

from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.models import load_hf
from trail.predictor.prompts import synthetic_chat_prompts
from trail.sampling import SampleParams
from trail.segments import Segment

pytestmark = pytest.mark.gpu



@pytest.fixture(scope="module")
def hf(smollm2_dir):
    """(transformers fp32 = the reference, transformers bf16 = the baseline, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).cuda().eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).cuda().eval()
    return ref, base, tok


def make_runner(model, slots, max_blocks, dtype):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
                    slots * max_blocks + 7, slots, max_blocks, device="cuda")
    cache.pool.fill_(float("nan"))
    perm = torch.randperm(slots * max_blocks + 7, generator=torch.Generator().manual_seed(0))[: slots * max_blocks]
    cache.assign_tables(perm.view(slots, max_blocks))
    return ModelRunner(model, cache)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_bf16_forward_as_close_as_transformers_bf16(smollm2_dir, hf):
    ref_model, hf16, tok = hf
    ours = load_hf(smollm2_dir, device="cuda")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = synthetic_chat_prompts(tok, 4)
    runner = make_runner(ours, 4, 16, torch.bfloat16)
    batch = runner.prepare([Segment(s, p, 0) for s, p in enumerate(ids)])
    logits, _ = ours(batch.input_ids, batch.meta, runner.kv_cache)
    errs, agree = {"ours": [], "hf": []}, {"ours": [], "hf": []}
    for got, p in zip(logits.split([len(p) for p in ids]), ids):
        x = torch.tensor([p], device="cuda")
        with torch.no_grad():
            ref, base = ref_model(x).logits[0].float(), hf16(x).logits[0].float()
        for who, out in (("ours", got), ("hf", base)):
            errs[who].append(rel(out, ref))
            agree[who].append((out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    check_bf16_against_baseline(errs, agree, "forward")


def check_bf16_against_baseline(errs, agree, what):
    """Ours (bf16) vs fp32 must be about as close as transformers bf16 vs fp32, same inputs."""
    e = {k: max(v) for k, v in errs.items()}
    a = {k: sum(v) / len(v) for k, v in agree.items()}
    print(f"{what}: bf16 max rel err vs transformers fp32: ours {e['ours']:.3e}, transformers bf16 "
          f"{e['hf']:.3e}; mean top-1 agreement: ours {a['ours']:.4f}, transformers bf16 {a['hf']:.4f}")
    assert e["ours"] <= 1.5 * e["hf"] + 5e-3
    assert a["ours"] >= a["hf"] - 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch64_paged_decode_matches_full_forward(smollm2_dir, hf, dtype):
    ref_model, hf16, tok = hf
    ours = load_hf(smollm2_dir, device="cuda", dtype=dtype)
    ids = synthetic_chat_prompts(tok, 64)
    steps = 24
    runner = make_runner(ours, 64, 8, dtype)
    params = SampleParams(repetition_penalty=1.1)
    batch = runner.prepare([Segment(s, p, 0, params=params) for s, p in enumerate(ids)])
    logits, _ = runner.forward(batch)
    step_logits = [logits]
    tokens = [[t] for t in runner.sample(logits, batch).tolist()]
    for _ in range(steps - 1):
        segs = [Segment(s, [t[-1]], len(p) + len(t) - 1, "decode", params=params)
                for s, (p, t) in enumerate(zip(ids, tokens))]
        batch = runner.prepare(segs)
        assert batch.meta.decode_only
        logits, _ = runner.forward(batch)
        step_logits.append(logits)
        for t, n in zip(tokens, runner.sample(logits, batch).tolist()):
            t.append(n)
    got = torch.stack(step_logits, 1)                          # [64, steps, vocab]
    errs, agree = {"ours": [], "hf": []}, {"ours": [], "hf": []}
    for s, (p, t) in enumerate(zip(ids, tokens)):
        x = torch.tensor([p + t[:-1]], device="cuda")
        with torch.no_grad():
            ref = ref_model(x).logits[0, len(p) - 1:].float()   # predicts t[0] .. t[-1]
            base = hf16(x).logits[0, len(p) - 1:].float()
        for who, out in (("ours", got[s]), ("hf", base)):
            errs[who].append(rel(out, ref))
            agree[who].append((out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    if dtype == torch.float32:
        print(f"fp32 batch-64 paged decode vs transformers fp32 full forward: max rel err "
              f"{max(errs['ours']):.3e}, mean top-1 agreement {sum(agree['ours']) / 64:.4f}")
        assert max(errs["ours"]) < 5e-4
    else:
        check_bf16_against_baseline(errs, agree, "batch-64 paged decode")


def test_forward_and_sample_do_not_sync_with_the_host():
    """After the host-built batch is copied, the step runs without a device-to-host sync."""
    from trail.models import random_model

    model = random_model("tiny", device="cuda")
    runner = make_runner(model, 4, 8, torch.bfloat16)
    segs = [Segment(0, list(range(40)), 0, params=SampleParams(temperature=0.8, top_p=0.9, top_k=20, seed=1)),
            Segment(2, list(range(7)), 0, params=SampleParams(repetition_penalty=1.2))]
    out = runner.step(segs)                   # warm-up (Triton compiles, caches fill)
    decode = [Segment(0, [1], 40, "decode"), Segment(2, [2], 7, "decode", params=SampleParams(temperature=1.0))]
    for segments in (segs, decode):
        batch = runner.prepare(segments)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits, _ = runner.forward(batch)
            tokens = runner.sample(logits, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert tokens.shape == (2,) and out.next_tokens.shape == (2,)
