"""The OpenAI protocol at trail's boundary: a request body (`/v1/completions`,
`/v1/chat/completions`) checked field by field into a `ParsedRequest`, the output cap rule that
turns it into `SamplingParams` once the prompt's length is known, and the response bodies
(whole, or SSE chunks). Nothing here does I/O.

Fields (docs/SERVER.md has the table): the implemented OpenAI and vLLM sampling fields; OpenAI
fields trail does not implement are accepted with their default value (or null) and refused with
a 400 naming the field otherwise (n > 1, logprobs, penalties, tools, ...); unknown fields are
refused too, so a typo never silently changes nothing.

Forced lengths: `ignore_eos: true` with `max_tokens: L` is how a benchmark replays a recorded
output length (exactly L tokens). trail serves it as `replay_length=L` under the cap every other
request gets (`--default-max-tokens`, else max_model_len - prompt), so the predictor and the
scheduler see the same cap with or without forcing and learn nothing a vLLM server would not.
An output cap a client sets without ignore_eos is a real limit and is what they see.

Client hints (only with `--trust-client-hints`, else ignored): `expected_output_tokens` replaces
the prompt-time length prediction (the probe's own prediction takes over after prefill).
`priority` other than 0 is refused: the scheduler core has no priority key yet.
"""
from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field

MAX_SEED = 2**63 - 1


class ProtocolError(Exception):
    """A request trail refuses: HTTP `status`, OpenAI error `type`, the offending field `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    max_model_len: int
    default_max_tokens: int | None = None
    trust_client_hints: bool = False


@dataclass
class ParsedRequest:
    chat: bool
    prompt: object                      # text, token ids, or [{"role", "content"}] messages
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    ignore_eos: bool = False
    sampling: dict = field(default_factory=dict)   # SamplingParams fields besides the cap
    return_token_ids: bool = False
    return_predictions: bool = False
    expected_output_tokens: float | None = None

    @property
    def forced(self) -> bool:
        """ignore_eos with max_tokens: a forced output length (served as replay_length)."""
        return self.ignore_eos and self.max_tokens is not None


# Not implemented: the values accepted (null always is). A message replaces the generic one.
_NOT_IMPLEMENTED = {
    "n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "min_p": (0,), "use_beam_search": (False,), "length_penalty": (1,), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "truncate_prompt_tokens": (),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
    "min_tokens": (0,), "priority": (0,), "store": (False,), "service_tier": ("auto", "default"),
    "prompt_logprobs": (), "bad_words": ([],), "allowed_token_ids": (),
}
_COMPLETION_ONLY = {"echo": (False,), "logprobs": (), "suffix": ("",)}
_CHAT_ONLY = {"logprobs": (False,), "top_logprobs": (0,), "response_format": ({"type": "text"},), "tools": ([],),
              "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
              "parallel_tool_calls": (True,), "audio": (), "modalities": (["text"],), "prediction": (),
              "reasoning_effort": (), "verbosity": (), "web_search_options": (), "add_generation_prompt": (True,),
              "continue_final_message": (False,), "echo": (False,), "chat_template": (), "chat_template_kwargs": ({},),
              "documents": (), "moderation": ()}
_MESSAGES = {"min_tokens": "min_tokens > 0 is not supported yet (trail's sampler cannot mask EOS before a minimum "
                           "length); send 0 or leave it out",
             "priority": "priority is not supported yet: trail's scheduler ranks requests by predicted remaining "
                         "length only; send 0 or leave it out"}
_IGNORED = ("user", "metadata", "safety_identifier", "prompt_cache_key", "request_id")
_IMPLEMENTED = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                "repetition_penalty", "stream", "stream_options", "return_token_ids", "return_predictions",
                "expected_output_tokens")


def _got(value) -> str:
    return f"got {value!r:.100} ({type(value).__name__})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false, {_got(value)}", name)
    return value


def _int(body: dict, name: str, low: int, high: int = 2**31 - 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not (_is_int(value) and low <= value <= high):
        raise ProtocolError(f"{name} must be an integer in [{low}, {high}], {_got(value)}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not (_is_num(value) and math.isfinite(value)):
        raise ProtocolError(f"{name} must be a finite number, {_got(value)}", name)
    return float(value)


def _check_fields(body: dict, chat: bool) -> None:
    extra = _CHAT_ONLY if chat else _COMPLETION_ONLY
    known = set(_IMPLEMENTED) | set(_NOT_IMPLEMENTED) | set(extra) | set(_IGNORED) | {"messages" if chat else "prompt"}
    if chat:
        known.add("max_completion_tokens")
    for name, value in body.items():
        if name not in known:
            raise ProtocolError(f"unknown field {name!r} (not an OpenAI or vLLM field trail knows)", name)
        allowed = extra.get(name, _NOT_IMPLEMENTED.get(name))
        if allowed is None or value is None:
            continue
        if not any(value == a and type(value) is type(a) or (_is_num(value) and _is_num(a) and value == a)
                   for a in allowed):
            raise ProtocolError(_MESSAGES.get(name, f"{name}={value!r:.80} is not supported yet (only its default "
                                                    f"{' or '.join(repr(a) for a in allowed) or 'null'})"), name)


def _prompt(value):
    """A completions prompt: text, token ids, or a batch of one of either."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > 1:
            raise ProtocolError(f"prompt: a batch of {len(value)} prompts is not supported yet; send one prompt per "
                                f"request", "prompt")
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ProtocolError("prompt must not be empty", "prompt")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return value
    raise ProtocolError(f"prompt must be text, a list of token ids, or a list of one of either, {_got(value)}", "prompt")


def _messages(value) -> list[dict]:
    if not (isinstance(value, list) and value):
        raise ProtocolError(f"messages must be a non-empty list of messages, {_got(value)}", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise ProtocolError(f"{where} must be an object with a string 'role', {_got(m)}", "messages")
        for key in m:
            if key not in ("role", "content", "name"):
                raise ProtocolError(f"{where}.{key} is not supported yet (text messages only)", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ProtocolError(f"{where}.content[{j}]: only text parts are supported, {_got(part)}", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ProtocolError(f"{where}.content must be text or a list of text parts, {_got(content)}", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(body, chat: bool, opts: ServeOptions) -> ParsedRequest:
    """Checks a request body; ProtocolError names the first field that is wrong."""
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, {_got(body)}")
    _check_fields(body, chat)
    model = body.get("model")
    if not isinstance(model, str):
        raise ProtocolError(f"model must be a string naming the served model, {_got(model)}", "model")
    if model != opts.model_name:
        raise ProtocolError(f"the model {model!r} does not exist; this server serves {opts.model_name!r}", "model",
                            404, "not_found_error")
    key = "messages" if chat else "prompt"
    if body.get(key) is None:
        raise ProtocolError(f"{key} is required", key)
    req = ParsedRequest(chat, _messages(body[key]) if chat else _prompt(body[key]))
    req.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise ProtocolError("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise ProtocolError(f"stream_options takes include_usage (and continuous_usage_stats: false), "
                                f"{_got(options)}", "stream_options")
        req.include_usage = _flag(options, "include_usage")
        if _flag(options, "continuous_usage_stats"):
            raise ProtocolError("stream_options.continuous_usage_stats is not supported yet", "stream_options")
    req.max_tokens = _int(body, "max_tokens", 1)
    if chat and body.get("max_completion_tokens") is not None:
        mct = _int(body, "max_completion_tokens", 1)
        if req.max_tokens is not None and req.max_tokens != mct:
            raise ProtocolError(f"max_tokens ({req.max_tokens}) and max_completion_tokens ({mct}) disagree",
                                "max_completion_tokens")
        req.max_tokens = mct
    req.ignore_eos = _flag(body, "ignore_eos")
    top_k = _int(body, "top_k", -1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ProtocolError(f"stop must be a non-empty string or a list of them, {_got(body.get('stop'))}", "stop")
    ids = body.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(_is_int(t) and t >= 0 for t in ids)):
        raise ProtocolError(f"stop_token_ids must be a list of token ids, {_got(ids)}", "stop_token_ids")
    req.sampling = {"temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0),
                    "top_k": 0 if top_k in (None, -1) else top_k, "seed": _int(body, "seed", 0, MAX_SEED),
                    "repetition_penalty": _number(body, "repetition_penalty", 1.0), "stop": tuple(stop),
                    "stop_token_ids": tuple(ids or ())}
    req.return_token_ids = _flag(body, "return_token_ids")
    req.return_predictions = _flag(body, "return_predictions")
    hint = body.get("expected_output_tokens")
    if hint is not None:
        if not (_is_num(hint) and math.isfinite(hint) and hint >= 0):
            raise ProtocolError(f"expected_output_tokens must be a finite number >= 0, {_got(hint)}",
                                "expected_output_tokens")
        req.expected_output_tokens = float(hint) if opts.trust_client_hints else None
    return req


def sampling_params(req: ParsedRequest, prompt_len: int, opts: ServeOptions):
    """The request's SamplingParams under the cap rule (module docstring): the cap a request
    without max_tokens gets is min(--default-max-tokens, max_model_len - prompt); a forced length
    L (ignore_eos + max_tokens) runs as replay_length=L under max(that cap, L)."""
    from trail.request import SamplingParams

    key = "messages" if req.chat else "prompt"
    room = opts.max_model_len - prompt_len
    if room < 1:
        raise ProtocolError(f"the prompt has {prompt_len} tokens and max_model_len is {opts.max_model_len}: no room "
                            f"for output", key)
    cap = room if opts.default_max_tokens is None else min(opts.default_max_tokens, room)
    replay = None
    if req.max_tokens is None:
        max_new = cap
    elif req.max_tokens > room:
        raise ProtocolError(f"the prompt ({prompt_len} tokens) + max_tokens ({req.max_tokens}) exceed max_model_len "
                            f"({opts.max_model_len})", "max_tokens")
    elif req.forced:
        max_new, replay = max(cap, req.max_tokens), req.max_tokens
    else:
        max_new = req.max_tokens
    try:
        return SamplingParams(max_new_tokens=max_new, replay_length=replay, ignore_eos=req.ignore_eos, **req.sampling)
    except ValueError as exc:
        name = re.search(r"SamplingParams: (\w+)", str(exc))
        raise ProtocolError(str(exc).removeprefix("SamplingParams: "), name.group(1) if name else None) from None


# ------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """Builds one request's response bodies (the id and creation time shared by every chunk)."""
    req: ParsedRequest
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = self.id or new_id(self.req.chat)
        self.created = self.created or int(time.time())

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.req.chat else "text_completion") + (".chunk" if chunk and self.req.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str, token_ids, finish_reason, delta: bool, role: bool = False) -> dict:
        if self.req.chat:
            body = ({"role": "assistant", "content": text} if role or not delta else {"content": text})
            choice = {"index": 0, ("delta" if delta else "message"): body, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if self.req.return_token_ids and token_ids is not None:
            choice["token_ids"] = list(token_ids)
        return choice

    def chunk(self, text: str, token_ids, finish_reason: str | None = None, role: bool = False,
              extra: dict | None = None) -> dict:
        """One SSE chunk of the stream (`usage: null` in each when the final usage is asked for)."""
        body = self._base(True)
        body["choices"] = [self._choice(text, token_ids, finish_reason, True, role)]
        if self.req.include_usage:
            body["usage"] = None
        if extra:
            body.update(extra)
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return dict(self._base(True), choices=[], usage=usage(prompt_tokens, completion_tokens))

    def whole(self, text: str, token_ids, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              extra: dict | None = None) -> dict:
        body = self._base(False)
        body["choices"] = [self._choice(text, token_ids, finish_reason, False)]
        body["usage"] = usage(prompt_tokens, completion_tokens)
        if extra:
            body.update(extra)
        return body


def trail_extra(req: ParsedRequest, metrics: dict | None) -> dict | None:
    """The `trail` object of a final response: prompt-time and per-step predictions (only when the
    request asked with return_predictions)."""
    if not req.return_predictions or not metrics:
        return None
    return {"trail": {"prompt_prediction": metrics.get("prompt_prediction"),
                      "predictions": metrics.get("predictions", []), "preemptions": metrics.get("preemptions"),
                      "ttft_s": metrics.get("ttft_s"), "latency_s": metrics.get("latency_s")}}
