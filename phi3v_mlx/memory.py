"""Process-wide memory settings shared by every generation in flight: peak memory and wired limit.

MLX keeps one peak-memory counter and one wired limit per process. A generation that reset the
counter or restored the limit on its own would break every other generation running beside it
(the server runs many), so both go through the shared bookkeeping here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import mlx.core as mx
from mlx_lm.utils import maybe_set_recommended_wired_limit

_lock = threading.Lock()
_watchers: set[PeakMemory] = set()
_wired_users = 0
_wired_previous: int | None = None


class PeakMemory:
    """The process's peak memory (GB) over the lifetime of one generation.

    Starting a watch resets MLX's counter, after folding the peak so far into every other active
    watch, so each watch reports the highest memory in use at any moment of its own lifetime
    however many generations overlap it.
    """

    def __init__(self):
        self._peak = 0
        with _lock:
            _fold()
            mx.reset_peak_memory()
            _watchers.add(self)

    @property
    def gb(self) -> float:
        """The peak so far, in GB."""
        with _lock:
            if self in _watchers:
                _fold()
            return self._peak / 1e9

    def close(self) -> None:
        """Stop watching (the reported peak stays as it was)."""
        with _lock:
            if self in _watchers:
                _fold()
                _watchers.discard(self)


def _fold() -> None:
    current = mx.get_peak_memory()
    for watch in _watchers:
        watch._peak = max(watch._peak, current)


@contextmanager
def wired_limit(streams: Sequence[mx.Stream] = ()) -> Iterator[None]:
    """Keep the wired limit at the device's recommended size while any generation runs.

    The first generation in raises it and the last one out restores it, after synchronizing
    ``streams`` (a limit must not change under an evaluation in flight). Nothing happens on a
    device without a recommended size (the CPU backend).
    """
    global _wired_users, _wired_previous
    with _lock:
        if _wired_users == 0:
            _wired_previous = maybe_set_recommended_wired_limit()
        _wired_users += 1
    try:
        yield
    finally:
        for stream in streams:
            mx.synchronize(stream)
        with _lock:
            _wired_users -= 1
            if _wired_users == 0 and _wired_previous is not None:
                mx.set_wired_limit(_wired_previous)
                _wired_previous = None
