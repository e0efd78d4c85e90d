"""Phi-4-reasoning-vision's image preparation, exactly as its reference processor makes it: the
NaFlex size (kept in range, small images upscaled, large ones downscaled), PIL bilinear resize,
(x - 0.5) / 0.5 normalisation, and 16 x 16 patches in row-major order, padded to a fixed count."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from ...processor import DEFAULT_MAX_PIXELS, ImageInput, load_image

MEAN = 0.5
STD = 0.5
RESCALE = 1 / 255


def size_for_patches(height: int, width: int, patch: int, budget: int) -> tuple[int, int]:
    """The (height, width), multiples of ``patch``, of the largest scaled image with at most
    ``budget`` patches, by transformers' binary search over the scale."""

    def scaled(size: int, scale: float) -> int:
        return max(patch, math.ceil(size * scale / patch) * patch)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        scale = (low + high) / 2
        if (scaled(height, scale) / patch) * (scaled(width, scale) / patch) <= budget:
            low = scale
        else:
            high = scale
    return scaled(height, low), scaled(width, low)


@dataclass
class ImageInputs:
    """Images as the vision tower takes them: each image's patches, padded with zero rows to
    the same count, and its patch grid (rows, columns), which ``Model.encode_images`` takes as
    the image's size."""

    pixel_values: np.ndarray  # [n, max_num_patches, patch * patch * 3] float32
    image_sizes: list[tuple[int, int]]

    def tensors(self) -> dict[str, mx.array]:
        """The reference processor's layout: the patches, the mask of real patches (a prefix
        of each row), the patch grids and the token counts."""
        grids = np.asarray(self.image_sizes, dtype=np.int32).reshape(-1, 2)
        counts = grids[:, 0] * grids[:, 1]
        mask = np.arange(self.pixel_values.shape[1])[None] < counts[:, None]
        return {
            "pixel_values": mx.array(self.pixel_values),
            "pixel_attention_mask": mx.array(mask.astype(np.int32)),
            "spatial_shapes": mx.array(grids),
            "num_image_tokens": mx.array(counts),
        }


class ImageProcessor:
    """Images to NaFlex patches: ``image_processor(images)`` gives ``pixel_values`` [n, P, 768]
    (P = ``max_num_patches``), ``pixel_attention_mask`` [n, P], ``spatial_shapes`` [n, 2]
    (patch rows, columns) and ``num_image_tokens`` [n]."""

    def __init__(
        self,
        patch_size: int = 16,
        min_num_patches: int = 256,
        max_num_patches: int = 3600,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.patch_size = patch_size
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.max_pixels = max_pixels

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The resized (width, height) of an image: its own patch count when within
        [min_num_patches, max_num_patches], else the nearer bound; never a side under one
        patch."""
        patch = self.patch_size
        count = max((height // patch) * (width // patch), 1)
        budget = min(max(count, self.min_num_patches), self.max_num_patches)
        new_h, new_w = size_for_patches(height, width, patch, budget)
        return new_w, new_h

    def image_tokens(self, image: Image.Image) -> int:
        """Prompt slots of a loaded image (its patch count), from its size alone."""
        width, height = self.target_size(*image.size)
        return (width // self.patch_size) * (height // self.patch_size)

    def patches(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """An RGB image's patches [rows * columns, patch * patch * 3] (each patch in (y, x,
        channel) order) and its patch grid (rows, columns)."""
        width, height = self.target_size(*image.size)
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = (np.asarray(resized, dtype=np.float64) * RESCALE).astype(np.float32)
        pixels = (pixels - np.float32(MEAN)) / np.float32(STD)
        p = self.patch_size
        rows, cols = height // p, width // p
        grid = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
        return grid.reshape(rows * cols, p * p * 3), (rows, cols)

    def preprocess(self, images: Sequence[ImageInput], first: int = 0) -> ImageInputs:
        """``images`` (PIL images in any mode, paths, bytes or arrays; numbered from ``first``
        in errors) as the vision tower takes them."""
        pixel_values = np.zeros(
            (len(images), self.max_num_patches, self.patch_size**2 * 3), dtype=np.float32
        )
        grids = []
        for i, source in enumerate(images):
            patches, grid = self.patches(load_image(source, first + i, self.max_pixels))
            pixel_values[i, : len(patches)] = patches
            grids.append(grid)
        return ImageInputs(pixel_values, grids)

    def __call__(self, images: Sequence[ImageInput] | ImageInput) -> dict[str, mx.array]:
        """The reference processor's outputs for ``images``: ``pixel_values``,
        ``pixel_attention_mask``, ``spatial_shapes`` and ``num_image_tokens``."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.preprocess(list(images)).tensors()
