"""Request bodies -> checked request objects. Every problem is an APIError naming the field
(OpenAI's `param`), raised before anything is queued, so a bad request never reaches the model.

Checked by hand rather than with pydantic models: each field gets the message and the `param`
OpenAI would give, and JSON's loose types (true is not 1, 8.0 is not a token count) are refused
explicitly."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError, bad_request

__all__ = ["GenerationRequest", "MethodChoice", "Sampling", "parse_body", "parse_chat", "parse_completion"]

MAX_STOP_STRINGS = 4  # OpenAI's limit
_SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
# roles the chat template gets; OpenAI's newer "developer" is its "system"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI parameters this server does not implement: refused when set to a value that would change
# the output, so a client never silently gets something other than what it asked for
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "presence_penalty",
                "frequency_penalty", "tools", "functions", "response_format")
_VERISPEC_KEYS = ("method", "options")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None: the endpoint's default
    temperature: float
    top_p: float
    seed: int | None


@dataclass(frozen=True)
class MethodChoice:
    """The request's `verispec` field. method None: the server's method. options None: the
    server's options when the method is the server's, else the method's defaults."""

    method: str | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    choice: MethodChoice = field(default_factory=MethodChoice)
    prompt: str | list[int] | None = None  # /v1/completions
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise APIError(400, f"We could not parse the JSON body of your request ({err}). The body must be a "
                            "JSON object.", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", None,
                       "invalid_json")
    return body


def parse_completion(body: dict[str, Any], methods: list[str]) -> GenerationRequest:
    """A /v1/completions body."""
    return GenerationRequest(prompt=_prompt(body), sampling=_sampling(body, ("max_tokens",)),
                             **_common(body, methods))


def parse_chat(body: dict[str, Any], methods: list[str]) -> GenerationRequest:
    """A /v1/chat/completions body; max_completion_tokens (OpenAI's newer name) wins over max_tokens."""
    return GenerationRequest(messages=_messages(body),
                             sampling=_sampling(body, ("max_completion_tokens", "max_tokens")),
                             **_common(body, methods))


def _common(body: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    _refuse_unsupported(body)
    _check_n(body)
    stream, include_usage = _stream(body)
    return dict(model=_model(body), stop=_stop(body), stream=stream, include_usage=include_usage,
                choice=_method_choice(body, methods))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _missing(param: str) -> APIError:
    return bad_request(f"you must provide '{param}'", param, "missing_required_parameter")


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise bad_request(f"model must be a string, got {model!r}", "model")
    return model


def _sampling(body: dict[str, Any], max_names: tuple[str, ...]) -> Sampling:
    return Sampling(max_tokens=_max_tokens(body, max_names), temperature=_temperature(body),
                    top_p=_top_p(body), seed=_seed(body))


def _max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise bad_request(f"{name} must be an integer, got {value!r}", name)
        if value <= 0:
            raise bad_request(f"{name} must be at least 1, got {value}", name)
        return value
    return None


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0  # OpenAI's default: sampling; send 0 for greedy decoding
    if not _is_number(value) or not 0 <= value <= 2:
        raise bad_request(f"temperature must be a number from 0 to 2 (0: greedy), got {value!r}", "temperature")
    return float(value)


def _top_p(body: dict[str, Any]) -> float:
    value = body.get("top_p")
    if value is None:
        return 1.0
    if not _is_number(value) or not 0 < value <= 1:
        raise bad_request(f"top_p must be a number in (0, 1], got {value!r}", "top_p")
    return float(value)


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value) or not _SEED_RANGE[0] <= value <= _SEED_RANGE[1]:
        raise bad_request(f"seed must be an integer in [-2**63, 2**64), got {value!r}", "seed")
    return value


def _check_n(body: dict[str, Any]) -> None:
    value = body.get("n")
    if value is not None and (not _is_int(value) or value != 1):
        raise bad_request(f"n must be 1: this server generates one choice per request (got {value!r})", "n")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"stop must be a string or a list of strings, got {value!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    return tuple(dict.fromkeys(stops))


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise bad_request(f"stream_options must be an object, got {options!r}", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request(f"stream_options.include_usage must be true or false, got {include!r}",
                          "stream_options.include_usage")
    return True, include


def _neutral(name: str, value: Any) -> bool:
    """Whether an unsupported parameter is sent at a value that asks for nothing (its default)."""
    if value in (None, False, 0, "", [], {}):
        return True
    return (name == "best_of" and value == 1) or (name == "response_format" and value == {"type": "text"})


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in _UNSUPPORTED:
        if not _neutral(name, body.get(name)):
            raise bad_request(f"{name} is not supported by this server", name, "unsupported_parameter")


def _method_choice(body: dict[str, Any], methods: list[str]) -> MethodChoice:
    """The `verispec` extension field: {"method": NAME, "options": {...}}, both optional."""
    value = body.get("verispec")
    if value is None:
        return MethodChoice()
    if not isinstance(value, dict):
        raise bad_request(f"verispec must be an object like {{\"method\": \"prompt-lookup\", \"options\": "
                          f"{{\"k\": 8}}}}, got {value!r}", "verispec")
    unknown = sorted(set(value) - set(_VERISPEC_KEYS))
    if unknown:
        raise bad_request(f"unknown key(s) in verispec: {', '.join(unknown)}; it takes method and options",
                          "verispec")
    method, options = value.get("method"), value.get("options")
    if method is not None and method not in methods:
        raise bad_request(f"unknown method {method!r}; methods: {', '.join(methods)}", "verispec.method",
                          "unknown_method")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"verispec.options must be an object of method options, got {options!r}",
                          "verispec.options")
    return MethodChoice(method, options)


def _prompt(body: dict[str, Any]) -> str | list[int]:
    """One prompt: text, a list holding one text, or token ids (a batch of prompts is refused)."""
    value = body.get("prompt")
    if value is None:
        raise _missing("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise bad_request("prompt is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return list(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise bad_request("this server takes one prompt per request, not a batch", "prompt")
    raise bad_request("prompt must be a non-empty string or a non-empty list of token ids", "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    value = body.get("messages")
    if value is None:
        raise _missing("messages")
    if not isinstance(value, list):
        raise bad_request(f"messages must be an array of message objects, got {type(value).__name__}", "messages")
    if not value:
        raise bad_request("messages must hold at least one message", "messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(message: Any, param: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object with role and content", param)
    role = message.get("role")
    if role not in _ROLES:
        raise bad_request(f"{param}.role must be one of {', '.join(_ROLES)}, got {role!r}"
                          + (" (this server has no tool calling)" if role in ("tool", "function") else ""),
                          f"{param}.role")
    return {"role": _ROLES[role], "content": _content(message.get("content"), f"{param}.content")}


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{param}[{i}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                  f"this server takes text only (got type {kind!r})", f"{param}[{i}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{param} must be a string or a list of text parts, got {content!r}", param)
