"""Prompts and media to model inputs: image loading, ``<|image_N|>`` tags, the chat template and
the stop ids, for every architecture (each brings its own image preparation)."""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
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


# The content parts that carry media, by the kind of media they carry.
MEDIA_PARTS = {"image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio"}


def as_list(items: Any) -> list[Any]:
    """One input or several (a list or tuple) as a list; None as none."""
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def flatten_parts(content: Any, tag: Callable[[str], str]) -> str:
    """A message's content as text: a string as it is; a list of parts joined, each text part's
    text, each image or audio part ``tag(kind)`` ("image" or "audio"), any other part refused."""
    if isinstance(content, str):
        return content
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(part.get("text", ""))
        elif kind in MEDIA_PARTS:
            text.append(tag(MEDIA_PARTS[kind]))
        else:
            raise PromptError(f"unknown message part {part!r}")
    return "".join(text)


def numbered_tags(template: str) -> Callable[[str], str]:
    """A ``flatten_parts`` tag that numbers each kind of media across a whole conversation:
    ``template.format(kind=kind, k=k)`` for the kind's k-th part."""
    counts = {"image": 0, "audio": 0}

    def tag(kind: str) -> str:
        counts[kind] += 1
        return template.format(kind=kind, k=counts[kind])

    return tag


def check_context(length: int, max_positions: int | None, advice: str) -> None:
    """Refuse a prompt of ``length`` positions over the model's context (None: no limit), in
    one line that ends with ``advice``."""
    if max_positions is not None and length > max_positions:
        raise PromptError(
            f"the prompt has {length:,} tokens, over the model's context of {max_positions:,} "
            f"({advice})"
        )


class Processor:
    """Prompts and images to ``input_ids`` and the media tensors of the model's encoder.

    ``images`` is the architecture's image preparation (None for a text model): it checks
    ``num_crops`` (``crops``), counts an image's prompt slots (``image_tokens``) and turns images
    into tensors (``preprocess``). ``stop_ids`` end an answer; ``max_positions`` is the model's
    context, which prompts may not exceed.
    """

    def __init__(
        self,
        tokenizer: Any,
        images: Any = None,
        stop_ids: set[int] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_positions: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.images = images
        self.stop_ids = set(stop_ids or ()) | set(tokenizer.eos_token_ids)
        self.max_pixels = max_pixels
        self.max_positions = max_positions

    @property
    def vision(self) -> bool:
        """Whether the model reads images."""
        return self.images is not None

    def crops(self, num_crops: int | None) -> int | None:
        """``num_crops`` checked (the processor's default if None; a text model has none)."""
        return self.images.crops(num_crops) if self.images is not None else num_crops

    def image_tokens(self, image: Image.Image, num_crops: int | None) -> int:
        """Prompt slots of a loaded image, from its size alone (no pixel work)."""
        return self.images.image_tokens(image, num_crops)

    def load_images(self, images: Sequence[ImageInput], first: int = 0) -> list[Image.Image]:
        """Decoded RGB images, numbered from ``first`` in errors; a text model refuses any."""
        if images and not self.vision:
            raise ImageError("this is a text model: it takes no images")
        return [load_image(source, first + i, self.max_pixels) for i, source in enumerate(images)]

    def preprocess(self, images: Sequence[ImageInput], num_crops: int | None = None) -> Any:
        """Images to the tensors of the model's image encoder."""
        if images and not self.vision:
            raise ImageError("this is a text model: it takes no images")
        return self.images.preprocess(images, num_crops, self.max_pixels)

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
        check_context(
            length, self.max_positions, "use fewer or smaller images, or a lower num_crops"
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
        num_crops = self.crops(num_crops)
        loaded = self.load_images(as_list(images))
        ids = self.tokenize(prompt, [self.image_tokens(image, num_crops) for image in loaded])
        inputs = {"input_ids": mx.array([ids], dtype=mx.int32), "pixel_values": None,
                  "image_sizes": None}  # fmt: skip
        if loaded:
            pre = self.preprocess(loaded, num_crops)
            inputs["pixel_values"] = mx.array(pre.pixel_values)
            inputs["image_sizes"] = mx.array(pre.image_sizes, dtype=mx.int32)
        return inputs

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation in the official chat format; image parts become ``<|image_k|>`` tags
        numbered across the whole conversation."""
        tag = numbered_tags("<|{kind}_{k}|>\n")

        def image_tag(kind: str) -> str:
            if kind == "audio":
                raise PromptError("this model reads no audio")
            if not self.vision:
                raise ImageError("this is a text model: it takes no images")
            return tag(kind)

        rendered = [{**m, "content": flatten_parts(m.get("content", ""), image_tag)}
                    for m in messages]  # fmt: skip
        template = getattr(self.tokenizer, "chat_template", None) or CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(
            rendered,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )


def load_tokenizer(path: Path, eos_token_ids: Sequence[int] = ()) -> Any:
    """mlx-lm's tokenizer wrapper around the checkpoint's ``tokenizer.json``, no remote code."""
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    from transformers import PretrainedConfig
    from transformers.utils import logging as hf_logging

    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer.json in {path}")
    eos = list(eos_token_ids) or None
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            return load_mlx_tokenizer(
                path, tokenizer_config_extra={"trust_remote_code": False}, eos_token_ids=eos
            )
        except AttributeError:
            # transformers cannot read this remote-code config.json as a generic config (the
            # Hub's Phi-4-multimodal: its longrope needs the remote code); the tokenizer files
            # suffice
            blank = {"trust_remote_code": False, "config": PretrainedConfig()}
            return load_mlx_tokenizer(path, tokenizer_config_extra=blank, eos_token_ids=eos)
    finally:
        hf_logging.set_verbosity(level)


TURN_END_TOKENS = ("<|end|>", "<|endoftext|>")


def checkpoint_stop_ids(
    path: Path, config_eos: int | Sequence[int] | None, tokenizer: Any = None
) -> set[int]:
    """Ids that end an answer, as the checkpoint says: the eos ids of ``generation_config.json``
    and ``config.json``, and the tokenizer's own eos and turn-end tokens (``<|end|>``,
    ``<|endoftext|>``) where it has them."""
    ids: set[int] = set()
    for value in (config_eos, _generation_eos(path)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[token] for token in TURN_END_TOKENS if token in vocab)
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
    return ids


def _generation_eos(path: Path) -> int | list[int] | None:
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def make_processor(path: Path, config: Any, images: Any = None) -> Processor:
    """The processor of a checkpoint folder with a ``tokenizer.json``: its tokenizer, the stop
    ids it and its configs name, and the architecture's image preparation (None: text only)."""
    tokenizer = load_tokenizer(path)
    stops = checkpoint_stop_ids(path, config.eos_token_id, tokenizer)
    tokenizer.eos_token_ids = stops
    return Processor(
        tokenizer, images=images, stop_ids=stops, max_positions=config.max_position_embeddings
    )
