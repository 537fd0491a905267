"""Our forward with the real SmolLM2-135M-Instruct weights equals transformers' (fp32): logits of
batched ragged prompts, chunked prefill over a cached prefix, the layer tap, greedy 32-token
continuations with and without repetition penalty, and the GGUF loader's weights."""
import pytest
import torch

from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.models import load_hf
from trail.sampling import SampleParams
from trail.segments import Segment

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def models(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return load_hf(smollm2_dir), hf, tok


def make_runner(model, tap_layer=None, slots=4, max_blocks=16, seed=0):
    cfg = model.config
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float32)
    num_blocks = slots * max_blocks + 5
    cache = KVCache(spec, num_blocks, slots, max_blocks)
    cache.pool.fill_(float("nan"))           # a stale read would show
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)[: slots * max_blocks]
    cache.assign_tables(perm.view(slots, max_blocks))
    return ModelRunner(model, cache, tap_layer=tap_layer)


def chat_ids(tok, text):
    msgs = [{"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)


def all_logits(runner, segments):
    """Logits of every token of the step (for comparison), and the tap."""
    batch = runner.prepare(segments)
    runner.seen.index_fill_(0, batch.reset_slots, False)
    logits, tap = runner.model(batch.input_ids, batch.meta, runner.kv_cache, tap_layer=runner.tap_layer)
    return logits, tap


def test_logits_batched_ragged_prompts(models):
    ours, hf, tok = models
    ids = [tok(p).input_ids for p in PROMPTS] + [[1, 2, 3, 4, 5]]
    assert len({len(i) for i in ids}) == len(ids)
    runner = make_runner(ours)
    logits, _ = all_logits(runner, [Segment(s, i, 0) for s, i in enumerate(ids)])
    for got, i in zip(logits.split([len(i) for i in ids]), ids):
        with torch.no_grad():
            ref = hf(torch.tensor([i])).logits[0]
        assert rel_err(got, ref) < 1e-4


def test_chunked_prefill_against_cached_prefix(models):
    """A prompt fed in chunks (7, 16, rest) while another request decodes beside it."""
    ours, hf, tok = models
    prompt = chat_ids(tok, PROMPTS[2])
    other = tok(PROMPTS[0]).input_ids
    runner = make_runner(ours)
    chunks = [prompt[:7], prompt[7:23], prompt[23:]]
    got, pos, other_tok = [], 0, None
    for n, chunk in enumerate(chunks):
        segs = [Segment(2, chunk, pos, sample=n == len(chunks) - 1)]
        if n == 0:
            segs.append(Segment(0, other, 0))
        else:
            segs.append(Segment(0, [other_tok], len(other) + n - 1, "decode"))
        logits, _ = all_logits(runner, segs)
        got.append(logits[: len(chunk)])
        other_tok = int(logits[-1].argmax())
        pos += len(chunk)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert rel_err(torch.cat(got), ref) < 1e-4


@pytest.mark.parametrize("layer", [0, 11, 28])
def test_tap_equals_hidden_states(models, layer):
    ours, hf, tok = models
    ids = [tok(PROMPTS[0]).input_ids, tok(PROMPTS[1]).input_ids]
    runner = make_runner(ours, tap_layer=layer)
    out = runner.step([Segment(1, ids[0], 0), Segment(3, ids[1], 0)])
    tap = out.tap
    assert tap.layer == layer and tap.states.shape == (sum(map(len, ids)), 576)
    assert tap.cu_seqlens.tolist() == [0, len(ids[0]), len(ids[0]) + len(ids[1])]
    assert tap.slot_ids.tolist() == [1, 3]
    for s, i in enumerate(ids):
        with torch.no_grad():
            ref = hf(torch.tensor([i]), output_hidden_states=True).hidden_states[layer + 1][0]
        got = tap.states[tap.cu_seqlens[s]:tap.cu_seqlens[s + 1]]
        assert rel_err(got, ref) < 1e-5


def test_tap_last_layer_is_pre_norm_output(models):
    ours, hf, tok = models
    ids = tok(PROMPTS[2]).input_ids
    captured = {}
    last = hf.model.layers[-1]
    handle = last.register_forward_hook(
        lambda m, a, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            normed = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    finally:
        handle.remove()
    runner = make_runner(ours, tap_layer=29)
    tap = runner.step([Segment(0, ids, 0)]).tap
    assert rel_err(tap.states, captured["h"][0]) < 1e-5
    assert rel_err(tap.states, normed) > 0.1          # not the post-norm state transformers returns


def generate(runner, prompts, steps, params):
    """Prefill all prompts in one step, then decode them together; tokens per request."""
    out = runner.step([Segment(s, p, 0, params=params) for s, p in enumerate(prompts)])
    tokens = [[t] for t in out.next_tokens.tolist()]
    for _ in range(steps - 1):
        segs = [Segment(s, [toks[-1]], len(p) + len(toks) - 1, "decode", params=params)
                for s, (p, toks) in enumerate(zip(prompts, tokens))]
        for toks, t in zip(tokens, runner.step(segs).next_tokens.tolist()):
            toks.append(t)
    return tokens


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_continuations_equal_generate(models, penalty):
    ours, hf, tok = models
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    runner = make_runner(ours, slots=3, max_blocks=8)
    got = generate(runner, prompts, 32, SampleParams(repetition_penalty=penalty))
    for p, toks in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=32, repetition_penalty=penalty,
                              pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
        assert toks[: len(ref)] == ref, tok.decode(ref)


def test_gguf_loader_matches_hf_folder(models):
    pytest.importorskip("gguf")
    from trail.assets import smollm2_gguf_path
    from trail.models.loader import gguf_tensors

    _, hf, _ = models
    config, tensors = gguf_tensors(smollm2_gguf_path())
    assert config.num_layers == 30 and config.tie_word_embeddings and config.num_kv_heads == 3
    state = hf.state_dict()
    for name, t in tensors.items():
        assert torch.equal(t, state[name]), name
    assert set(tensors) == {n for n in state if n != "lm_head.weight"}
