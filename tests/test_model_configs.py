"""Random-weight models of each supported family and RoPE scaling equal transformers' (fp32):
Qwen2 (attention bias), Mistral, Llama with linear / llama3 / yarn RoPE, tied and untied
embeddings; presets have the real models' parameter counts."""
import pytest
import torch

from trail.kv_cache import KVCache
from trail.kv_cache_spec import KVCacheSpec
from trail.model_runner import ModelRunner
from trail.models import ModelConfig, from_state_dict, preset, random_model
from trail.segments import Segment

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=256)

CASES = {
    "qwen2-bias": ModelConfig(**SMALL, arch="qwen2", attention_bias=True, rope_theta=1e6,
                              tie_word_embeddings=True),
    "mistral": ModelConfig(**SMALL, arch="mistral", rope_theta=1e6),
    "llama-linear": ModelConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3-rope": ModelConfig(**SMALL, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "yarn": ModelConfig(**SMALL, arch="qwen2", attention_bias=True, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}),
}


def hf_model(config: ModelConfig, seed=0):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[config.arch]
    hf_cfg = cls(**config.to_hf_dict())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():   # norms and biases too, or their paths go untested
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def runner_for(model, slots=4, max_blocks=8, tap_layer=None):
    cfg = model.config
    cache = KVCache(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), slots * max_blocks, slots,
                    max_blocks)
    cache.pool.fill_(float("nan"))
    perm = torch.randperm(slots * max_blocks, generator=torch.Generator().manual_seed(3))
    cache.assign_tables(perm.view(slots, max_blocks))
    return ModelRunner(model, cache, tap_layer=tap_layer)


@pytest.mark.parametrize("name", list(CASES))
def test_random_config_matches_transformers(name):
    config = CASES[name]
    hf = hf_model(config)
    ours = from_state_dict(config, hf.state_dict())
    runner = runner_for(ours)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (100, 9, 61)]
    # chunked: slot 0 in chunks 40 + 60, slot 2 one prefill, slot 3 prefill 30 then 31 one by one
    steps = [[(0, 0, 40), (2, 0, 9), (3, 0, 30)], [(0, 40, 100), (3, 30, 31)]]
    steps += [[(3, p, p + 1)] for p in range(31, 61)]
    got = {0: [], 2: [], 3: []}
    seq_of = {0: seqs[0], 2: seqs[1], 3: seqs[2]}
    for step in steps:
        segs = [Segment(s, seq_of[s][a:b], a, "decode" if b - a == 1 and a else "prefill") for s, a, b in step]
        batch = runner.prepare(segs)
        logits, _ = ours(batch.input_ids, batch.meta, runner.kv_cache)
        for (s, a, b), part in zip(step, logits.split([b - a for _, a, b in step])):
            got[s].append(part)
    for s, seq in seq_of.items():
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        out = torch.cat(got[s])
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{name} slot {s}: rel err {err:.2e}"


def test_rope_scaling_changes_long_positions():
    """Guards the test above: the scaled RoPE variants really differ from the default one."""
    from trail.models.rope import inv_frequencies

    base = inv_frequencies(CASES["mistral"].replace(rope_theta=500000.0))[0]
    for name in ("llama3-rope", "llama-linear"):
        assert not torch.allclose(inv_frequencies(CASES[name])[0], base)


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3.2-1b", 1.24)])
def test_presets_have_real_parameter_counts(name, billions):
    assert abs(preset(name).num_params() / 1e9 - billions) < 0.01


def test_hf_config_roundtrip():
    for config in CASES.values():
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_random_model_tied_and_untied():
    tied = random_model(CASES["qwen2-bias"])
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = random_model("tiny")
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert torch.isfinite(untied.layers[0].self_attn.qkv_proj.weight).all()
    with pytest.raises(KeyError, match="presets"):
        random_model("llama-9000")
