"""Checks of one request at the engine's boundary (add_request): the prompt (text through the
tokenizer, or token ids in the vocabulary), its length against max_model_len, stop strings that
need text, and the true / replayed length the oracle needs. A bad request raises ValueError naming
the field and value, and changes nothing."""
from __future__ import annotations

from typing import Sequence

from trail.request import SamplingParams


def check_request(prompt: str | Sequence[int], params: SamplingParams, true_length: int | None, tokenizer,
                  vocab: int, config) -> tuple[list[int], str | None, int | None]:
    """-> (prompt ids, prompt text or None, true length or None)."""
    text = None
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
