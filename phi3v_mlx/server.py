"""``phi3v serve``: an OpenAI-compatible chat server, safe by default.

Requests are checked and their images read in the web handlers; one engine thread decodes every
request in flight together (the shared :class:`~phi3v_mlx.batch.BatchEngine`) and keeps prompt
caches and image features between requests, keyed by image pixels, never by URL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlx.core as mx
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.requests import Request as HttpRequest

from .batch import BatchEngine, Request, RowEvent
from .cache import PromptCache
from .generate import SamplingOptions
from .models.base import DecoderModel
from .processor import Processor, load_image
from .session import common_prefix, image_digest

log = logging.getLogger("phi3v_mlx.server")
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
# The page loads nothing from elsewhere: its own inline style and script, images as data URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}
ROLES = ("system", "developer", "user", "assistant")
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "response_format")


@dataclass
class ServerSettings:
    """What ``phi3v serve`` allows; the defaults are the safe ones."""

    model_name: str = "phi3v"
    api_key: str | None = None
    cors_origins: Sequence[str] = ()
    media_dir: Path | None = None
    allow_remote_images: bool = False
    remote_image_mb: float = 20.0
    remote_timeout_s: float = 10.0
    max_body_mb: float = 32.0
    max_image_pixels: int = 50_000_000
    max_images: int = 8
    max_tokens: int = 4096
    default_max_tokens: int = 512
    batch_size: int = 8
    queue_size: int = 32
    prompt_cache_gb: float = 2.0


class ApiError(Exception):
    """A request the server refuses, answered in the OpenAI error shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict[str, Any]:
        kind = {
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            503: "server_error",
            500: "server_error",
        }.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


# ---------------------------------------------------------------- caches kept between requests


class PromptStore:
    """Prompt caches and image features kept between requests, within a byte budget, the least
    recently used going first.

    A prompt cache is keyed by its positions: token ids, and for an image slot the image's pixel
    digest and crop count, so the same text about another image never matches past the image.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def lookup(self, keys: Sequence[Any]) -> tuple[PromptCache | None, int]:
        """A copy of the cache sharing the longest prefix with ``keys``, and that length."""
        best, length = None, 0
        for name in self._entries:
            if name[0] == "prompt":
                shared = common_prefix(name[1], keys)
                if shared > length:
                    best, length = name, shared
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        return copy.deepcopy(self._entries[best][0]), length

    def keep_prompt(self, keys: Sequence[Any], cache: PromptCache) -> None:
        self._keep(("prompt", tuple(keys)), cache, cache.nbytes)

    def get(self, key: Any) -> mx.array | None:
        entry = self._entries.get(("image", key))
        if entry is None:
            return None
        self._entries.move_to_end(("image", key))
        return entry[0]

    def put(self, key: Any, features: mx.array) -> None:
        self._keep(("image", key), features, features.nbytes)

    def _keep(self, name: Any, value: Any, nbytes: int) -> None:
        if name in self._entries:
            self._bytes -= self._entries.pop(name)[1]
        if nbytes > self.budget:
            return
        self._entries[name] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.budget:
            _, (_, freed) = self._entries.popitem(last=False)
            self._bytes -= freed

    @property
    def nbytes(self) -> int:
        return self._bytes


# ---------------------------------------------------------------- the engine thread


@dataclass
class Job:
    """One chat completion in the engine: what to run and where its events go."""

    request: Request
    options: SamplingOptions
    keys: list[Any]  # the prompt's positions, image-aware
    image_keys: list[Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    row: int | None = None
    cached_tokens: int = 0
    prompt_tokens: int = 0
    fault: bool = False  # it failed through no fault of the request

    def error(self, message: str) -> ApiError:
        if self.fault:
            return ApiError(500, message, code="generation_failed")
        return ApiError(400, message, param="messages")


class EngineThread(threading.Thread):
    """Runs the batch engine: takes jobs and cancellations, steps, hands events back to the
    handlers' event loop. Admission is bounded: ``reserve`` refuses past the capacity."""

    def __init__(self, model: DecoderModel, processor: Processor, settings: ServerSettings):
        super().__init__(name="phi3v-engine", daemon=True)
        self.model, self.processor, self.settings = model, processor, settings
        self.capacity = settings.batch_size + settings.queue_size
        self.store = PromptStore(int(settings.prompt_cache_gb * 1e9))
        self._intake: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._reserved = 0
        self._stopping = threading.Event()
        self._jobs: dict[int, Job] = {}

    def reserve(self) -> bool:
        with self._lock:
            if self._reserved >= self.capacity:
                return False
            self._reserved += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._reserved -= 1

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._reserved

    def submit(self, job: Job) -> None:
        self._intake.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self._intake.put(("cancel", job))

    def stop(self) -> None:
        self._stopping.set()
        self._intake.put(("stop", None))

    def _engine(self) -> BatchEngine:
        return BatchEngine(self.model, self.processor, batch_size=self.settings.batch_size,
                           interleave=True, features=self.store)  # fmt: skip

    def run(self) -> None:
        engine = self._engine()
        try:
            while not self._stopping.is_set():
                self._take(engine, block=engine.pending() == 0)
                if engine.pending():
                    try:
                        events = engine.step()
                    except Exception as e:  # a fault fails what is in flight, and only that
                        log.exception("engine step failed")
                        self._fail_all(engine, f"generation failed: {e}")
                        engine.close()
                        engine = self._engine()
                        continue
                    for event in events:
                        self._deliver(event)
        finally:
            engine.close()

    def _take(self, engine: BatchEngine, block: bool) -> None:
        try:
            command, job = self._intake.get(timeout=0.5) if block else self._intake.get_nowait()
        except queue.Empty:
            return
        while True:
            if command == "submit":
                cache, prefix = self.store.lookup(job.keys)
                job.row = engine.submit(
                    job.request,
                    job.options,
                    keep_cache=True,
                    cache=cache,
                    prefix=prefix,
                    image_keys=job.image_keys,
                )
                self._jobs[job.row] = job
            elif command == "cancel" and job.row in self._jobs:
                engine.cancel(job.row)
                del self._jobs[job.row]
                self.release()
            try:
                command, job = self._intake.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, event: RowEvent) -> None:
        job = self._jobs.get(event.row)
        if job is None:
            return
        if event.result is not None or event.error is not None:
            del self._jobs[event.row]
            self.release()
            if event.result is not None:
                job.prompt_tokens = len(job.keys)
                job.cached_tokens = len(job.keys) - event.result.prompt_tokens
                if event.cache is not None:
                    fed = job.keys + event.result.tokens
                    self.store.keep_prompt(fed[: event.cache.offset], event.cache)
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _fail_all(self, engine: BatchEngine, message: str) -> None:
        for row, job in list(self._jobs.items()):
            engine.cancel(row)
            job.fault = True
            self._deliver(RowEvent(row, error=message))


# ---------------------------------------------------------------- request parsing


def _field(body: dict[str, Any], name: str, kinds: tuple, default: Any = None) -> Any:
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
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, []):
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _field(body, name, (int,), settings.default_max_tokens)
    if not 1 <= max_tokens <= settings.max_tokens:
        raise ApiError(400, f"{name} must be between 1 and {settings.max_tokens}", param=name)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    values = {
        "max_tokens": max_tokens,
        "temperature": float(_field(body, "temperature", (int, float), 1.0)),
        "top_p": float(_field(body, "top_p", (int, float), 1.0)),
        "seed": _field(body, "seed", (int,)),
    }
    if values["temperature"] > 2:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
    try:
        return SamplingOptions(**values), [s for s in stops if s]
    except ValueError as e:
        param = next((k for k in values if k in str(e)), None)
        raise ApiError(400, str(e), param=param) from None


class ImageReader:
    """Images named by a request: base64 data URLs always; local paths and ``file://`` only under
    the media folder; http(s) only when allowed, capped in size and time, no redirects."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.media = settings.media_dir.resolve() if settings.media_dir else None

    def read(self, url: str, index: int) -> Any:
        where = f"messages: image {index + 1}"
        if url.startswith("data:"):
            data = self._data_url(url, where)
        elif url.startswith(("http://", "https://")):
            data = self._remote(url, where)
        else:
            data = self._local(url, where)
        try:
            return load_image(data, index, self.settings.max_image_pixels)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None

    def _data_url(self, url: str, where: str) -> bytes:
        head, _, payload = url.partition(",")
        if ";base64" not in head or not head.startswith("data:image/"):
            raise ApiError(
                400, f"{where}: a data URL must be data:image/...;base64,...", param="messages"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: invalid base64 data", param="messages") from None

    def _local(self, url: str, where: str) -> Path:
        if self.media is None:
            raise ApiError(
                400,
                f"{where}: local files are refused (start the server with "
                "--media-dir to allow a folder)",
                param="messages",
            )
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            raise ApiError(
                400, f"{where}: unsupported URL scheme {parsed.scheme!r}", param="messages"
            )
        text = unquote(parsed.path) if parsed.scheme == "file" else url
        path = Path(text)
        path = (path if path.is_absolute() else self.media / path).resolve()
        if not path.is_relative_to(self.media):
            raise ApiError(
                403, f"{where}: outside the media folder", param="messages", code="forbidden_path"
            )
        return path

    def _remote(self, url: str, where: str) -> bytes:
        if not self.settings.allow_remote_images:
            raise ApiError(
                400,
                f"{where}: remote images are refused (start the server with "
                "--allow-remote-images to fetch them)",
                param="messages",
            )
        import httpx

        cap = int(self.settings.remote_image_mb * 1e6)
        try:
            with httpx.stream(
                "GET", url, timeout=self.settings.remote_timeout_s, follow_redirects=False
            ) as response:
                if response.is_redirect:
                    raise ApiError(
                        400,
                        f"{where}: {url} redirects; redirects are not followed",
                        param="messages",
                    )
                if response.status_code != 200:
                    raise ApiError(
                        400, f"{where}: {url} answered {response.status_code}", param="messages"
                    )
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > cap:
                        limit = f"{self.settings.remote_image_mb:g} MB"
                        raise ApiError(400, f"{where}: {url} is larger than {limit}", "messages")
                return bytes(data)
        except httpx.HTTPError as e:
            raise ApiError(
                400, f"{where}: cannot fetch {url} ({type(e).__name__})", param="messages"
            ) from None


def conversation(body: dict[str, Any], settings: ServerSettings) -> tuple[list[dict], list[str]]:
    """The messages in this package's format and the image URLs, in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out, urls = [], []
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
            else:
                raise ApiError(
                    400, f"messages[{i}]: unsupported content part {kind!r}", param="messages"
                )
        out.append({"role": role, "content": parts})
    if len(urls) > settings.max_images:
        raise ApiError(
            400, f"{len(urls)} images, over the limit of {settings.max_images}", param="messages"
        )
    return out, urls


# ---------------------------------------------------------------- the web application


def create_app(model: DecoderModel, processor: Processor, settings: ServerSettings) -> FastAPI:
    """The FastAPI application, with its engine thread started on startup."""
    engine = EngineThread(model, processor, settings)
    images = ImageReader(settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        engine.join(timeout=30)

    app = FastAPI(title="phi3v-mlx", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, error: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body, status_code=error.status, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: HttpRequest, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(ApiError(500, "internal server error").body, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_name,
            "in_flight": engine.in_flight,
            "prompt_cache_bytes": engine.store.nbytes,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "phi3v-mlx",
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        options, stops = sampling_options(body, settings)
        messages, urls = conversation(body, settings)
        num_crops = _field(body, "num_crops", (int,))
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(
            None, _prepare, processor, images, messages, urls, num_crops, options, stops, loop
        )
        if not engine.reserve():
            raise ApiError(
                503,
                "the server is busy: too many requests in flight, retry later",
                code="queue_full",
            )
        engine.submit(job)
        http.state.job = job
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _stream(job, engine, completion_id, settings.model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(job, engine, http, completion_id, settings.model_name)

    # The last added is the outermost: the log sees every answer, CORS answers preflights
    # before the key is checked.
    app.add_middleware(_Guard, max_body=int(settings.max_body_mb * 1e6), api_key=settings.api_key)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(_RequestLog)
    return app


def _prepare(
    processor: Processor,
    images: ImageReader,
    messages: list[dict],
    urls: list[str],
    num_crops: int | None,
    options: SamplingOptions,
    stops: list[str],
    loop: asyncio.AbstractEventLoop,
) -> Job:
    """Read the images, render and tokenize the conversation and check its length: every
    refusal before the job reaches the engine."""
    try:
        crops = processor.crops(num_crops)
        if urls and not processor.vision:
            raise ValueError("this is a text model: it takes no images")
        loaded = [images.read(url, i) for i, url in enumerate(urls)]
        prompt = processor.apply_chat_template(messages)
        ids = processor.tokenize(prompt, [processor.image_tokens(im, crops) for im in loaded])
    except ApiError:
        raise
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    image_keys = [(image_digest(image), crops) for image in loaded]
    keys = [t if t >= 0 else image_keys[-t - 1] for t in ids]
    return Job(
        Request(ids, loaded, crops, stop=stops), options, keys, image_keys, loop, asyncio.Queue()
    )


def _usage(job: Job, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
    }


async def _complete(
    job: Job, engine: EngineThread, http: Any, completion_id: str, model: str
) -> Any:
    """Wait for the whole answer, cancelling it if the client goes away."""
    texts = []
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:  # noqa: UP041 (not TimeoutError before Python 3.11)
            if await http.is_disconnected():
                engine.cancel(job)
                raise ApiError(499, "the client closed the request") from None
            continue
        if event.error is not None:
            raise job.error(event.error)
        texts.append(event.text)
        if event.result is not None:
            result = event.result
            http.state.usage = _usage(job, result.generation_tokens)
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": result.finish_reason,
                        "message": {"role": "assistant", "content": "".join(texts)},
                    }
                ],
                "usage": http.state.usage,
            }


async def _stream(
    job: Job, engine: EngineThread, completion_id: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, the finish chunk, usage, [DONE]. A
    client that goes away has its generation cancelled."""
    created = int(time.time())

    def sse(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse([{"index": 0, "delta": delta, "finish_reason": finish}])

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event.error is not None:
                yield f"data: {json.dumps(job.error(event.error).body)}\n\n"
                finished = True
                break
            if event.text:
                yield chunk({"content": event.text})
            if event.result is not None:
                finished = True
                yield chunk({}, event.result.finish_reason)
                if include_usage:
                    usage = _usage(job, event.result.generation_tokens)
                    yield sse([], usage=usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.cancel(job)


class _Guard:
    """ASGI middleware: the API key (Bearer) on /v1, and the body size limit (413)."""

    def __init__(self, app: Any, max_body: int, api_key: str | None):
        self.app, self.max_body, self.api_key = app, max_body, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            if headers.get("authorization") != f"Bearer {self.api_key}":
                error = ApiError(
                    401,
                    "a valid API key is needed (Authorization: Bearer ...)",
                    code="invalid_api_key",
                )
                await _send_json(send, 401, error.body)
                return
        too_large = ApiError(
            413,
            f"the request body is larger than {self.max_body / 1e6:g} MB",
            code="body_too_large",
        )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, too_large.body)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise too_large
            return message

        await self.app(scope, limited, send)


async def _send_json(send: Any, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _RequestLog:
    """ASGI middleware: one log line per request (status, tokens, seconds)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]

        async def watching(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watching)
        finally:
            job = scope.get("state", {}).get("job")
            tokens = ""
            if job is not None:
                tokens = f" prompt={job.prompt_tokens} cached={job.cached_tokens}"
            log.info(
                "%s %s %d%s %.2fs",
                scope["method"],
                scope["path"],
                status[0],
                tokens,
                time.perf_counter() - started,
            )


def serve(
    model: DecoderModel,
    processor: Processor,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8080,
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app = create_app(model, processor, settings)
    uvicorn.run(app, host=host, port=port, log_level="warning")
