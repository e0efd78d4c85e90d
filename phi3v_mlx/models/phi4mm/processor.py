"""Phi-4-multimodal's processor: chat-formatted prompts with ``<|image_k|>`` and ``<|audio_k|>``
tags, images and audio to the model's inputs, as the reference processor lays them out (each tag
becomes a run of slots as long as its item's embeddings); its chat template and stop ids are
the checkpoint's."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from ...processor import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    PromptError,
    as_list,
    check_context,
    checkpoint_stop_ids,
    flatten_parts,
    load_image,
    load_tokenizer,
    numbered_tags,
)
from .audio import SAMPLE_RATE, AudioInput
from .config import ModelConfig
from .features import AudioFeatureExtractor, FeatureConfig, audio_embed_size, num_frames
from .images import ImageInputs, ImageProcessor
from .model import to_slots

TAG = re.compile(r"<\|(image|audio)_(\d+)\|>")
# Phi-4's chat format, for a checkpoint whose tokenizer has no template of its own.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] "
    "+ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Processor:
    """Prompts (text with tags, or ids), images and audio to ``input_ids`` (slots negative:
    ``-(k + 1)`` for media item k, the images first, then the audios) and the tensors of
    :meth:`Model.encode`.

    ``image_processor(images, dynamic_hd=N)`` and ``audio_processor(audios,
    sampling_rate=16000)`` prepare media alone. ``tokenizer`` is None for a checkpoint folder
    without ``tokenizer.json``: such a processor takes prompts as ids only.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: ImageProcessor,
        audio_processor: AudioFeatureExtractor,
        stop_ids: set[int],
        image_token_id: int,
        audio_token_id: int,
        max_positions: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.audio_processor = audio_processor
        self.stop_ids = set(stop_ids)
        self.image_token_id = image_token_id
        self.audio_token_id = audio_token_id
        self.max_positions = max_positions
        self.max_pixels = max_pixels

    vision = True

    def load_images(self, images: Sequence[ImageInput], first: int = 0) -> list[Image.Image]:
        """Decoded RGB images, numbered from ``first`` in errors."""
        return [load_image(source, first + i, self.max_pixels) for i, source in enumerate(images)]

    def crops(self, num_crops: int | None) -> int:
        """The bound on crops per image (``dynamic_hd``) checked, the checkpoint's if None."""
        return self.image_processor.check_dynamic_hd(num_crops)

    def image_tokens(self, image: Image.Image, num_crops: int | None = None) -> int:
        """Prompt slots of a loaded image, from its size alone (no pixel work)."""
        return self.image_processor.image_tokens(image, num_crops)

    def preprocess(self, images: Sequence[ImageInput], num_crops: int | None = None) -> ImageInputs:
        """Images to the inputs of :meth:`Model.encode_images`: the crops of all images in one
        run and each image's canvas and placement."""
        return self.image_processor.preprocess(images, num_crops, self.max_pixels)

    def tokenize(
        self,
        prompt: str | Sequence[int],
        image_tokens: Sequence[int],
        audio_tokens: Sequence[int] = (),
    ) -> list[int]:
        """Prompt ids with slots: a text prompt's k-th image (audio) tag must be
        ``<|image_k|>`` (``<|audio_k|>``) and becomes the k-th item's run of slots; an id prompt
        has its placeholder runs (200010, 200011) already expanded, or slots."""
        images = len(image_tokens)
        if not isinstance(prompt, str):
            ids = np.array([int(t) for t in prompt], dtype=np.int64)
            if ids.size == 0:
                raise PromptError("the prompt is empty")
            if not (ids < 0).any():  # placeholder runs (a prompt in slots is taken as it is)
                to_slots(ids, self.image_token_id, list(image_tokens), 0, "image")
                to_slots(ids, self.audio_token_id, list(audio_tokens), images, "audio")
            self.check_length(len(ids))
            return ids.tolist()
        if self.tokenizer is None:
            raise PromptError("this checkpoint has no tokenizer.json: give the prompt as ids")
        tags = [(kind, int(k)) for kind, k in TAG.findall(prompt)]
        for kind, counts in (("image", image_tokens), ("audio", audio_tokens)):
            numbers = [k for tag, k in tags if tag == kind]
            if numbers != list(range(1, len(counts) + 1)):
                raise PromptError(
                    f"{len(counts)} {kind}(s) given: the prompt must name them once each, in "
                    f"order, as <|{kind}_1|>, <|{kind}_2|>, ...; it names "
                    f"{', '.join(f'<|{kind}_{k}|>' for k in numbers) or 'none'}"
                )
        ids: list[int] = []
        for i, chunk in enumerate(TAG.split(prompt)[::3]):
            if i:
                kind, k = tags[i - 1]
                slot = -k if kind == "image" else -(images + k)
                ids.extend([slot] * (image_tokens if kind == "image" else audio_tokens)[k - 1])
            ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False))
        self.check_length(len(ids))
        return ids

    def check_length(self, length: int) -> None:
        """Refuse a prompt of ``length`` positions that does not fit the model's context."""
        check_context(
            length, self.max_positions, "use fewer or smaller media, or a lower dynamic_hd"
        )

    def __call__(
        self,
        prompt: str | Sequence[int],
        images: Sequence[ImageInput] | ImageInput | None = None,
        audios: Sequence[AudioInput] | AudioInput | None = None,
        dynamic_hd: int | None = None,
        sampling_rate: int = SAMPLE_RATE,
        num_crops: int | None = None,
    ) -> dict[str, mx.array | None]:
        """Model inputs for a prompt (chat-formatted text, or ids) and the media it names.

        ``dynamic_hd`` bounds the crops per image (the checkpoint's setting if None;
        ``num_crops``, the Phi-3-Vision name of the same bound, is taken too);
        ``sampling_rate`` is the rate of audio given as bare sample arrays (16 kHz unless given,
        as the reference extractor reads them; files and (samples, rate) pairs carry their own).
        The prompt's length is checked before any pixel or audio feature work.
        """
        if num_crops is not None and dynamic_hd is not None and num_crops != dynamic_hd:
            raise ValueError("num_crops and dynamic_hd name the same bound: give one")
        dynamic_hd = num_crops if dynamic_hd is None else dynamic_hd
        loaded = self.load_images(as_list(images))
        dynamic_hd = self.image_processor.check_dynamic_hd(dynamic_hd)
        waves = [] if audios is None else self.audio_processor.load(audios, sampling_rate)
        config = self.audio_processor.config
        ids = self.tokenize(
            prompt,
            [self.image_processor.image_tokens(image, dynamic_hd) for image in loaded],
            [audio_embed_size(num_frames(len(w), config), config) for w in waves],
        )
        out: dict[str, mx.array | None] = {"input_ids": mx.array([ids], dtype=mx.int32)}
        pixels = self.image_processor(loaded, dynamic_hd) if loaded else {}
        for key in ("pixel_values", "image_sizes", "image_attention_mask", "num_img_tokens"):
            out[key] = mx.array(pixels[key]) if key in pixels else None
        sound = self.audio_processor.extract(waves) if waves else {}
        for key in ("audio_features", "audio_embed_sizes", "audio_attention_mask"):
            value = sound.get(key)
            out[key] = None if value is None else mx.array(value)
        return out

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation in the checkpoint's chat format; image and audio parts become
        ``<|image_k|>`` and ``<|audio_k|>`` tags numbered across the whole conversation."""
        if self.tokenizer is None:
            raise PromptError("this checkpoint has no tokenizer.json: give the prompt as ids")
        tag = numbered_tags("<|{kind}_{k}|>")
        rendered = [{**m, "content": flatten_parts(m.get("content", ""), tag)} for m in messages]
        template = getattr(self.tokenizer, "chat_template", None) or CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(
            rendered,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )


def load_processor(path: Path, config: ModelConfig) -> Processor:
    """The processor of a Phi-4-multimodal checkpoint folder (a folder without
    ``tokenizer.json`` gives a processor for id prompts)."""
    path = Path(path)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    stops = checkpoint_stop_ids(path, config.eos_token_id, tokenizer)
    if tokenizer is not None:
        tokenizer.eos_token_ids = stops
    file = path / "preprocessor_config.json"
    settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    audio_token = config.audio_config.audio_token_id if config.audio_config else 200011
    return Processor(
        tokenizer,
        ImageProcessor.from_folder(path),
        AudioFeatureExtractor(FeatureConfig.from_dict(settings)),
        stops,
        image_token_id=config.image_token_id,
        audio_token_id=audio_token,
        max_positions=config.max_position_embeddings,
    )
