"""The web application: the chat completions endpoint (whole or streamed as server-sent
events), the models list, health and the chat page."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from ..batch import Request
from ..generate import SamplingOptions
from ..keys import image_digest, position_keys
from ..models.base import DecoderModel
from ..processor import Processor
from ..thinking import ReasoningSplit, template_options
from .engine import EngineThread, Job, follow
from .media import ImageReader
from .middleware import Guard, RequestLog
from .schema import conversation, field, request_body, sampling_options, thinking_option
from .settings import ApiError, ServerSettings
from .speech import add_speech_routes, audio_bytes, read_recordings, seconds_of, submit

log = logging.getLogger("phi3v_mlx.server")
CHAT_PAGE = Path(__file__).parent.parent / "static" / "chat.html"
# The page loads nothing from elsewhere: its own inline style and script, media as data URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data: blob:; media-src data: blob:; connect-src 'self'; "
    "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}


def create_app(
    model: DecoderModel,
    processor: Processor,
    settings: ServerSettings,
    group: mx.distributed.Group | None = None,
) -> FastAPI:
    """The FastAPI application, with its engine thread started on startup; ``group``: the ranks
    the model is split across, this process their first (the others run :func:`follow`)."""
    engine = EngineThread(model, processor, settings, group)
    images = ImageReader(settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        engine.join(timeout=30)

    app = FastAPI(title="phi3v-mlx", lifespan=lifespan, docs_url=None, redoc_url=None)
    # The reasoning modes the request field ``thinking`` takes, listed for a model that has them.
    modes = list(getattr(processor, "thinking_modes", None) or ())
    thinking_modes = {"thinking_modes": modes} if modes else {}
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, error: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body, status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, error: HTTPException) -> JSONResponse:
        """Errors outside the handlers (an unknown route, a wrong method) in the same shape."""
        body = ApiError(error.status_code, str(error.detail)).body
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

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
                    **thinking_modes,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        body = request_body(await http.body())
        options, stops = sampling_options(body, settings)
        thinking = thinking_option(body, processor)
        messages, urls, audios = conversation(body, settings)
        num_crops = field(body, "num_crops", (int,))
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(
            None,
            fetch_and_prepare,
            processor,
            images,
            messages,
            urls,
            num_crops,
            options,
            stops,
            loop,
            audios,
            settings,
            thinking,
        )
        submit(engine, job)
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

    add_speech_routes(app, engine, processor, settings, _complete)

    # The last added is the outermost: the log sees every answer, CORS answers preflights
    # before the key is checked.
    app.add_middleware(Guard, max_body=int(settings.max_body_mb * 1e6), api_key=settings.api_key)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestLog)
    return app


def fetch_and_prepare(
    processor: Processor,
    images: ImageReader,
    messages: list[dict],
    urls: list[str],
    num_crops: int | None,
    options: SamplingOptions,
    stops: list[str],
    loop: asyncio.AbstractEventLoop,
    audios: list[dict[str, str]] = (),
    settings: ServerSettings | None = None,
    thinking: str | None = None,
) -> Job:
    """Read the images (fetching remote ones, when allowed) and the recordings, render and
    tokenize the conversation and check its length: every refusal before the job reaches the
    engine."""
    sounds = None
    try:
        crops = processor.crops(num_crops)
        if urls and not processor.vision:
            raise ValueError("this is a text model: it takes no images")
        loaded = [images.read(url, i) for i, url in enumerate(urls)]
        if audios:
            sources = [audio_bytes(part, i) for i, part in enumerate(audios)]
            sounds = read_recordings(processor, sources, bool(loaded), settings, "messages")
        prompt = processor.apply_chat_template(messages, **template_options(thinking))
        counts = [processor.image_tokens(im, crops) for im in loaded]
        if sounds is not None:
            ids = processor.tokenize(prompt, counts, sounds.tokens)
        else:
            ids = processor.tokenize(prompt, counts)
    except ApiError:
        raise
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    image_keys = [(image_digest(image), crops) for image in loaded]
    media_keys = image_keys + (sounds.keys() if sounds is not None else [])
    request = Request(ids, loaded, crops, stop=stops, audios=sounds.waves if sounds else ())
    job = Job(request, options, position_keys(ids, media_keys), image_keys, loop,
              asyncio.Queue())  # fmt: skip
    job.audio_seconds = seconds_of(sounds)
    job.split = ReasoningSplit(processor, thinking)
    return job


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
    """Wait for the whole answer, cancelling it as soon as the client goes away."""
    watch = asyncio.ensure_future(_report_disconnect(http, job))
    texts = []
    try:
        while True:
            event = await job.events.get()
            if event is None:
                engine.cancel(job)
                raise ApiError(499, "the client closed the request")
            if event.error is not None:
                raise job.error(event)
            texts.append(event.text)
            if event.result is not None:
                break
    finally:
        watch.cancel()
    result = event.result
    http.state.usage = _usage(job, result.generation_tokens)
    reasoning, content = job.split.feed("".join(texts))
    more_reasoning, more_content, finish = job.split.finish(result.finish_reason)
    message = {"role": "assistant", "content": content + more_content}
    if job.split.enabled:
        message["reasoning_content"] = reasoning + more_reasoning
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": message,
            }
        ],
        "usage": http.state.usage,
    }


async def _report_disconnect(http: Any, job: Job) -> None:
    """Put None among the job's events when the client disconnects (its body is read: the next
    ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    job.events.put_nowait(None)


async def _stream(
    job: Job, engine: EngineThread, completion_id: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content (and reasoning_content) chunks, the finish
    chunk, usage, [DONE]. A client that goes away has its generation cancelled."""
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

    def deltas(reasoning: str, content: str) -> Iterator[str]:
        if reasoning:
            yield chunk({"reasoning_content": reasoning})
        if content:
            yield chunk({"content": content})

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event.error is not None:
                yield f"data: {json.dumps(job.error(event).body)}\n\n"
                finished = True
                break
            for delta in deltas(*job.split.feed(event.text)):
                yield delta
            if event.result is not None:
                finished = True
                reasoning, content, finish = job.split.finish(event.result.finish_reason)
                for delta in deltas(reasoning, content):
                    yield delta
                yield chunk({}, finish)
                if include_usage:
                    usage = _usage(job, event.result.generation_tokens)
                    yield sse([], usage=usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.cancel(job)


def serve(
    model: DecoderModel,
    processor: Processor,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8080,
    group: mx.distributed.Group | None = None,
) -> None:
    """Run the server until interrupted; with the model split across the ranks of ``group``,
    rank 0 listens and the others follow its engine."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if group is not None and group.rank() != 0:
        follow(model, processor, settings, group)
        return
    app = create_app(model, processor, settings, group)
    # Ctrl-C waits at most a few seconds for open streams (a chat page left open) to end.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
