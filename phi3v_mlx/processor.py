"""Images and prompts to model inputs, exactly as the official Phi-3-Vision processor makes them."""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CROP = 336
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] "
    "+ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
    "'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)

ImageInput = Image.Image | str | Path | bytes | np.ndarray


class ImageError(ValueError):
    """An image that cannot be used."""


class PromptError(ValueError):
    """A prompt whose image tags do not match the images given."""


def _describe(source: Any, index: int) -> str:
    if isinstance(source, (str, Path)):
        return f"image {index + 1} ({source})"
    return f"image {index + 1} ({type(source).__name__})"


def load_image(
    source: ImageInput, index: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, encoded bytes or an HWC uint8 array.

    Whatever the input type, an EXIF orientation is applied (a phone photo comes out upright;
    the official processor ignores EXIF) and 16-bit grey levels are scaled to 8 bits (Pillow's
    own conversion would clip them to white).
    """
    name = _describe(source, index)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source, name)
    elif isinstance(source, (str, Path, bytes, bytearray)):
        image = _open(source, name)
    else:
        raise ImageError(f"{name}: unsupported image type {type(source).__name__}")
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"{name} is empty ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{name} has {width}x{height} pixels, over the limit of {max_pixels}")
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in SIXTEEN_BIT_MODES:
            levels = np.asarray(image, dtype=np.float64) / 257
            image = Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), "L")
        return image.convert("RGB")
    except OSError as e:
        raise ImageError(f"{name} cannot be decoded: {e}") from None


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(array, "RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageError(
        f"{name}: arrays must be HxW or HxWxC with C in 1, 3, 4; got shape {array.shape}"
    )


def _open(source: str | Path | bytes | bytearray, name: str) -> Image.Image:
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            raise ImageError(f"{name} is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        data = path
    else:
        data = io.BytesIO(bytes(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(data)
            image.load()
        return image
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} cannot be read: not an image format Pillow knows") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} cannot be read: {e}") from None


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


class Processor:
    """Prompts and images to ``input_ids``, ``pixel_values`` and ``image_sizes``."""

    def __init__(
        self,
        tokenizer: Any,
        num_crops: int = 4,
        num_img_tokens: int = 144,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_positions: int | None = None,
        vision: bool = True,
    ):
        self.tokenizer = tokenizer
        self.vision = vision
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens
        self.mean = np.asarray(image_mean, dtype=np.float32)
        self.std = np.asarray(image_std, dtype=np.float32)
        self.max_pixels = max_pixels
        self.max_positions = max_positions

    @classmethod
    def from_folder(
        cls, path: str | Path, tokenizer: Any, max_positions: int | None = None, vision: bool = True
    ) -> Processor:
        """Settings from ``preprocessor_config.json`` (defaults when absent); ``max_positions``
        is the model's context, which prompts may not exceed; ``vision`` False for a text model,
        whose prompts are plain text and which takes no images."""
        file = Path(path) / "preprocessor_config.json"
        settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        return cls(
            tokenizer,
            num_crops=int(settings.get("num_crops", 4)),
            num_img_tokens=int(settings.get("num_img_tokens", 144)),
            image_mean=settings.get("image_mean", CLIP_MEAN),
            image_std=settings.get("image_std", CLIP_STD),
            max_positions=max_positions,
            vision=vision,
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

    def load_images(self, images: Sequence[ImageInput], first: int = 0) -> list[Image.Image]:
        """Decoded RGB images, numbered from ``first`` in errors; a text model refuses any."""
        if images and not self.vision:
            raise ImageError("this is a text model: it takes no images")
        return [load_image(source, first + i, self.max_pixels) for i, source in enumerate(images)]

    def preprocess(self, images: Sequence[ImageInput], num_crops: int | None = None) -> ImageInputs:
        """Images to crops: the HD transform, CLIP normalization, the global view, 336-px tiles."""
        if images and not self.vision:
            raise ImageError("this is a text model: it takes no images")
        num_crops = self.crops(num_crops)
        crops, sizes, counts = [], [], []
        for i, source in enumerate(images):
            image = load_image(source, i, self.max_pixels)
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

    def tokenize(self, prompt: str, num_tokens: Sequence[int]) -> list[int]:
        """Prompt ids: each text chunk tokenized alone (with BOS), ``<|image_k|>`` as -k slots
        (a text model's prompt is plain text, tokenized whole).

        A prompt longer than the model's context is refused.
        """
        if not self.vision:
            ids = self.tokenizer.encode(prompt)
            self.check_length(len(ids))
            return ids
        tags = [int(k) for k in IMAGE_TAG.findall(prompt)]
        missing = sorted({k for k in tags if not 1 <= k <= len(num_tokens)})
        if missing:
            raise PromptError(
                f"the prompt names <|image_{missing[0]}|> but {len(num_tokens)} image(s) were given"
            )
        unused = sorted(set(range(1, len(num_tokens) + 1)) - set(tags))
        if unused:
            raise PromptError(
                f"image {unused[0]} is given but the prompt has no <|image_{unused[0]}|> tag"
            )
        ids: list[int] = []
        for i, chunk in enumerate(IMAGE_TAG.split(prompt)[::2]):
            if i:
                k = tags[i - 1]
                ids.extend([-k] * num_tokens[k - 1])
            ids.extend(self.tokenizer.encode(chunk))
        self.check_length(len(ids))
        return ids

    def check_length(self, length: int) -> None:
        """Refuse a prompt of ``length`` positions that does not fit the model's context."""
        if self.max_positions is not None and length > self.max_positions:
            raise PromptError(
                f"the prompt has {length:,} tokens, over the model's context of "
                f"{self.max_positions:,} (use fewer or smaller images, or a lower num_crops)"
            )

    def __call__(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        num_crops: int | None = None,
    ) -> dict[str, mx.array | None]:
        """Model inputs for a prompt (already in chat format) and the images its tags name.

        The prompt's length is checked before any pixel work.
        """
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        num_crops = self.crops(num_crops)
        loaded = self.load_images(images)
        ids = self.tokenize(prompt, [self.image_tokens(image, num_crops) for image in loaded])
        pre = self.preprocess(loaded, num_crops)
        return {
            "input_ids": mx.array([ids], dtype=mx.int32),
            "pixel_values": mx.array(pre.pixel_values) if images else None,
            "image_sizes": mx.array(pre.image_sizes, dtype=mx.int32) if images else None,
        }

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation in the official chat format; image parts become ``<|image_k|>`` tags
        numbered across the whole conversation."""
        rendered, count = [], 0
        for message in messages:
            content = message.get("content", "")
            if not isinstance(content, str):
                text = []
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        text.append(part.get("text", ""))
                    elif kind in ("image", "image_url") and not self.vision:
                        raise ImageError("this is a text model: it takes no images")
                    elif kind in ("image", "image_url"):
                        count += 1
                        text.append(f"<|image_{count}|>\n")
                    else:
                        raise PromptError(f"unknown message part {part!r}")
                content = "".join(text)
            rendered.append({"role": message["role"], "content": content})
        template = getattr(self.tokenizer, "chat_template", None) or CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(
            rendered,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
