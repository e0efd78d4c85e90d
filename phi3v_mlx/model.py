"""The model: for Phi-3-Vision, the vision encoder and the decoder joined by filling image slots
with image embeddings; for the Phi-3 text models, the decoder alone."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .language import LanguageModel, PromptCache
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
        self.vision = VisionEncoder(config) if config.has_vision else None
        self.language = LanguageModel(config)

    @property
    def layers(self) -> list[nn.Module]:
        return self.language.layers

    def make_cache(self, max_kv_size: int | None = None) -> PromptCache:
        """An empty cache for one sequence."""
        return self.language.make_cache(max_kv_size)

    def encode_images(
        self,
        pixel_values: Any,
        image_sizes: Any,
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, the embeddings [num_img_tokens, hidden] that fill its prompt slots.

        ``between_batches()`` is called after each evaluated batch of crops.
        """
        if self.vision is None:
            raise ValueError(f"this is a text model ({self.config.model_type}): it reads no images")
        sizes = np.asarray(image_sizes).reshape(-1, 2).tolist()
        return self.vision(mx.array(pixel_values), sizes, between_batches)

    def merge(
        self, input_ids: mx.array, image_embeds: Sequence[mx.array | None], start: int = 0
    ) -> mx.array:
        """Input embeddings [1, T - start, hidden] of positions ``start``.. of a prompt: tokens
        embedded, the slots of image k filled by image k's embeddings (None for an image whose
        slots all lie before ``start``)."""
        ids = np.asarray(input_ids).reshape(-1)
        runs = image_slots(ids)
        if image_embeds and not runs:
            raise ValueError(
                f"{len(image_embeds)} image(s) given but the prompt has no image slots"
            )
        for begin, length, k in runs:
            if k >= len(image_embeds):
                raise ValueError(
                    f"the prompt has slots for image {k + 1} "
                    f"but {len(image_embeds)} image(s) were given"
                )
            if image_embeds[k] is None and begin + length > start:
                raise ValueError(f"image {k + 1} is needed from position {start} on")
            if image_embeds[k] is not None and length != len(image_embeds[k]):
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
        cache: PromptCache | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        if input_embeddings is None:
            input_embeddings = self.embed(input_ids, pixel_values, image_sizes)
        return self.language(input_embeddings, cache)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Tensors of a checkpoint (official or this package's names) under this model's names
        and layouts; tensors the model never uses are left out."""
        used_clip_layers = self.config.clip_layers_used
        out = {}
        for name, value in stack_experts(weights).items():
            if UNUSED_TENSORS.search(name):
                continue
            new = internal_name(name)
            layer = re.match(r"vision\.clip\.layers\.(\d+)\.", new)
            if layer and int(layer.group(1)) >= used_clip_layers:
                continue
            if new == "vision.clip.embeddings.patch_embedding.weight":
                value = conv_layout(value, self.config.vision_config.num_channels)
            out[new] = value
        return out


EXPERT_TENSOR = re.compile(r"^(.*\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.(\w+)$")
EXPERT_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def stack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Phi-3.5-MoE's per-expert tensors (``experts.E.w1``..) stacked into the ``switch_mlp``
    projections mlx-lm uses (``gate_proj`` = w1, ``down_proj`` = w2, ``up_proj`` = w3); other
    tensors as they are."""
    out, groups = {}, {}
    for name, value in weights.items():
        match = EXPERT_TENSOR.match(name)
        if match is None:
            out[name] = value
            continue
        block, expert, projection, kind = match.groups()
        key = f"{block}.switch_mlp.{EXPERT_PROJECTIONS[projection]}.{kind}"
        groups.setdefault(key, {})[int(expert)] = value
    for key, experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"the experts of {key} are not numbered 0..{len(experts) - 1}")
        out[key] = mx.stack([experts[e] for e in range(len(experts))])
    return out


def conv_layout(weight: mx.array, channels: int) -> mx.array:
    """A convolution weight in MLX's OHWI layout, given PyTorch's OIHW or OHWI."""
    if weight.ndim == 4 and weight.shape[1] == channels:
        return weight.transpose(0, 2, 3, 1)
    return weight


# Official tensor-name prefixes (Hugging Face, and mlx-vlm, which keeps them) and this package's.
NAME_PREFIXES = [
    ("model.vision_embed_tokens.img_processor.vision_model.encoder.layers.", "vision.clip.layers."),
    ("model.vision_embed_tokens.img_processor.vision_model.", "vision.clip."),
    ("model.vision_embed_tokens.img_projection.0.", "vision.projection.linear_1."),
    ("model.vision_embed_tokens.img_projection.2.", "vision.projection.linear_2."),
    ("model.vision_embed_tokens.", "vision."),
    ("lm_head.", "language.lm_head."),
    ("model.", "language."),
]
# Official tensors this model has no use for: CLIP's pooler norm, a duplicate of the token
# embeddings, position-id buffers.
UNUSED_TENSORS = re.compile(
    r"^model\.vision_embed_tokens\.(img_processor\.vision_model\.post_layernorm|wte)\."
    r"|\.position_ids$"
)


def _swap_prefix(name: str, side: int) -> str:
    """``name`` with its longest matching prefix of one side replaced by the other side's."""
    for pair in sorted(NAME_PREFIXES, key=lambda pair: -len(pair[side])):
        if name.startswith(pair[side]):
            return pair[1 - side] + name[len(pair[side]) :]
    return name


def internal_name(name: str) -> str:
    """This package's name of a tensor (or, with a trailing dot, a module) given either name."""
    return _swap_prefix(name, 0)


def official_name(name: str) -> str:
    """The official name of a tensor given either name."""
    return _swap_prefix(name, 1)


def module_names(quantization: dict[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    """A ``quantization`` config block with its per-module entries renamed by ``rename``."""
    return {
        rename(f"{key}.")[:-1] if isinstance(value, (dict, bool)) else key: value
        for key, value in quantization.items()
    }
