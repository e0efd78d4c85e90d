"""``phi3v serve``: an OpenAI-compatible chat server, safe by default.

Requests are checked (:mod:`.schema`) and their images read under the media policy
(:mod:`.media`) in the web handlers (:mod:`.app`, behind the :mod:`.middleware`); one engine
thread (:mod:`.engine`) decodes every request in flight together on the shared
:class:`~phi3v_mlx.batch.BatchEngine` and keeps prompt caches and image features between
requests (:mod:`.store`), keyed by image pixels, never by URL.
"""

from .app import create_app, serve
from .settings import ApiError, ServerSettings, model_id

__all__ = ["ApiError", "ServerSettings", "create_app", "model_id", "serve"]
