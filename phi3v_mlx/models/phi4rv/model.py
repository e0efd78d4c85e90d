"""The model: SigLIP-2 NaFlex features, projected, fill each image's slots in the prompt read by
the Phi-4 decoder (the shared Phi-3 decoder)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ..base import DecoderModel
from ..phi3 import LanguageModel
from .config import ModelConfig
from .vision import Projector, VisionTower, used_layers

# The reference's placeholder id: one per image in the prompt's ids, where the image goes.
IMAGE_PLACEHOLDER = -200
# Patches of one batch through the tower (a few full-size images).
BATCH_PATCHES = 4 * 3600


class MediaError(ValueError):
    """Image inputs that do not fit together or with the prompt."""


def expand_placeholders(input_ids: Any, counts: list[int]) -> np.ndarray:
    """1-D ids with the k-th placeholder (-200) replaced by ``counts[k]`` slots of ``-(k + 1)``;
    ids without placeholders as they are."""
    ids = np.asarray(input_ids).reshape(-1)
    where = np.flatnonzero(ids == IMAGE_PLACEHOLDER)
    if len(where) == 0:
        return ids
    if len(where) != len(counts):
        raise MediaError(
            f"the prompt has {len(where)} image placeholder(s) (-200) "
            f"but {len(counts)} image(s) were given"
        )
    if np.any((ids < 0) & (ids != IMAGE_PLACEHOLDER)):
        raise MediaError("the prompt mixes -200 placeholders with expanded image slots")
    parts, start = [], 0
    for k, (at, count) in enumerate(zip(where.tolist(), counts, strict=True)):
        parts += [ids[start:at], np.full(count, -(k + 1), dtype=ids.dtype)]
        start = at + 1
    parts.append(ids[start:])
    return np.concatenate(parts)


def image_grids(inputs: Mapping[str, Any], patch_dim: int) -> list[tuple[int, int]]:
    """Each image's patch grid (rows, columns) from ``spatial_shapes`` (or ``image_sizes``),
    checked against the other inputs (patches of ``patch_dim`` values)."""
    shapes = inputs.get("spatial_shapes")
    shapes = inputs.get("image_sizes") if shapes is None else shapes
    if shapes is None:
        raise MediaError("pixel_values given without spatial_shapes")
    shapes = np.asarray(shapes).reshape(-1, 2)
    grids = [(int(r), int(c)) for r, c in shapes.tolist()]
    counts = [r * c for r, c in grids]
    pixels = inputs["pixel_values"]
    if len(pixels.shape) != 3 or pixels.shape[0] != len(grids) or pixels.shape[2] != patch_dim:
        raise MediaError(
            f"pixel_values has shape {list(pixels.shape)}, "
            f"want [{len(grids)}, patches, {patch_dim}]"
        )
    if min(counts, default=1) < 1 or max(counts, default=0) > pixels.shape[1]:
        raise MediaError(f"spatial_shapes {shapes.tolist()} do not fit {pixels.shape[1]} rows")
    if inputs.get("num_image_tokens") is not None:
        given = np.asarray(inputs["num_image_tokens"]).reshape(-1).tolist()
        if given != counts:
            raise MediaError(f"num_image_tokens {given} disagree with spatial_shapes {counts}")
    if inputs.get("pixel_attention_mask") is not None:
        real = np.asarray(inputs["pixel_attention_mask"]).reshape(len(grids), -1).sum(1)
        if real.tolist() != counts:
            raise MediaError(
                f"pixel_attention_mask marks {real.tolist()} patches, spatial_shapes {counts}"
            )
    return grids


def batches(counts: list[int], budget: int) -> list[range]:
    """Consecutive images grouped so that each padded batch (its size times its largest patch
    count) holds at most ``budget`` patches; an image over the budget goes alone."""
    groups, start = [], 0
    for end in range(2, len(counts) + 1):
        if (end - start) * max(counts[start:end]) > budget:
            groups.append(range(start, end - 1))
            start = end - 1
    if counts:
        groups.append(range(start, len(counts)))
    return groups


class Model(DecoderModel):
    """``model(input_ids, pixel_values=..., pixel_attention_mask=..., spatial_shapes=...)``
    returns logits [1, T, vocab]; the ids hold one -200 per image, or its slots already
    expanded (``-(k + 1)`` for image k)."""

    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ("vision.", "projector.")
    NAME_PREFIXES: ClassVar[list[tuple[str, str]]] = [
        ("model.vision_tower.vision_tower.vision_model.", "vision."),
        ("model.mm_projector.", "projector.layers."),
        ("lm_head.", "language.lm_head."),
        ("model.", "language."),
    ]
    UNUSED_TENSORS: ClassVar[re.Pattern] = re.compile(
        r"^model\.vision_tower\.vision_tower\.vision_model\.(post_layernorm|head)\."
        r"|\.position_ids$|\.rotary_emb\.inv_freq$"
    )

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision_config)
        self.projector = Projector(config)
        self.language = LanguageModel(config.text)

    def encode(
        self, inputs: Mapping[str, Any], between_batches: Callable[[], None] | None = None
    ) -> list[mx.array]:
        """Per image, the projected features [rows * columns, hidden] that fill its slots, from
        the processor's outputs (checked against each other; none without ``pixel_values``)."""
        if inputs.get("pixel_values") is None:
            return []
        grids = image_grids(inputs, self.config.vision_config.patch_dim)
        return self.encode_images(inputs["pixel_values"], grids, between_batches)

    def encode_images(
        self,
        pixel_values: Any,
        image_sizes: Any,
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, the projected features [rows * columns, hidden] of ``pixel_values``
        [n, P, patch_dim] whose image i fills its first rows x columns rows, ``image_sizes``
        holding each image's patch grid (rows, columns).

        Images run through the tower in padded batches (each on its own grid, padding masked);
        ``between_batches()`` is called after each evaluated batch.
        """
        grids = [(int(r), int(c)) for r, c in np.asarray(image_sizes).reshape(-1, 2).tolist()]
        dtype = self.vision.embeddings.patch_embedding.bias.dtype
        features: list[mx.array] = []
        for batch in batches([r * c for r, c in grids], BATCH_PATCHES):
            width = max(grids[i][0] * grids[i][1] for i in batch)
            rows = pixel_values[batch.start : batch.stop, :width]
            out = self.vision(mx.array(rows).astype(dtype), grids[batch.start : batch.stop])
            projected = [
                self.projector(out[row, : grids[i][0] * grids[i][1]]) for row, i in enumerate(batch)
            ]
            mx.eval(projected)
            features += projected
            if between_batches is not None:
                between_batches()
        return features

    def embed(self, input_ids: Any, **media: Any) -> mx.array:
        """Input embeddings [1, T, hidden] of a prompt and its processor's image inputs; each
        -200 placeholder is expanded to its image's slots first."""
        features = self.encode(media)
        ids = expand_placeholders(input_ids, [len(f) for f in features])
        return self.merge(ids, features)

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Tensors of a checkpoint (official or this package's names) under this model's names;
        the vision layers after the feature layer, the final norm and the pooling head are
        left out."""
        keep = used_layers(self.config.vision_config)
        out = {}
        for name, value in super().sanitize(weights).items():
            layer = re.match(r"vision\.encoder\.layers\.(\d+)\.", name)
            if layer and int(layer.group(1)) >= keep:
                continue
            out[name] = value
        return out
