"""What a `random:<preset>` model is served with, so text and chat work end to end on a model
without files (CI runs `trail serve random:tiny`): a byte-level BPE tokenizer built in memory
with the `tokenizers` library (every byte is a token, then merges of byte pairs up to the model's
vocabulary, then <|endoftext|>, <|im_start|>, <|im_end|>; a ChatML chat template; EOS
<|im_end|>), and a seeded random length probe for the policies that need one. Both are
deterministic, so the server process (which tokenizes) and the engine core process (which
detokenizes) build the same tokenizer. The text a random model writes is noise; the tokens are
what tests compare.

`model_tokenizer(source)` is the one place that decides a source's tokenizer: the byte tokenizer
for `random:*`, else the model's own (`trail.models.loader.load_tokenizer`).
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS = "<|im_end|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# characters merged first (most frequent in English text), then every other byte pair
_FREQUENT = " etaoinshrdlcumwfgypbvk.,\n"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pair_order() -> list[tuple[int, int]]:
    frequent = list(_FREQUENT.encode())
    first = [(a, b) for a in frequent for b in frequent]
    seen = set(first)
    return first + [(a, b) for a in range(256) for b in range(256) if (a, b) not in seen]


def byte_tokenizer(vocab_size: int):
    """A transformers `PreTrainedTokenizerFast` over a byte-level BPE with exactly `vocab_size`
    ids: 256 bytes, byte-pair merges, the three specials last (ids vocab_size-3 .. vocab_size-1);
    a vocabulary larger than 256 + 65,536 + 3 is padded with reserved special tokens before them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"a byte tokenizer needs a vocabulary of at least {256 + len(SPECIALS)} ids, the model has "
                         f"{vocab_size}")
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = []
    for a, b in _pair_order()[:vocab_size - 256 - len(SPECIALS)]:
        merges.append((b2u[a], b2u[b]))
        vocab[b2u[a] + b2u[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(SPECIALS) - len(vocab))]
    tok.add_special_tokens(reserved + list(SPECIALS))
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<|endoftext|>",
                                   chat_template=CHATML, clean_up_tokenization_spaces=False)


def random_preset(source: str) -> str | None:
    """The preset name of a `random:<preset>` source, else None."""
    text = str(source)
    return text.split(":", 1)[1] if text.startswith("random:") else None


def model_tokenizer(source):
    """The tokenizer a served model uses: the byte tokenizer for `random:*`, else the model's own."""
    name = random_preset(source)
    if name is not None:
        from trail.models.config import preset

        return byte_tokenizer(preset(name).vocab_size)
    from trail.models.loader import load_tokenizer

    return load_tokenizer(source)


def random_probe(model_config, seed: int = 0, max_len: int = 512):
    """(probe, layer, max_new) of a seeded random length probe for a random model: 8 equal bins
    over [0, max_len), reading the middle layer."""
    import torch

    from trail_kernels.probe_params import ProbeParams

    probe = ProbeParams.random(model_config.hidden_size, 32, 8, max_len=max_len,
                               generator=torch.Generator().manual_seed(seed), scale=2.0)
    return probe, model_config.num_layers // 2, max_len


def engine_parts(source, *, probe: str | None, prompt_predictor: str | None, device, dtype, seed: int = 0) -> dict:
    """`LLMEngine(**parts)` for a served model. A `random:*` model gets the byte tokenizer (its
    EOS the engine's stop id) and, with probe='shipped', the random probe; no shipped prompt
    predictor exists for it (a path still works)."""
    from trail.engine_loading import load_engine_parts

    random = random_preset(source) is not None
    shipped = probe == "shipped"
    parts = load_engine_parts(source, probe=None if random and shipped else probe,
                              prompt_predictor=None if random and prompt_predictor in ("boe", "minilm")
                              else prompt_predictor, device=device, dtype=dtype)
    if random:
        tok = byte_tokenizer(parts["model"].config.vocab_size)
        parts.update(tokenizer=tok, eos_token_ids=[tok.eos_token_id])
        if shipped:
            probe_params, layer, max_new = random_probe(parts["model"].config, seed)
            parts.update(probe=probe_params, probe_layer=layer, probe_max_new=max_new)
            logger.info("random model: a seeded random length probe on layer %d", layer)
    return parts
