"""Phi-3-Vision: vision encoder and decoder joined by filling image slots with image embeddings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .language import LanguageModel
from .vision import VisionEncoder


def image_slots(input_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of image slots in a 1-D id sequence as (start, length, image index from 0)."""
    runs = []
    t, n = 0, len(input_ids)
    while t < n:
        if input_ids[t] < 0:
            start, value = t, input_ids[t]
            while t < n and input_ids[t] == value:
                t += 1
            runs.append((start, t - start, int(-value) - 1))
        else:
            t += 1
    return runs


class Model(nn.Module):
    """``model(input_ids, pixel_values, image_sizes, cache)`` returns logits [1, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config)
        self.language = LanguageModel(config)

    @property
    def layers(self) -> list[nn.Module]:
        return self.language.layers

    def make_cache(self, max_kv_size: int | None = None) -> list[Any]:
        """A fresh prompt cache (mlx-lm layer caches plus the rope history entry)."""
        return self.language.make_cache(max_kv_size)

    def encode_images(self, pixel_values: mx.array, image_sizes: Any) -> list[mx.array]:
        """Per image, the embeddings [num_img_tokens, hidden] that fill its prompt slots."""
        sizes = np.asarray(image_sizes).reshape(-1, 2).tolist()
        return self.vision(mx.array(pixel_values), sizes)

    def merge(
        self, input_ids: mx.array, image_embeds: Sequence[mx.array], start: int = 0
    ) -> mx.array:
        """Input embeddings [1, T - start, hidden] of positions ``start``.. of a prompt: tokens
        embedded, the slots of image k filled by image k's embeddings."""
        ids = np.asarray(input_ids).reshape(-1)
        runs = image_slots(ids)
        if image_embeds and not runs:
            raise ValueError(
                f"{len(image_embeds)} image(s) given but the prompt has no image slots"
            )
        for _, length, k in runs:
            if k >= len(image_embeds):
                raise ValueError(
                    f"the prompt has slots for image {k + 1} "
                    f"but {len(image_embeds)} image(s) were given"
                )
            if length != len(image_embeds[k]):
                raise ValueError(
                    f"image {k + 1} fills {len(image_embeds[k])} slots "
                    f"but the prompt has a run of {length}"
                )
        text = self.language.embed(mx.array(ids[None, start:]))
        runs = [(b - start, n, k) for b, n, k in runs if b + n > start]
        if not runs:
            return text
        used = sorted({k for _, _, k in runs})
        sizes = [len(ids) - start] + [len(image_embeds[k]) for k in used]
        rows = dict(zip(used, np.cumsum(sizes)[:-1].tolist(), strict=True))
        index = np.arange(len(ids) - start)
        for begin, length, k in runs:
            slots = np.arange(begin, begin + length)
            keep = slots >= 0
            index[slots[keep]] = rows[k] + np.arange(length)[keep]
        parts = [text[0], *(image_embeds[k].astype(text.dtype) for k in used)]
        return mx.concatenate(parts, axis=0)[mx.array(index)][None]

    def embed(self, input_ids: Any, pixel_values: Any = None, image_sizes: Any = None) -> mx.array:
        """Input embeddings [1, T, hidden] for a prompt and its images."""
        ids = mx.array(input_ids).reshape(1, -1)
        if pixel_values is None:
            return self.merge(ids, [])
        if image_sizes is None:
            raise ValueError("pixel_values given without image_sizes")
        return self.merge(ids, self.encode_images(pixel_values, image_sizes))

    def __call__(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        image_sizes: Any = None,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        if input_embeddings is None:
            input_embeddings = self.embed(input_ids, pixel_values, image_sizes)
        return self.language(input_embeddings, cache)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map official Hugging Face tensor names (and layouts) to this model's."""
        used_clip_layers = self.config.clip_layers_used
        out = {}
        for name, value in weights.items():
            new = _rename(name)
            if new is None:
                continue
            layer = re.match(r"vision\.clip\.layers\.(\d+)\.", new)
            if layer and int(layer.group(1)) >= used_clip_layers:
                continue
            if new == "vision.clip.embeddings.patch_embedding.weight" and value.ndim == 4:
                if value.shape[1] == self.config.vision_config.num_channels:
                    value = value.transpose(0, 2, 3, 1)
            out[new] = value
        return out


_RENAMES = [
    (r"^model\.vision_embed_tokens\.img_processor\.vision_model\.post_layernorm\.", None),
    (r"^model\.vision_embed_tokens\.wte\.", None),
    (r"\.position_ids$", None),
    (
        r"^model\.vision_embed_tokens\.img_processor\.vision_model\.encoder\.layers\.",
        "vision.clip.layers.",
    ),
    (r"^model\.vision_embed_tokens\.img_processor\.vision_model\.", "vision.clip."),
    (r"^model\.vision_embed_tokens\.img_projection\.0\.", "vision.projection.linear_1."),
    (r"^model\.vision_embed_tokens\.img_projection\.2\.", "vision.projection.linear_2."),
    (r"^model\.vision_embed_tokens\.", "vision."),
    (r"^model\.", "language."),
    (r"^lm_head\.", "language.lm_head."),
]


def _rename(name: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if re.search(pattern, name):
            return None if replacement is None else re.sub(pattern, replacement, name)
    return name
