"""transformers as the generation and feature backend of the predictor pipeline.

It is the fallback when our own runner is not usable, and the oracle the runner's layer tap is
tested against. Layer capture uses forward hooks on the decoder layers, so "layer i" is the output
of decoder layer i before the final norm for every i (DESIGN.md layer convention), including the
last layer, where `output_hidden_states` would give the normed state instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module          # a *ForCausalLM
    tokenizer: object
    model_id: str                   # what probe files record
    device: torch.device
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def decoder_layers(self):
        return self.model.model.layers

    @property
    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])})

    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        return int(pad if pad is not None else self.eos_token_ids()[0])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(model_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, model_id: str | None = None) -> LoadedModel:
    """Load an HF folder; default: SmolLM2-135M-Instruct from `trail.assets` (fp32 on CPU,
    bf16 on CUDA)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        from trail.assets import SMOLLM2_ID, smollm2_hf_dir

        model_dir, model_id = smollm2_hf_dir(), model_id or SMOLLM2_ID
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    mid = model_id or getattr(model.config, "_name_or_path", None) or str(model_dir)
    logger.info("loaded %s (%d layers, d=%d) on %s in %s", mid, model.config.num_hidden_layers,
                model.config.hidden_size, device, dtype)
    return LoadedModel(model, tok, mid, device, dtype)


def chat_ids(tokenizer, text: str) -> list[int]:
    """The templated prompt (the model's chat template, generation prompt added)."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def generate(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             repetition_penalty: float = 1.0, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> list[tuple[list[int], str]]:
    """One batch through `model.generate` (left padded). Returns per prompt (output ids up to and
    including the first EOS, finish reason 'eos' or 'length')."""
    eos = lm.eos_token_ids()
    pad = lm.pad_token_id()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                  repetition_penalty=repetition_penalty)
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), **kwargs)
    new = out[:, width:].tolist()
    results = []
    eos_set = set(eos)
    for row in new:
        cut = next((j for j, t in enumerate(row) if t in eos_set), None)
        if cut is None:
            results.append((row[:max_new_tokens], "length"))
        else:
            results.append((row[: cut + 1], "eos"))
    return results


def length_batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> Iterator[list[int]]:
    """Indices grouped by similar length (longest first) so that batch * longest <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and ((len(batch) + 1) * longest > max_tokens or len(batch) >= max_batch):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def forward_layers(lm: LoadedModel, seqs: Sequence[Sequence[int]], layers: Sequence[int],
                   consume: Callable[[int, torch.Tensor], None]) -> None:
    """Teacher-forced forward of right-padded `seqs`; `consume(layer, states[B, T, d])` is called
    from a hook on each decoder layer in `layers` (padding rows beyond a sequence are garbage)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), lm.pad_token_id(), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    handles = []
    wanted = set(layers)
    last = max(wanted)

    class _Stop(Exception):
        pass

    def hook_for(i):
        def hook(_module, _args, output):
            consume(i, output[0] if isinstance(output, tuple) else output)
            if i == last:
                raise _Stop
        return hook

    for i in wanted:
        handles.append(lm.decoder_layers[i].register_forward_hook(hook_for(i)))
    try:
        with torch.inference_mode():
            lm.model.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
