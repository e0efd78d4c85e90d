"""Phi-3-Vision's image preparation, exactly as the official processor makes it: the HD transform
into 336-px crops with white padding, CLIP normalization, the bicubic global view, and each
image's prompt slots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...processor import DEFAULT_MAX_PIXELS, ImageInput, load_image

CROP = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int, bool]:
    """Resized (width, height) of the HD transform, and whether the image was transposed."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    return new_w, max(1, int(new_w / ratio)), transposed


def hd_image(image: Image.Image, num_crops: int) -> Image.Image:
    """Resize to a grid of at most ``num_crops`` 336-px crops and pad the height with white."""
    width, height = image.size
    new_w, new_h, transposed = hd_size(width, height, num_crops)
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / CROP) * CROP
    top = int((target - new_h) / 2)
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(image, (0, top))
    if transposed:
        padded = padded.transpose(Image.Transpose.TRANSPOSE)
    return padded


def num_image_tokens(height: int, width: int, tokens_per_crop: int = 144) -> int:
    """Prompt slots of one image whose padded HD size is (height, width)."""
    rows, cols = height // CROP, width // CROP
    side = math.isqrt(tokens_per_crop)
    return (rows * cols + 1) * tokens_per_crop + 1 + (rows + 1) * side


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of bicubic (a = -0.75, align_corners False, edge clamp) interpolation."""
    a = -0.75
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    index = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.repeat(np.arange(out_size), 4), index.ravel()), taps.ravel())
    return weights


def global_view(hd: np.ndarray) -> np.ndarray:
    """The normalized HD image [H, W, 3] resized to [336, 336, 3] as torch's bicubic does."""
    rows = _cubic_weights(hd.shape[0], CROP)
    cols = _cubic_weights(hd.shape[1], CROP)
    out = np.einsum("oh,hwc,pw->opc", rows, hd.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


@dataclass
class ImageInputs:
    """Crops of all images (global view first for each) and each image's padded size."""

    pixel_values: np.ndarray  # [crops, 336, 336, 3] float32
    image_sizes: list[tuple[int, int]]
    num_tokens: list[int]


class ImageProcessor:
    """Images to crops and prompt slot counts, with the checkpoint's settings."""

    def __init__(
        self,
        num_crops: int = 4,
        num_img_tokens: int = 144,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_positions: int | None = None,
    ):
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)
        self.max_positions = max_positions

    @classmethod
    def from_folder(cls, path: Path, max_positions: int | None = None) -> ImageProcessor:
        """Settings from ``preprocessor_config.json`` (defaults when absent)."""
        file = Path(path) / "preprocessor_config.json"
        settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        return cls(
            num_crops=int(settings.get("num_crops", 4)),
            num_img_tokens=int(settings.get("num_img_tokens", 144)),
            image_mean=settings.get("image_mean", CLIP_MEAN),
            image_std=settings.get("image_std", CLIP_STD),
            max_positions=max_positions,
        )

    @property
    def max_num_crops(self) -> int | None:
        """The most crops per image whose prompt slots fit the context (None: no bound)."""
        if self.max_positions is None:
            return None
        per_crop = self.num_img_tokens + math.isqrt(self.num_img_tokens)
        return max(1, (self.max_positions - 1) // per_crop - 1)

    def crops(self, num_crops: int | None) -> int:
        """``num_crops`` checked (the processor's default if None)."""
        num_crops = self.num_crops if num_crops is None else int(num_crops)
        if num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, got {num_crops}")
        bound = self.max_num_crops
        if bound is not None and num_crops > bound:
            raise ValueError(
                f"num_crops {num_crops} is over {bound}, the most whose image slots fit the "
                f"model's context of {self.max_positions:,} positions"
            )
        return num_crops

    def image_tokens(self, image: Image.Image, num_crops: int) -> int:
        """Prompt slots of a loaded image, from its size alone (no pixel work)."""
        width, height = image.size
        new_w, new_h, transposed = hd_size(width, height, num_crops)
        padded = (math.ceil(new_h / CROP) * CROP, new_w)
        rows, cols = padded[::-1] if transposed else padded
        return num_image_tokens(rows, cols, self.num_img_tokens)

    def preprocess(
        self,
        images: Sequence[ImageInput],
        num_crops: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> ImageInputs:
        """Images to crops: the HD transform, CLIP normalization, the global view, 336-px tiles."""
        num_crops = self.crops(num_crops)
        crops, sizes, counts = [], [], []
        for i, source in enumerate(images):
            image = load_image(source, i, max_pixels)
            hd = np.asarray(hd_image(image, num_crops), dtype=np.float32) / np.float32(255)
            hd = (hd - self.mean) / self.std
            height, width = hd.shape[:2]
            rows, cols = height // CROP, width // CROP
            tiles = hd.reshape(rows, CROP, cols, CROP, 3).transpose(0, 2, 1, 3, 4)
            crops.append(global_view(hd)[None])
            crops.append(tiles.reshape(rows * cols, CROP, CROP, 3))
            sizes.append((height, width))
            counts.append(num_image_tokens(height, width, self.num_img_tokens))
        pixels = np.concatenate(crops) if crops else np.zeros((0, CROP, CROP, 3), np.float32)
        return ImageInputs(pixels, sizes, counts)
