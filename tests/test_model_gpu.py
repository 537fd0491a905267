"""On the GPU: the bf16 SmolLM2 forward is as close to the fp32 one as transformers' bf16 forward
is, and 64 ragged prompts decode through the paged cache (bf16 and fp32) to the same logits as
full-sequence forwards of transformers."""
import pytest
import torch

from trail.kv_cache import KVCache, KVCacheSpec
from trail.model_runner import ModelRunner, Segment
from trail.models import load_hf
from trail.sampling import SampleParams

pytestmark = pytest.mark.gpu

TOPICS = ["the sea", "a mountain", "Paris", "prime numbers", "coffee", "a robot", "winter", "music"]


def prompts(tok, n):
    out = []
    for i in range(n):
        text = f"Tell me about {TOPICS[i % len(TOPICS)]}." + " Please be detailed." * (i % 7)
        out.append(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
    return out


@pytest.fixture(scope="module")
def hf32(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).cuda().eval()
    return model, tok


def make_runner(model, slots, max_blocks, dtype):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
                    slots * max_blocks + 7, slots, max_blocks, device="cuda")
    cache.pool.fill_(float("nan"))
    perm = torch.randperm(slots * max_blocks + 7, generator=torch.Generator().manual_seed(0))[: slots * max_blocks]
    cache.block_tables.copy_(perm.view(slots, max_blocks).to(torch.int32))
    return ModelRunner(model, cache)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_bf16_forward_as_close_as_transformers_bf16(smollm2_dir, hf32):
    from transformers import AutoModelForCausalLM

    ref_model, tok = hf32
    hf16 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).cuda().eval()
    ours = load_hf(smollm2_dir, device="cuda")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = prompts(tok, 4)
    runner = make_runner(ours, 4, 16, torch.bfloat16)
    batch = runner.prepare([Segment(s, p, 0) for s, p in enumerate(ids)])
    logits, _ = ours(batch.input_ids, batch.meta, runner.kv_cache)
    ours_errs, hf_errs, agree = [], [], []
    for got, p in zip(logits.split([len(p) for p in ids]), ids):
        x = torch.tensor([p], device="cuda")
        with torch.no_grad():
            ref, base = ref_model(x).logits[0].float(), hf16(x).logits[0].float()
        ours_errs.append(rel(got, ref))
        hf_errs.append(rel(base, ref))
        agree.append((got.argmax(-1) == ref.argmax(-1)).float().mean().item())
    print(f"bf16 rel err vs fp32: ours {max(ours_errs):.3e}, transformers {max(hf_errs):.3e}; "
          f"top-1 agreement {min(agree):.3f}")
    assert max(ours_errs) < 2 * max(hf_errs) + 5e-3
    assert max(ours_errs) < 5e-2
    assert min(agree) > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch64_paged_decode_matches_full_forward(smollm2_dir, hf32, dtype):
    ref_model, tok = hf32
    ours = load_hf(smollm2_dir, device="cuda", dtype=dtype)
    ids = prompts(tok, 64)
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
    errs, agree = [], []
    for s, (p, t) in enumerate(zip(ids, tokens)):
        x = torch.tensor([p + t[:-1]], device="cuda")
        with torch.no_grad():
            ref = ref_model(x).logits[0, len(p) - 1:].float()   # predicts t[0] .. t[-1]
        errs.append(rel(got[s], ref))
        agree.append((got[s].argmax(-1) == ref.argmax(-1)).float().mean().item())
    print(f"{dtype}: batch-64 paged decode vs transformers fp32 full forward: max rel err "
          f"{max(errs):.3e}, min top-1 agreement {min(agree):.3f}")
    if dtype == torch.float32:
        assert max(errs) < 5e-4
    else:
        assert max(errs) < 5e-2 and sum(agree) / len(agree) > 0.9
