"""Images named by a request, read under the server's security policy."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..processor import load_image
from .settings import ApiError, ServerSettings


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
