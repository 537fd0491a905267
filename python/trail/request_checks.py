"""Checks of one request at the engine's boundary (add_request): the prompt (text through the
tokenizer, optionally through the model's chat template; or token ids in the vocabulary), its
length against max_model_len, stop strings that need text, the true / replayed length the oracle
needs, and a caller's request id. A bad request raises ValueError naming the field, the value (for
a prompt: the bad element's index) and what is allowed, and changes nothing. Nothing is coerced:
a prompt is a str, a sequence of ints (numpy integers too; not bool, float, str or bytes) or a list
of chat messages; a request id is an int in [0, MAX_REQUEST_ID)."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch

from trail.request import SamplingParams
from trail.sampling import _is_int

# Request ids live in int64 columns (the scheduler's ids, telemetry) and the engine's next
# automatic id is one past the largest id seen: ids below 2**62 keep that far from overflowing.
MAX_REQUEST_ID = 2**62


def chat_text(tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> str:
    """A user message (str) or a list of {"role", "content"} messages, through the model's chat
    template, ending with the assistant's turn (what an instruct model expects)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat needs a tokenizer with a chat template; pass the prompt as text or token ids")
    if not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"a chat prompt must be text (str) or a list of {{'role', 'content'}} messages, got "
                         f"{type(prompt).__name__} {prompt!r:.80}")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"chat message {i} must be a mapping with str 'role' and 'content', got {m!r}")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_request_id(request_id) -> int:
    """A caller's request id: an int (or numpy integer; not bool, float or str) in
    [0, MAX_REQUEST_ID). -> the id as int; ValueError naming the value and the range otherwise."""
    if not (_is_int(request_id) and 0 <= request_id < MAX_REQUEST_ID):
        raise ValueError(f"request_id must be None (automatic) or an integer in [0, 2**62), got {request_id!r} "
                         f"({type(request_id).__name__})")
    return int(request_id)


def prompt_token_ids(prompt, vocab: int) -> list[int]:
    """Token ids of a prompt given as ids: a list / tuple / range (or a 1-D integer numpy array /
    torch tensor) of ints in [0, vocab). ValueError naming the bad element's index and value."""
    kind = type(prompt).__name__
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise ValueError(f"prompt must be text (str), token ids (a sequence of ints) or chat messages, got {kind} "
                         f"{bytes(prompt)[:40]!r} (decode bytes to str first)")
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise ValueError(f"prompt tensor must be a 1-D integer tensor of token ids, got shape "
                             f"{tuple(prompt.shape)} dtype {prompt.dtype}")
        prompt = prompt.tolist()
    elif isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"prompt array must be a 1-D integer array of token ids, got shape {prompt.shape} "
                             f"dtype {prompt.dtype}")
        prompt = prompt.tolist()
    elif not isinstance(prompt, Sequence) or isinstance(prompt, str):
        raise ValueError(f"prompt must be text (str), token ids (a sequence of ints) or chat messages, got {kind} "
                         f"{prompt!r:.80}")
    ids = []
    for i, t in enumerate(prompt):
        if not _is_int(t):
            raise ValueError(f"prompt[{i}] must be a token id (an int, not {type(t).__name__}), got {t!r:.80}")
        if not 0 <= t < vocab:
            raise ValueError(f"prompt[{i}] = {t}: prompt token ids must lie in [0, {vocab}) (the model's vocabulary)")
        ids.append(int(t))
    return ids


def check_request(prompt, params: SamplingParams, true_length: int | None, tokenizer, vocab: int, config,
                  chat: bool = False) -> tuple[list[int], str | None, int | None]:
    """-> (prompt ids, prompt text or None, true length or None). `chat` (or a list of message
    dicts as the prompt): the text goes through the chat template first."""
    text = None
    if chat or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], Mapping)):
        prompt = chat_text(tokenizer, prompt)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids")
        text = prompt
        ids = [int(t) for t in tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    else:
        ids = prompt_token_ids(prompt, vocab)
    if not ids:
        raise ValueError("empty prompt")
    if text is not None and (min(ids) < 0 or max(ids) >= vocab):
        raise ValueError(f"the tokenizer gave token ids outside the model's vocabulary [0, {vocab})")
    limit = config.max_model_len
    if len(ids) + params.max_new_tokens > limit:
        raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                         f"max_model_len={limit}")
    if params.stop and (tokenizer is None or not params.detokenize):
        raise ValueError(f"SamplingParams.stop={params.stop!r} needs text: an engine with a tokenizer and "
                         f"detokenize=True")
    if params.replay_length is not None:
        true_length = params.replay_length
    if true_length is not None and not (_is_int(true_length) and true_length >= 1):
        raise ValueError(f"true_length must be None or an integer >= 1, got {true_length!r} "
                         f"({type(true_length).__name__})")
    if true_length is not None:
        true_length = int(true_length)
    if config.policy == "oracle" and true_length is None:
        raise ValueError("the oracle policy needs each request's true_length")
    return ids, text, true_length


def deprecated_replay(params: SamplingParams, replay_length: int, where: str) -> SamplingParams:
    """The deprecated `replay_length` keyword (of add_request / generate) as the sampling
    parameter it became, with a DeprecationWarning at the caller's caller."""
    warnings.warn(f"{where} is deprecated; use SamplingParams(replay_length=...)", DeprecationWarning, stacklevel=3)
    return replace(params, replay_length=replay_length)


def check_arrival(arrival) -> float:
    """An arrival time on the engine's clock: a finite real number (int, float or a numpy scalar
    of either; not bool)."""
    if isinstance(arrival, (bool, np.bool_)) or not isinstance(arrival, (int, float, np.integer, np.floating)) \
            or not math.isfinite(arrival):
        raise ValueError(f"arrival must be a finite number of seconds (int or float), got {arrival!r} "
                         f"({type(arrival).__name__})")
    return float(arrival)


def check_engine_parts(config, model_config, probe, probe_layer, prompt_predictor) -> None:
    """The engine constructor's checks of its parts against the model and the policy."""
    if config.policy == "trail" and probe is None:
        raise ValueError("the trail policy needs a length probe (probe=..., probe_layer=...)")
    if config.policy == "sjf_prompt" and prompt_predictor is None:
        raise ValueError("the sjf_prompt policy needs a prompt predictor")
    layers = model_config.num_layers
    if probe is not None and (probe_layer is None or isinstance(probe_layer, bool) or not 0 <= probe_layer < layers):
        raise ValueError(f"probe_layer must be a layer index in [0, {layers}), got {probe_layer!r}")
    if probe is not None and probe.hidden_size != model_config.hidden_size:
        raise ValueError(f"probe: reads hidden states of width {probe.hidden_size}, the model's are "
                         f"{model_config.hidden_size} wide (a probe trained for another model?)")
    if config.max_model_len > model_config.max_position_embeddings:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                         f"max_position_embeddings={model_config.max_position_embeddings}")


def eos_lookup(tokenizer, eos_token_ids, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted stop ids, a bool table by token id): the ids given, else the tokenizer's eos id.
    The table makes the per-step check one lookup per sampled token (np.isin: ~1 us per row)."""
    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_token_ids = [] if eos is None else [eos]
    ids = np.array(sorted(set(int(e) for e in eos_token_ids)), np.int64)
    if (ids < 0).any():
        raise ValueError(f"eos_token_ids must be non-negative token ids, got {sorted(eos_token_ids)}")
    table = np.zeros(max(vocab, int(ids.max(initial=-1)) + 1), bool)
    table[ids] = True
    return ids, table
