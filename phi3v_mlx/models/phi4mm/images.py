"""Phi-4-multimodal's image preparation, exactly as the reference image processor makes it: a grid
of at most ``dynamic_hd`` 448-px crops, an antialiased bilinear resize on 8-bit pixels with white
padding, the per-patch mask of that padding, the bicubic global view, and each image's prompt
slots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...processor import DEFAULT_MAX_PIXELS, ImageError, ImageInput, load_image
from ..phi3v.images import _cubic_weights

CROP = 448
PATCH = 14
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MIN_SIDE = 10  # the reference refuses a resized side below this


def crop_grid(width: int, height: int, dynamic_hd: int, crop: int = CROP) -> tuple[int, int]:
    """Crops across and down: the image's natural grid if it has at most ``dynamic_hd`` crops,
    else the grid of at most ``dynamic_hd`` crops whose shape is closest to the image's."""
    across, down = math.ceil(width / crop), math.ceil(height / crop)
    if across * down <= dynamic_hd:
        return across, down
    # A set sorted by area, scanned in that order: ties of area keep the set's own order, as in
    # the reference.
    candidates = {
        (i, j)
        for n in range(1, dynamic_hd + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if 1 <= i * j <= dynamic_hd
    }
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in sorted(candidates, key=lambda c: c[0] * c[1]):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * crop * crop * i * j:
            best = (i, j)
    return best


@dataclass(frozen=True)
class HDLayout:
    """Where an image goes in its HD canvas: the grid, the resized size (placed top-left, the
    rest white), and the patch mask [down * grid, across * grid] of the canvas."""

    across: int
    down: int
    width: int
    height: int
    mask: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Prompt slots: the HD part (useful rows of useful pooled columns plus one separator
        per row), one separator, the 16x16 global view with one separator per row."""
        pooled = self.mask[::2, ::2]
        side = self.mask.shape[0] // self.down // 2
        return side * side + side + 1 + int(pooled.sum()) + int(pooled[:, 0].sum())


def hd_layout(
    width: int, height: int, dynamic_hd: int, crop: int = CROP, patch: int = PATCH
) -> HDLayout:
    """The HD canvas of a ``width`` x ``height`` image with at most ``dynamic_hd`` crops."""
    across, down = crop_grid(width, height, dynamic_hd, crop)
    target_w, target_h = crop * across, crop * down
    if target_w / width < target_h / height:
        new_w, new_h = target_w, int(height * target_w / width)
    else:
        new_w, new_h = int(width * target_h / height), target_h
    if min(new_w, new_h) < MIN_SIDE:
        raise ImageError(
            f"a {width}x{height} image is too elongated: it would be resized to {new_w}x{new_h}"
        )
    return HDLayout(
        across, down, new_w, new_h, canvas_mask(target_h, target_w, new_h, new_w, patch)
    )


def canvas_mask(
    height: int, width: int, used_height: int, used_width: int, patch: int = PATCH
) -> np.ndarray:
    """The patch mask [height / patch, width / patch] of an HD canvas whose top-left
    ``used_height`` x ``used_width`` pixels hold the image: the last whole patches of padding
    (floor(padding / patch) columns and rows) are 0."""
    mask = np.ones((height // patch, width // patch), dtype=np.int64)
    pad_w, pad_h = width - used_width, height - used_height
    if pad_w >= patch:
        mask[:, mask.shape[1] - pad_w // patch :] = 0
    if pad_h >= patch:
        mask[mask.shape[0] - pad_h // patch :, :] = 0
    return mask


def crop_masks(mask: np.ndarray, crop: int = CROP, patch: int = PATCH) -> np.ndarray:
    """Per-crop patch masks [1 + tiles, g, g] of a canvas mask: the global view (all valid),
    then each tile row-major."""
    g = crop // patch
    down, across = mask.shape[0] // g, mask.shape[1] // g
    tiles = mask.reshape(down, g, across, g).transpose(0, 2, 1, 3).reshape(-1, g, g)
    return np.concatenate([np.ones((1, g, g), np.int64), tiles])


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The input indices [out, k] and integer weights [out, k] of an antialiased linear resize,
    and their fixed-point precision (the 16-bit weights of torch's 8-bit kernel)."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    most = math.ceil(support) * 2 + 1
    index = np.zeros((out_size, most), np.int64)
    weights = np.zeros((out_size, most))
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        count = min(max(min(int(center + support + 0.5), in_size) - first, 0), most)
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(count) + first - center + 0.5) * inverse))
        total = taps.sum()
        index[i, :count] = first + np.arange(count)
        weights[i, :count] = taps / total if total else taps
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    return index, np.floor(0.5 + weights * (1 << precision)).astype(np.int32), precision


def _resample_rows(pixels: np.ndarray, size: int) -> np.ndarray:
    """One pass of :func:`resize_bilinear` along the first axis, in fixed point."""
    index, taps, precision = _linear_taps(pixels.shape[0], size)
    # 32 bits suffice: the weights of one output sum to 2**precision <= 2**22, times 255
    out = np.full((size, *pixels.shape[1:]), 1 << (precision - 1), np.int32)
    for k in range(index.shape[1]):
        out += taps[:, k, None, None] * pixels[index[:, k]]
    return np.clip(out >> precision, 0, 255)


def resize_bilinear(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """An 8-bit [H, W, C] image resized with antialiased bilinear filtering, exactly as torch's
    8-bit kernel does it (torchvision's ``resize``): columns first, then rows, each pass in fixed
    point rounded back to 8 bits."""
    out = pixels.astype(np.int32)
    if width != out.shape[1]:
        out = _resample_rows(out.transpose(1, 0, 2), width).transpose(1, 0, 2)
    if height != out.shape[0]:
        out = _resample_rows(out, height)
    return out.astype(np.uint8)


def global_view(hd: np.ndarray, size: int = CROP) -> np.ndarray:
    """The normalized HD canvas [H, W, 3] resized to [size, size, 3] as torch's bicubic does."""
    rows, cols = _cubic_weights(hd.shape[0], size), _cubic_weights(hd.shape[1], size)
    out = np.einsum("oh,hwc,pw->opc", rows, hd.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


@dataclass
class ImageInputs:
    """Crops of all images (each image's global view, then its tiles; no padding crops) and per
    image its canvas and placement (height, width, used height, used width) and prompt slots."""

    pixel_values: np.ndarray  # [crops, s, s, 3] float32
    image_sizes: list[tuple[int, int, int, int]]
    num_tokens: list[int]


class ImageProcessor:
    """Images to the image encoder's inputs, with the checkpoint's settings."""

    def __init__(
        self,
        dynamic_hd: int = 36,
        crop: int = CROP,
        patch: int = PATCH,
        image_mean: Sequence[float] = MEAN,
        image_std: Sequence[float] = STD,
    ):
        self.dynamic_hd = dynamic_hd
        self.crop = crop
        self.patch = patch
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)

    @classmethod
    def from_folder(cls, path: Path) -> ImageProcessor:
        """Settings from ``preprocessor_config.json`` (defaults when absent)."""
        file = Path(path) / "preprocessor_config.json"
        settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        size = settings.get("size") or {}
        return cls(
            dynamic_hd=int(settings.get("dynamic_hd", 36)),
            crop=int(size.get("height", CROP)),
            patch=int(settings.get("patch_size", PATCH)),
            image_mean=settings.get("image_mean") or MEAN,
            image_std=settings.get("image_std") or STD,
        )

    def check_dynamic_hd(self, dynamic_hd: int | None) -> int:
        """``dynamic_hd`` checked (the processor's default if None)."""
        dynamic_hd = self.dynamic_hd if dynamic_hd is None else int(dynamic_hd)
        if dynamic_hd < 1:
            raise ValueError(f"dynamic_hd must be at least 1, got {dynamic_hd}")
        return dynamic_hd

    def image_tokens(self, image: Image.Image, dynamic_hd: int | None = None) -> int:
        """Prompt slots of a loaded image, from its size alone (no pixel work)."""
        width, height = image.size
        dynamic_hd = self.check_dynamic_hd(dynamic_hd)
        return hd_layout(width, height, dynamic_hd, self.crop, self.patch).num_tokens

    def _crops(self, image: Image.Image, layout: HDLayout) -> np.ndarray:
        """The global view and the HD tiles in row-major order, [1 + down * across, s, s, 3]."""
        s = self.crop
        canvas = np.full((s * layout.down, s * layout.across, 3), 255, dtype=np.uint8)
        resized = resize_bilinear(np.asarray(image), layout.width, layout.height)
        canvas[: layout.height, : layout.width] = resized
        hd = (canvas.astype(np.float32) / np.float32(255) - self.mean) / self.std
        tiles = hd.reshape(layout.down, s, layout.across, s, 3).transpose(0, 2, 1, 3, 4)
        return np.concatenate([global_view(hd, s)[None], tiles.reshape(-1, s, s, 3)])

    def preprocess(
        self,
        images: Sequence[ImageInput],
        dynamic_hd: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> ImageInputs:
        """The crops of all images in one run, each image's global view then its tiles, and per
        image its canvas and placement ``(height, width, used height, used width)``, from which
        :func:`canvas_mask` rebuilds its patch mask."""
        dynamic_hd = self.check_dynamic_hd(dynamic_hd)
        crops, sizes, counts = [], [], []
        for i, source in enumerate(images):
            image = load_image(source, i, max_pixels)
            layout = hd_layout(*image.size, dynamic_hd, self.crop, self.patch)
            crops.append(self._crops(image, layout))
            canvas = (self.crop * layout.down, self.crop * layout.across)
            sizes.append((*canvas, layout.height, layout.width))
            counts.append(layout.num_tokens)
        empty = np.zeros((0, self.crop, self.crop, 3), np.float32)
        return ImageInputs(np.concatenate(crops) if crops else empty, sizes, counts)

    def __call__(
        self,
        images: Sequence[ImageInput],
        dynamic_hd: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> dict[str, np.ndarray]:
        """``pixel_values`` [n, crops, s, s, 3] (each image's global view, then its tiles, then
        zero crops up to the largest count), ``image_sizes`` [n, 2] (height, width of each HD
        canvas), ``image_attention_mask`` [n, crops, s/14, s/14] (padding crops all valid) and
        ``num_img_tokens`` [n]."""
        pre = self.preprocess(images, dynamic_hd, max_pixels)
        g = self.crop // self.patch
        counts = [1 + (h // self.crop) * (w // self.crop) for h, w, _, _ in pre.image_sizes]
        most = max(counts, default=0)
        pixels = np.zeros((len(counts), most, self.crop, self.crop, 3), np.float32)
        mask = np.ones((len(counts), most, g, g), np.int64)
        start = 0
        for i, (count, size) in enumerate(zip(counts, pre.image_sizes, strict=True)):
            pixels[i, :count] = pre.pixel_values[start : start + count]
            mask[i, :count] = crop_masks(canvas_mask(*size, self.patch), self.crop, self.patch)
            start += count
        return {
            "pixel_values": pixels,
            "image_sizes": np.asarray([size[:2] for size in pre.image_sizes], np.int64).reshape(
                -1, 2
            ),
            "image_attention_mask": mask,
            "num_img_tokens": np.asarray(pre.num_tokens, np.int64),
        }
