"""Multi-turn chat that keeps its KV cache and image features between turns."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx

from .generate import GenerationChunk, GenerationResult, SamplingOptions, collect, decode
from .model import Model
from .processor import ImageInput, Processor, load_image


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation whose every answer equals ``generate()`` on the whole rendered conversation.

    Between turns the session keeps the KV cache (only the tokens after the longest common prefix
    are prefilled) and the projected features of every image, keyed by its pixels and num_crops,
    so a follow-up question about an image neither re-runs the vision tower nor re-reads it.
    """

    def __init__(self, model: Model, processor: Processor, system: str | None = None):
        self.model = model
        self.processor = processor
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, its images and its cache."""
        self.messages: list[dict[str, Any]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.images: list[tuple[str, int]] = []  # (pixel digest, num_crops) per image, in order
        self._features: dict[tuple[str, int], mx.array] = {}
        self._cache: list[Any] | None = None
        self._cache_key: int | None = None
        self._ids: list[int] = []  # what the cache holds

    def _add_images(self, images: Sequence[ImageInput], num_crops: int) -> list[tuple[str, int]]:
        """Load new images (errors before anything changes) and encode those not seen before."""
        loaded = [load_image(src, len(self.images) + i, self.processor.max_pixels)
                  for i, src in enumerate(images)]  # fmt: skip
        keys = []
        for image in loaded:
            digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
            keys.append((digest, num_crops))
        new = [(key, image) for key, image in zip(keys, loaded, strict=True)
               if key not in self._features]  # fmt: skip
        if new:
            pre = self.processor.preprocess([image for _, image in new], num_crops)
            embeds = self.model.encode_images(pre.pixel_values, pre.image_sizes)
            for (key, _), features in zip(new, embeds, strict=True):
                self._features[key] = features
        return keys

    def _reusable_prefix(self, ids: list[int], options: SamplingOptions) -> int:
        """Trim the cache to what the new prompt shares with it (at least one token is fed)."""
        if self._cache is None or self._cache_key != options.max_kv_size:
            self._cache = self.model.make_cache(options.max_kv_size)
            self._cache_key, self._ids = options.max_kv_size, []
        prefix = min(_common_prefix(self._ids, ids), len(ids) - 1)
        excess = self._cache[0].offset - prefix
        if excess > 0:
            if not all(c.is_trimmable() for c in self._cache):
                self._cache = self.model.make_cache(options.max_kv_size)
                self._ids = []
                return 0
            for c in self._cache:
                c.trim(excess)
        return prefix

    def stream(
        self,
        text: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        num_crops: int | None = None,
        **options: Any,
    ) -> Iterator[GenerationChunk]:
        """Ask ``text`` (about ``images``, attached to this turn) and stream the answer."""
        started = time.perf_counter()
        options = SamplingOptions(**options)
        mx.reset_peak_memory()
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        num_crops = self.processor.num_crops if num_crops is None else int(num_crops)
        keys = self._add_images(images, num_crops)
        message = {
            "role": "user",
            "content": [{"type": "image"} for _ in keys] + [{"type": "text", "text": text}],
        }
        all_keys = self.images + keys
        features = [self._features[key] for key in all_keys]
        prompt = self.processor.apply_chat_template([*self.messages, message])
        ids = self.processor.tokenize(prompt, [len(f) for f in features])
        self.messages.append(message)
        self.images = all_keys
        prefix = self._reusable_prefix(ids, options)
        embeddings = self.model.merge(mx.array([ids]), features, start=prefix)
        texts, fed, clean = [], [], False
        try:
            for chunk in decode(
                self.model, self.processor, ids[prefix:], embeddings, self._cache, options, started
            ):
                texts.append(chunk.text)
                if chunk.token is not None:
                    fed.append(chunk.token)
                yield chunk
            clean = True
        except GeneratorExit:
            clean = True
            raise
        finally:
            self.messages.append({"role": "assistant", "content": "".join(texts)})
            self._ids = ids + fed
            if not clean or self._cache[0].offset < len(self._ids):
                self._cache, self._ids = None, []
            else:
                excess = self._cache[0].offset - len(self._ids)
                for c in self._cache:
                    c.trim(excess)

    def send(
        self,
        text: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        num_crops: int | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Ask ``text`` (about ``images``, attached to this turn) and return the whole answer."""
        return collect(self.stream(text, images, num_crops, **options))
