"""The ASGI middlewares: the API key and body size guard, and one log line per request."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .settings import ApiError

log = logging.getLogger("phi3v_mlx.server")
# A refused request's body is still read, up to this many bytes, and dropped: a client still
# sending it would otherwise see its connection reset instead of the answer.
DRAIN_BYTES = 64 * 2**20


class Guard:
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
                await _drain(receive)
                await _send_json(send, 401, error.body)
                return
        too_large = ApiError(
            413,
            f"the request body is larger than {self.max_body / 1e6:g} MB",
            code="body_too_large",
        )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _drain(receive)
            await _send_json(send, 413, too_large.body)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise too_large
            return message

        await self.app(scope, limited, send)


async def _drain(receive: Any) -> None:
    """Read and drop what is left of the request body, up to :data:`DRAIN_BYTES`."""
    read = 0
    while read <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


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


class RequestLog:
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
