"""Checks of one request at the engine's boundary (add_request): the prompt (text through the
tokenizer, optionally through the model's chat template; or token ids in the vocabulary), its length against max_model_len, stop strings that
need text, and the true / replayed length the oracle needs. A bad request raises ValueError naming
the field and value, and changes nothing."""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Mapping, Sequence

from trail.request import SamplingParams


def chat_text(tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> str:
    """A user message (str) or a list of {"role", "content"} messages, through the model's chat
    template, ending with the assistant's turn (what an instruct model expects)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat needs a tokenizer with a chat template; pass the prompt as text or token ids")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"chat message {i} must be a mapping with str 'role' and 'content', got {m!r}")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    limit = config.max_model_len
    if len(ids) + params.max_new_tokens > limit:
        raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                         f"max_model_len={limit}")
    if params.stop and (tokenizer is None or not params.detokenize):
        raise ValueError(f"SamplingParams.stop={params.stop!r} needs text: an engine with a tokenizer and "
                         f"detokenize=True")
    if params.replay_length is not None:
        true_length = params.replay_length
    if true_length is not None and not (isinstance(true_length, int) and true_length >= 1):
        raise ValueError(f"true_length must be an integer >= 1, got {true_length!r}")
    if config.policy == "oracle" and true_length is None:
        raise ValueError("the oracle policy needs each request's true_length")
    return ids, text, true_length


def deprecated_replay(params: SamplingParams, replay_length: int, where: str) -> SamplingParams:
    """The deprecated `replay_length` keyword (of add_request / generate) as the sampling
    parameter it became, with a DeprecationWarning at the caller's caller."""
    warnings.warn(f"{where} is deprecated; use SamplingParams(replay_length=...)", DeprecationWarning, stacklevel=3)
    return replace(params, replay_length=replay_length)
