"""The chat completion request: its fields checked, refused in the OpenAI error shape."""

from __future__ import annotations

import json
from typing import Any

from ..generate import SamplingOptions
from ..thinking import thinking_mode
from .settings import ApiError, ServerSettings

ROLES = ("system", "developer", "user", "assistant")
# Fields this server does not implement, accepted at the values that change nothing (what
# clients send by default) and refused at any other.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "response_format": ({"type": "text"},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
}


# Why a tool-bearing request is refused, for models whose chat template renders tools.
TOOLS_REFUSAL = (
    ": it does not parse tool calls out of answers (in the Python API, a model whose chat "
    'template renders tools, such as Phi-4-mini, reads them from a system message\'s "tools")'
)


def request_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, its null fields left out: null means "not set" everywhere."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return {name: value for name, value in body.items() if value is not None}


def field(body: dict[str, Any], name: str, kinds: tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"{name} must be {kinds[0].__name__}", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {kinds[0].__name__}", param=name)
    return value


def sampling_options(
    body: dict[str, Any], settings: ServerSettings
) -> tuple[SamplingOptions, list[str]]:
    """The request's sampling options and stop strings."""
    for name, no_ops in NO_OP_VALUES.items():
        if name in body and body[name] not in no_ops:
            why = TOOLS_REFUSAL if name in ("tools", "functions", "tool_choice") else ""
            raise ApiError(400, f"{name} is not supported by this server{why}", param=name)
    n = field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = field(body, name, (int,), settings.default_max_tokens)
    if not 1 <= max_tokens <= settings.max_tokens:
        raise ApiError(400, f"{name} must be between 1 and {settings.max_tokens}", param=name)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    values = {
        "max_tokens": max_tokens,
        "temperature": float(field(body, "temperature", (int, float), 1.0)),
        "top_p": float(field(body, "top_p", (int, float), 1.0)),
        "seed": field(body, "seed", (int,)),
    }
    if values["temperature"] > 2:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
    try:
        return SamplingOptions(**values), [s for s in stops if s]
    except ValueError as e:
        param = next((k for k in values if k in str(e)), None)
        raise ApiError(400, str(e), param=param) from None


# OpenAI's reasoning_effort as a thinking mode: no reasoning at the lowest efforts, the model's
# own choice at "low", always reasoning above.
EFFORT_MODES = {"none": "off", "minimal": "off", "low": "auto", "medium": "on", "high": "on"}


def thinking_option(body: dict[str, Any], processor: Any) -> str | None:
    """The answer's reasoning mode from ``thinking`` ("on", "off", "auto") or
    ``reasoning_effort``; None for a model without thinking modes, which refuses both."""
    thinking, effort = body.get("thinking"), body.get("reasoning_effort")
    if thinking is not None and effort is not None:
        raise ApiError(400, "give thinking or reasoning_effort, not both", param="thinking")
    param = "thinking"
    if effort is not None:
        if effort not in EFFORT_MODES:
            efforts = ", ".join(EFFORT_MODES)
            raise ApiError(400, f"reasoning_effort must be one of {efforts}",
                           param="reasoning_effort")  # fmt: skip
        thinking, param = EFFORT_MODES[effort], "reasoning_effort"
    if thinking is not None and not isinstance(thinking, str):
        raise ApiError(400, "thinking must be one of on, off, auto", param=param)
    try:
        return thinking_mode(processor, thinking)
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None


def conversation(
    body: dict[str, Any], settings: ServerSettings
) -> tuple[list[dict], list[str], list[dict[str, str]]]:
    """The messages in this package's format, the image URLs and the ``input_audio`` parts
    (``{"data": base64, "format": "wav" | "mp3" | ...}``), each in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out, urls, audios = [], [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(
                400, f"messages[{i}]: role must be one of {', '.join(ROLES)}", param="messages"
            )
        role = "system" if message["role"] == "developer" else message["role"]
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(
                400, f"messages[{i}]: content must be a string or a list of parts", param="messages"
            )
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise ApiError(400, f"messages[{i}]: image_url needs a url", param="messages")
                urls.append(url)
                parts.append({"type": "image"})
            elif kind == "input_audio":
                audio = part.get("input_audio")
                data = audio.get("data") if isinstance(audio, dict) else None
                if not isinstance(data, str):
                    raise ApiError(400, f"messages[{i}]: input_audio needs base64 data",
                                   param="messages")  # fmt: skip
                audios.append({"data": data, "format": str(audio.get("format") or "")})
                parts.append({"type": "audio"})
            else:
                raise ApiError(
                    400, f"messages[{i}]: unsupported content part {kind!r}", param="messages"
                )
        out.append({"role": role, "content": parts})
    if len(urls) > settings.max_images:
        raise ApiError(
            400, f"{len(urls)} images, over the limit of {settings.max_images}", param="messages"
        )
    return out, urls, audios
