"""Speech on the server: the recordings of chat requests (``input_audio`` parts) and OpenAI's
speech-to-text endpoints, ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``,
which ask what ``phi3v transcribe`` asks, with its settings."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from starlette.requests import Request as HttpRequest

from ..batch import Request
from ..generate import SamplingOptions
from ..keys import position_keys
from ..recordings import RowAudio
from ..speech import MAX_TOKENS, RESPONSE_FORMATS, TIMESTAMP_FORMATS, language_name, speech_prompt
from .engine import EngineThread, Job
from .settings import ApiError, ServerSettings


def audio_bytes(part: dict[str, str], index: int) -> bytes:
    """The encoded file of an ``input_audio`` part (base64 ``data``)."""
    try:
        return base64.b64decode(part["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"messages: audio {index + 1}: invalid base64 data",
                       param="messages") from None  # fmt: skip


def read_recordings(
    processor: Any, sources: list[Any], vision: bool, settings: ServerSettings, param: str
) -> RowAudio:
    """A request's recordings decoded and checked: each readable, together within the
    per-request limit of seconds."""
    try:
        sounds = RowAudio.load(processor, sources, vision)
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None
    seconds = seconds_of(sounds)
    if seconds > settings.max_audio_seconds:
        raise ApiError(400, f"{seconds:.1f} s of audio, over this server's limit of "
                       f"{settings.max_audio_seconds:g} s per request", param=param)  # fmt: skip
    return sounds


def seconds_of(sounds: RowAudio | None) -> float:
    """Seconds of audio of a request's recordings (16 kHz waveforms)."""
    return 0.0 if sounds is None else sum(len(w) for w in sounds.waves) / 16_000


def submit(engine: EngineThread, job: Job) -> None:
    """Hand a job to the engine, or refuse it: past the audio in flight (429), past the
    queue (503)."""
    if not engine.reserve_audio(job):
        raise ApiError(429, f"the server is busy with {engine.settings.max_audio_in_flight:g} s "
                       "of audio in flight, retry later", code="audio_busy")  # fmt: skip
    if not engine.reserve():
        engine.release_audio(job)
        raise ApiError(503, "the server is busy: too many requests in flight, retry later",
                       code="queue_full")  # fmt: skip
    engine.submit(job)


def _text_field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be text", param=name)
    return value


def speech_job(
    processor: Any,
    settings: ServerSettings,
    data: bytes,
    translate_to: str | None,
    hint: str | None,
    options: SamplingOptions,
    loop: asyncio.AbstractEventLoop,
) -> Job:
    """The job of one transcription (translation): the recording read and checked, the prompt
    ``phi3v transcribe`` would build."""
    sounds = read_recordings(processor, [data], False, settings, param="file")
    try:
        ids = processor.tokenize(speech_prompt(processor, translate_to, hint), [], sounds.tokens)
    except ValueError as e:
        raise ApiError(400, str(e), param="file") from None
    request = Request(ids, [], None, audios=sounds.waves)
    job = Job(request, options, position_keys(ids, sounds.keys()), [], loop, asyncio.Queue())
    job.audio_seconds = seconds_of(sounds)
    return job


def add_speech_routes(
    app: FastAPI,
    engine: EngineThread,
    processor: Any,
    settings: ServerSettings,
    complete: Callable[..., Any],
) -> None:
    """Add the speech-to-text endpoints; ``complete(job, engine, http, id, model)`` waits for
    a job's whole answer as a chat completion."""

    async def answer(http: HttpRequest, translate: bool) -> Any:
        try:
            form = await http.form(max_files=1, max_fields=16)
        except Exception as e:  # a malformed multipart body
            raise ApiError(400, f"the body must be multipart/form-data ({e})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file is required: the recording, as a multipart file",
                           param="file")  # fmt: skip
        response_format = _text_field(form, "response_format") or "json"
        if response_format in TIMESTAMP_FORMATS:
            raise ApiError(400, f"response_format {response_format} needs timestamps, which "
                           "this model does not produce: use json or text",
                           param="response_format")  # fmt: skip
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
                           param="response_format")  # fmt: skip
        language = _text_field(form, "language")
        if language is not None:
            try:
                language_name(language)
            except ValueError as e:
                raise ApiError(400, str(e), param="language") from None
        if (_text_field(form, "stream") or "false").lower() != "false":
            raise ApiError(400, "stream is not supported for transcriptions", param="stream")
        try:
            temperature = float(_text_field(form, "temperature") or 0.0)
            options = SamplingOptions(
                max_tokens=min(MAX_TOKENS, settings.max_tokens), temperature=temperature
            )
        except ValueError as e:
            raise ApiError(400, f"temperature: {e}", param="temperature") from None
        data = await upload.read()
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(
            None, speech_job, processor, settings, data, "English" if translate else None,
            _text_field(form, "prompt"), options, loop,
        )  # fmt: skip
        submit(engine, job)
        http.state.job = job
        body = await complete(job, engine, http, "", settings.model_name)
        text = body["choices"][0]["message"]["content"]
        if response_format == "text":
            return PlainTextResponse(text)
        return {"text": text}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(http: HttpRequest) -> Any:
        return await answer(http, translate=False)

    @app.post("/v1/audio/translations")
    async def translations(http: HttpRequest) -> Any:
        return await answer(http, translate=True)
