"""Phi-4-reasoning-vision's processor: its chat template with the three reasoning modes, prompts
with ``<image>`` tags (or ids with -200 placeholders) to ids whose image slots are expanded, and
the NaFlex image preparation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
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
)
from .config import ModelConfig
from .images import ImageInputs, ImageProcessor
from .model import expand_placeholders
from .reasoning import THINK_CLOSE, ReasoningStream

IMAGE_TAG = "<image>"
THINK = "<think>"
NO_THINK = "<|dummy_84|>"
# What each reasoning mode appends to the generation prompt (the reference notebook's rule).
THINKING_SUFFIX = {"on": THINK, "off": NO_THINK, "auto": ""}


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' marker of assistant text),
    rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def render_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool):
    """A chat template rendered as transformers renders it (trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation]
    )
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


def image_tag(kind: str) -> str:
    """An image part's place in the prompt (this model reads no audio)."""
    if kind != "image":
        raise PromptError("this model reads no audio")
    return IMAGE_TAG + "\n"


class Processor:
    """Prompts and images to ``input_ids`` (image k's slots as ``-(k + 1)``, one per patch) and
    the tensors of the vision tower (``image_processor``'s output).

    ``tokenizer`` is None for a checkpoint without tokenizer files: such a model takes prompts
    as ids only.
    """

    # The reasoning modes (each one's addition to the generation prompt), and the markers an
    # answer's text keeps so that its reasoning can be told apart (``reasoning_stream``).
    thinking_modes = THINKING_SUFFIX
    visible_special_tokens = (THINK, THINK_CLOSE, NO_THINK)

    def __init__(
        self,
        tokenizer: Any,
        image_processor: ImageProcessor,
        chat_template: str,
        stop_ids: set[int],
        max_positions: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.stop_ids = set(stop_ids)
        self.max_positions = max_positions

    @property
    def vision(self) -> bool:
        """Whether the model reads images (it does)."""
        return True

    def crops(self, num_crops: int | None) -> None:
        """Images are sized by patch count here: ``num_crops`` must be None."""
        if num_crops is not None:
            raise ValueError("num_crops does not apply to Phi-4-reasoning-vision")

    def load_images(self, images: Sequence[ImageInput], first: int = 0) -> list[Image.Image]:
        """Decoded RGB images, numbered from ``first`` in errors."""
        limit = self.image_processor.max_pixels
        return [load_image(source, first + i, limit) for i, source in enumerate(images)]

    def image_tokens(self, image: Image.Image, num_crops: int | None = None) -> int:
        """Prompt slots of a loaded image (its patch count), from its size alone."""
        self.crops(num_crops)
        return self.image_processor.image_tokens(image)

    def preprocess(self, images: Sequence[ImageInput], num_crops: int | None = None) -> ImageInputs:
        """The vision tower's inputs for ``images`` (``Model.encode_images`` takes their
        ``pixel_values`` and ``image_sizes``)."""
        self.crops(num_crops)
        return self.image_processor.preprocess(list(images))

    def check_length(self, length: int) -> None:
        """Refuse a prompt of ``length`` positions that does not fit the model's context."""
        check_context(length, self.max_positions, "use fewer or smaller images")

    def tokenize(self, prompt: str | Sequence[int], num_tokens: Sequence[int]) -> list[int]:
        """Prompt ids with image k's slots as ``num_tokens[k]`` ids ``-(k + 1)``.

        A text prompt is tokenized chunk by chunk between its ``<image>`` tags (a BOS only at
        the start, as the reference does); an id prompt has its -200 placeholders (the
        reference's layout) expanded, or holds the slots already. A prompt longer than the
        model's context is refused.
        """
        if not isinstance(prompt, str):
            ids = expand_placeholders(np.array([int(t) for t in prompt], np.int64), num_tokens)
            if not len(ids):
                raise PromptError("the prompt is empty")
            self.check_length(len(ids))
            return ids.tolist()
        if self.tokenizer is None:
            raise PromptError("this checkpoint has no tokenizer files: give the prompt as ids")
        chunks = prompt.split(IMAGE_TAG)
        if len(chunks) - 1 != len(num_tokens):
            raise PromptError(
                f"the prompt has {len(chunks) - 1} {IMAGE_TAG} tag(s) "
                f"but {len(num_tokens)} image(s) were given"
            )
        pieces = [list(self.tokenizer.encode(chunk)) for chunk in chunks]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and pieces[0][:1] == [bos]:
            pieces[1:] = [p[1:] if p[:1] == [bos] else p for p in pieces[1:]]
        ids = pieces[0]
        for k, piece in enumerate(pieces[1:]):
            ids += [-(k + 1)] * num_tokens[k] + piece
        self.check_length(len(ids))
        return ids

    def __call__(
        self,
        prompt: str | Sequence[int],
        images: Sequence[ImageInput] | ImageInput | None = None,
        num_crops: int | None = None,
    ) -> dict[str, mx.array]:
        """Model inputs for a prompt (chat-formatted text whose ``<image>`` tags place the
        images, in order; or ids with one -200 per image) and its images: ``input_ids`` with
        the slots expanded, the reference processor's tensors, and ``image_sizes`` (the patch
        grids again, as shared code passes them to ``Model.encode_images``). The prompt's
        length is checked before any pixel work."""
        self.crops(num_crops)
        loaded = self.load_images(as_list(images))
        ids = self.tokenize(prompt, [self.image_processor.image_tokens(im) for im in loaded])
        inputs = {"input_ids": mx.array([ids], dtype=mx.int32)}
        if loaded:
            inputs.update(self.image_processor.preprocess(loaded).tensors())
            inputs["image_sizes"] = inputs["spatial_shapes"]
        return inputs

    def reasoning_stream(self, thinking: str) -> ReasoningStream:
        """The splitter of an answer generated in reasoning mode ``thinking`` into reasoning and
        answer text."""
        return ReasoningStream(thinking=thinking == "on")

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        thinking: str = "auto",
    ) -> str:
        """The conversation in the model's chat format, its fixed system prompt first.

        ``thinking`` picks the reasoning mode of the answer to come: "on" (the prompt ends with
        ``<think>``: the model reasons, then answers), "off" (``<|dummy_84|>``: it answers
        directly) or "auto" (nothing added: the model chooses). The template has no system
        role: a system message's text goes before the next user message's, a blank line
        between. Image parts become ``<image>\\n`` tags.
        """
        if thinking not in THINKING_SUFFIX:
            raise ValueError(f"thinking must be one of on, off, auto; got {thinking!r}")
        rendered: list[dict[str, str]] = []
        system: list[str] = []
        for message in messages:
            role, text = message.get("role"), flatten_parts(message.get("content", ""), image_tag)
            if role == "system":
                system.append(text)
                continue
            if role not in ("user", "assistant"):
                raise PromptError(f"unknown message role {role!r}")
            if role == "user" and system:
                text = "\n\n".join([*system, text])
                system = []
            rendered.append({"role": role, "content": text})
        if system:
            rendered.append({"role": "user", "content": "\n\n".join(system)})
        prompt = render_template(self.chat_template, rendered, add_generation_prompt)
        return prompt + THINKING_SUFFIX[thinking] if add_generation_prompt else prompt


def load_processor(path: Path, config: ModelConfig) -> Processor:
    """The processor of a Phi-4-reasoning-vision checkpoint folder: its tokenizer (when it has
    ``tokenizer.json``), chat template, stop ids and the reference's NaFlex settings."""
    path = Path(path)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    elif tokenizer is not None and getattr(tokenizer, "chat_template", None):
        template = tokenizer.chat_template
    else:
        raise ValueError(f"no chat_template.jinja in {path}")
    stops = checkpoint_stop_ids(path, config.eos_token_id, tokenizer)
    if tokenizer is not None:
        tokenizer.eos_token_ids = stops
    images = ImageProcessor(
        patch_size=config.vision_config.patch_size,
        min_num_patches=config.min_num_patches,
        max_num_patches=config.max_num_patches,
        max_pixels=DEFAULT_MAX_PIXELS,
    )
    return Processor(tokenizer, images, template, stops, config.max_position_embeddings)
