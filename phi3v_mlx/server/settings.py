"""What ``phi3v serve`` allows, and how it refuses a request (the OpenAI error shape)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def model_id(model: str) -> str:
    """The id the server lists for ``--model``: a Hub id as given, a local folder by its name
    (its path says where the files are, not which model it is)."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


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
    max_audio_seconds: float = 1800.0
    max_audio_in_flight: float = 3600.0


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
            429: "rate_limit_error",
            503: "server_error",
            500: "server_error",
        }.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }
