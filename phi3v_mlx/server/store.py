"""Prompt caches and image features kept between requests, within a byte budget."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..cache import PromptCache
from ..keys import common_prefix

# Shared positions below this are read again rather than reused: a prefix such as BOS and
# <|user|> saves nothing worth copying a cache for.
MIN_REUSE = 32


def prefix_copy(cache: PromptCache, length: int) -> PromptCache | None:
    """A cache holding the first ``length`` positions of ``cache``, sharing them (never
    copying more; what it writes later goes to buffers of its own), or None if a layer cache
    is not a plain ``KVCache``."""
    layers = []
    for layer in cache:
        if not isinstance(layer, KVCache) or layer.offset < length:
            return None
        copied = KVCache()
        copied.keys = layer.keys[..., :length, :]
        copied.values = layer.values[..., :length, :]
        copied.offset = length
        layers.append(copied)
    rope = copy.copy(cache.rope)
    rope.chunks = list(rope.chunks)
    rope.trim_to(length)
    return PromptCache(layers, rope)


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

    def copy_longest_prefix(self, keys: Sequence[Any]) -> tuple[PromptCache | None, int]:
        """A copy of the longest prefix of ``keys`` a kept cache holds (those positions only),
        and its length; (None, 0) below :data:`MIN_REUSE` positions."""
        best, length = None, 0
        for name in self._entries:
            if name[0] == "prompt":
                shared = common_prefix(name[1], keys)
                if shared > length:
                    best, length = name, shared
        if best is None or length < MIN_REUSE:
            return None, 0
        self._entries.move_to_end(best)
        copied = prefix_copy(self._entries[best][0], length)
        return (copied, length) if copied is not None else (None, 0)

    def keep_prompt(self, keys: Sequence[Any], cache: PromptCache) -> None:
        self._keep(("prompt", tuple(keys)), cache, cache.nbytes)

    def get(self, key: Any) -> mx.array | None:
        entry = self._entries.get(("image", key))
        if entry is None:
            return None
        self._entries.move_to_end(("image", key))
        return entry[0]

    def put(self, key: Any, features: mx.array) -> None:
        """Keep an image's features, in a buffer of their own (a slice of one vision run's
        output would keep the whole run alive)."""
        features = mx.contiguous(features)
        mx.eval(features)
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
