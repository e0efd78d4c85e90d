"""Phi-3-Vision and Phi-3.5-Vision: the CLIP encoder and the Phi-3 decoder, joined by filling
image slots with image embeddings."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ..base import DecoderModel
from ..phi3 import LanguageModel
from .config import ModelConfig
from .vision import VisionEncoder


class Model(DecoderModel):
    """``model(input_ids, pixel_values, image_sizes, cache)`` returns logits [1, T, vocab]."""

    # Official tensor-name prefixes (Hugging Face, and mlx-vlm, which keeps them) and ours.
    NAME_PREFIXES: ClassVar[list[tuple[str, str]]] = [
        ("model.vision_embed_tokens.img_processor.vision_model.encoder.layers.",
         "vision.clip.layers."),
        ("model.vision_embed_tokens.img_processor.vision_model.", "vision.clip."),
        ("model.vision_embed_tokens.img_projection.0.", "vision.projection.linear_1."),
        ("model.vision_embed_tokens.img_projection.2.", "vision.projection.linear_2."),
        ("model.vision_embed_tokens.", "vision."),
        *DecoderModel.NAME_PREFIXES,
    ]  # fmt: skip
    # Official tensors this model has no use for: CLIP's pooler norm, a duplicate of the token
    # embeddings, position-id buffers.
    UNUSED_TENSORS: ClassVar[re.Pattern] = re.compile(
        r"^model\.vision_embed_tokens\.(img_processor\.vision_model\.post_layernorm|wte)\."
        r"|\.position_ids$"
    )

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config)
        self.language = LanguageModel(config)

    def encode_images(
        self,
        pixel_values: Any,
        image_sizes: Any,
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, the embeddings [num_img_tokens, hidden] that fill its prompt slots.

        ``between_batches()`` is called after each evaluated batch of crops.
        """
        sizes = np.asarray(image_sizes).reshape(-1, 2).tolist()
        return self.vision(mx.array(pixel_values), sizes, between_batches)

    def embed(self, input_ids: Any, pixel_values: Any = None, image_sizes: Any = None) -> mx.array:
        """Input embeddings [1, T, hidden] for a prompt and its images."""
        if pixel_values is not None and image_sizes is None:
            raise ValueError("pixel_values given without image_sizes")
        return super().embed(input_ids, pixel_values=pixel_values, image_sizes=image_sizes)

    def official_weights(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Official names, the patch convolution in MLX's layout."""
        channels = self.config.vision_config.num_channels
        return {
            name: conv_layout(value, channels) if name.endswith("patch_embedding.weight") else value
            for name, value in super().official_weights(weights).items()
        }

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Our names and layouts; the CLIP layers past the one whose features are used are
        left out."""
        used = self.config.clip_layers_used
        out = {}
        for name, value in super().sanitize(weights).items():
            layer = re.match(r"vision\.clip\.layers\.(\d+)\.", name)
            if layer is None or int(layer.group(1)) < used:
                out[name] = value
        return out


def conv_layout(weight: mx.array, channels: int) -> mx.array:
    """A convolution weight in MLX's OHWI layout, given PyTorch's OIHW or OHWI."""
    if weight.ndim == 4 and weight.shape[1] == channels:
        return weight.transpose(0, 2, 3, 1)
    return weight
