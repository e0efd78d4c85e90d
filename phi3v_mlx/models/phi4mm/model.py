"""Phi-4-multimodal: the SigLIP image path and the conformer audio path filling their prompt
slots, the Phi-4-mini decoder, and the mixture of LoRAs switched by the modalities of the input
exactly as the reference is driven (none for text, vision for images with or without audio,
speech for audio alone), on every position of the sequence."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ...cache import PromptCache, RopeState
from ..base import DecoderModel
from ..phi3 import LanguageModel as Phi3LanguageModel
from ..phi3 import Span
from . import conformer
from .adapters import ADAPTERS, TARGETS, attach, using
from .config import ModelConfig
from .conformer import AudioEmbedding
from .images import canvas_mask, crop_masks
from .vision import ImageEmbedding

IMAGE_PREFIX = "model.embed_tokens_extend.image_embed."
OWN_PREFIXES = ("language.", "image_embed.", "audio_embed.")
# mlx-vlm's conversion: its names -> the Hub's (the image tower is left out: without the
# separators it drops, no image can be read as the reference does).
MLX_VLM_PREFIXES = ("language_model.", "vision_tower.", "mm_projector.", "audio_encoder.",
                    "audio_projection.")  # fmt: skip
MLX_VLM_NAMES = (
    (re.compile(r"^(?:vision_tower|mm_projector)\..*"), ""),
    (re.compile(r"^language_model\.(model|lm_head)\."), r"\1."),
    (re.compile(r"^audio_projection\.(speech|vision)\.proj_(\d)\."),
     conformer.CHECKPOINT_PREFIX + r"audio_projection.\1.\2."),
    (re.compile(r"^audio_encoder\."), conformer.CHECKPOINT_PREFIX + "encoder."),
    (re.compile(r"\.embed\.conv_0\."), ".embed.conv.0."),
    (re.compile(r"\.embed\.dw_pw_layers\.(\d+)\.(dw|pw)\."),
     lambda m: f".embed.conv.{3 * int(m[1]) + (2 if m[2] == 'dw' else 3)}."),
    (re.compile(r"\.net_(\d)\."), r".net.\1."),
)  # fmt: skip
MERGED_REFUSAL = (
    "this is mlx-vlm's conversion of Phi-4-multimodal: it merged the vision and speech adapters "
    "into the decoder and dropped the image separators (glb_GN, sub_GN), so the reference's "
    "computation cannot run from it; load it anyway with allow_merged_adapters=True "
    "(--allow-merged-adapters), or convert the Hub checkpoint instead"
)
MERGED_NOTE = (
    "note: mlx-vlm's conversion of Phi-4-multimodal: its vision and speech adapters are merged "
    "into the decoder, so text-only and audio prompts run with both merged, unlike the "
    "reference (no adapter for text, the speech adapter for audio); image prompts are refused "
    "(it has no image separators glb_GN, sub_GN)"
)
NO_IMAGES = (
    "this checkpoint has no image separators (glb_GN, sub_GN; mlx-vlm's conversion drops them): "
    "image prompts cannot be computed as the reference does; use the Hub checkpoint for images"
)
# Remote-code names of the image embedding -> native names.
IMAGE_RENAMES = (
    ("glb_GN", "global_img_feature_extensor"),
    ("sub_GN", "sub_img_feature_extensor"),
    ("img_projection.0.", "img_projection_up."),
    ("img_projection.2.", "img_projection_down."),
)
# Tensors the model has no use for: buffers, and the parts of SigLIP whose outputs the reference
# computes but never reads (final norm, pooling head).
UNUSED_TENSORS = re.compile(
    r"\.position_ids$|\.rotary_emb\.inv_freq$|img_processor\.(post_layernorm|head)\."
)
ADAPTED = re.compile(
    r"^(layers\.\d+\.(?:self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj)\.)(base_layer\.)?(.*)$"
)
SIGLIP_LAYER = re.compile(r"^img_processor\.encoder\.layers\.(\d+)\.")
ADAPTER_MATRIX = re.compile(r"\.lora_[AB]\.\w+$")


class LanguageModel(Phi3LanguageModel):
    """The Phi-4-mini decoder; a forward runs the adapter each span's cache records (the rows of
    a batch step each their own; a forward without one, the adapter the caller chose)."""

    def run(self, spans: Sequence[Span]) -> list[mx.array]:
        if len(spans) == 1:
            if spans[0].adapters is None:
                return super().run(spans)
            with using(spans[0].adapters):
                return super().run(spans)
        positions = []  # several spans' positions go through the linears one after another
        for span in spans:
            rows, length = span.h.shape[:2]
            chosen = span.adapters
            chosen = chosen if isinstance(chosen, tuple) else (chosen,) * rows
            positions += [key for key in chosen for _ in range(length)]
        with using(tuple(positions) if any(positions) else None):
            return super().run(spans)

    def _recompute_keys(self, row: int, layers: list[Any], rope: RopeState, long: bool) -> None:
        with using(rope.adapter):
            super()._recompute_keys(row, layers, rope, long)


def to_slots(ids: np.ndarray, token: int, counts: list[int], first: int, what: str) -> None:
    """Replace, in place, the placeholder ids ``token`` of a prompt whose runs are already
    expanded by the slots of items ``first``.. (``-(first + k + 1)`` for the k-th, taking
    ``counts[k]`` positions in order)."""
    positions = np.flatnonzero(ids == token)
    if len(positions) != sum(counts):
        raise ValueError(
            f"the prompt has {len(positions)} {what} placeholder tokens ({token}) but the "
            f"{len(counts)} {what}(s) given fill {sum(counts)}"
        )
    ids[positions] = np.repeat(-(first + 1 + np.arange(len(counts))), counts)


def _given(inputs: Mapping[str, Any], key: str) -> bool:
    return inputs.get(key) is not None


def mlx_vlm_layout(weights: Mapping[str, Any]) -> bool:
    """Whether these are the tensors of mlx-vlm's conversion."""
    return any(name.startswith(MLX_VLM_PREFIXES) for name in weights)


def hub_name(name: str) -> str | None:
    """The Hub's remote-code name of a tensor of mlx-vlm's conversion (None for the image
    tower's)."""
    for pattern, replacement in MLX_VLM_NAMES:
        name = pattern.sub(replacement, name)
    return name or None


def allow_merged_adapters(config: ModelConfig, weights: Mapping[str, Any]) -> str | None:
    """For mlx-vlm's conversion (both adapters merged into the decoder, no image separators):
    ``config`` set to load it as it is (adapter folders beside it ignored: their adapters are
    already merged), and the one-line note on what then differs from the reference; None for
    any other checkpoint."""
    if not mlx_vlm_layout(weights):
        return None
    config.merged_adapters = True
    config.vision_lora = config.speech_lora = None
    config.image_separators = False
    return MERGED_NOTE


class Model(DecoderModel):
    """``model(input_ids=..., pixel_values=..., image_sizes=..., image_attention_mask=...,
    audio_features=..., audio_embed_sizes=..., audio_attention_mask=...)`` returns logits
    [1, T, vocab]; image and audio placeholders (ids 200010 and 200011, runs already expanded)
    or slot ids (``-(k + 1)`` for media item k: images first, then audios) mark the positions
    their embeddings fill."""

    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ("image_embed.", "audio_embed.")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language = LanguageModel(config)
        if config.image_separators:
            self.image_embed = ImageEmbedding(config)
        if config.audio_config is not None:
            self.audio_embed = AudioEmbedding(config.audio_config, config.hidden_size)
        attach(self.language.layers, self.adapter_configs)

    def shard(self, group: mx.distributed.Group) -> None:
        """Refused: the modality adapters beside the decoder's linears are not split across
        ranks, and merging them would change the model's answers."""
        raise ValueError(
            "Phi-4-multimodal cannot be split across ranks: its vision and speech adapters "
            "switch per request and are kept beside the weights"
        )

    @property
    def lora_targets(self) -> list[str]:
        """A fine-tuning adapter goes on the base of each adapted linear: it trains on the plain
        decoder (the modality adapters off) and adds to the modality adapter a request runs."""
        if not self.adapter_configs:
            return [f"{block}.{name}" for block, name in TARGETS]
        return [f"{block}.{name}.base_layer" for block, name in TARGETS]

    def checkpoint_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """The config with the modality adapters' rank and alpha, which the native layout keeps
        in its adapter folders (a written checkpoint keeps the adapters beside the weights)."""
        adapters = {
            f"{name}_lora": {"r": adapter.r, "lora_alpha": adapter.lora_alpha}
            for name, adapter in self.adapter_configs.items()
        }
        return {**values, **adapters}

    @property
    def adapter_configs(self) -> dict[str, Any]:
        """The modality adapters of this checkpoint by name ("vision", "speech")."""
        adapters = ((name, getattr(self.config, f"{name}_lora")) for name in ADAPTERS)
        return {name: adapter for name, adapter in adapters if adapter is not None}

    def adapter_key(self, inputs: Mapping[str, Any]) -> str | None:
        """The adapter a sequence with these media runs, as the reference is driven: vision
        with images (audio or not), speech with audio alone, none for text (and none with the
        adapters merged into the decoder)."""
        if _given(inputs, "pixel_values"):
            self._images()
            key = "vision"
        elif _given(inputs, "audio_features"):
            key = "speech"
        else:
            return None
        if self.config.merged_adapters:
            return None
        if key not in self.adapter_configs:
            raise ValueError(
                f"this checkpoint has no {key} adapter ({key}-lora/ or {key}_lora in "
                f"config.json): its answers to {'images' if key == 'vision' else 'audio'} "
                "would not be the model's"
            )
        return key

    def _images(self) -> ImageEmbedding:
        if "image_embed" not in self:
            raise ValueError(NO_IMAGES)
        return self.image_embed

    def encode(
        self, inputs: Mapping[str, Any], between_batches: Callable[[], None] | None = None
    ) -> list[mx.array]:
        """Per media item, the embeddings that fill its slots: the images, then the audios
        (projected by the vision-speech pair when images are given too)."""
        features: list[mx.array] = []
        images = _given(inputs, "pixel_values")
        if images:
            if not _given(inputs, "image_sizes"):
                raise ValueError("pixel_values given without image_sizes")
            mask = inputs.get("image_attention_mask")
            features += self._images()(
                mx.array(inputs["pixel_values"]),
                np.asarray(inputs["image_sizes"]),
                None if mask is None else np.asarray(mask),
                between_batches,
            )
        if _given(inputs, "audio_features"):
            if "audio_embed" not in self:
                raise ValueError("this checkpoint has no audio encoder: it reads no audio")
            if not _given(inputs, "audio_embed_sizes"):
                raise ValueError("audio_features given without audio_embed_sizes")
            progress = None if between_batches is None else lambda done, total: between_batches()
            features += self.audio_embed(
                mx.array(inputs["audio_features"]),
                inputs["audio_embed_sizes"],
                inputs.get("audio_attention_mask"),
                vision=images,
                progress=progress,
            )
        return features

    def encode_images(
        self,
        pixel_values: Any,
        image_sizes: Any,
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, the embeddings that fill its slots, from the processor's ``preprocess``:
        the crops of all images in one run and, per image, its canvas and placement (height,
        width, used height, used width), which give its patch masks."""
        sizes = np.asarray(image_sizes).reshape(len(image_sizes), -1)
        if sizes.shape[1] != 4:
            raise ValueError(
                "image_sizes must give each image's canvas and placement (height, width, used "
                "height, used width), as the processor's preprocess does"
            )
        vision = self.config.vision_config
        crop, patch = vision.crop_size, vision.patch_size
        grids = [(int(h) // crop, int(w) // crop) for h, w, _, _ in sizes.tolist()]
        masks = np.concatenate(
            [crop_masks(canvas_mask(*map(int, s), patch), crop, patch) for s in sizes]
        )
        embed_crops = self._images().embed_crops
        return embed_crops(mx.array(pixel_values), grids, masks, between_batches)

    def embed(self, input_ids: Any, **inputs: Any) -> mx.array:
        """Input embeddings [1, T, hidden] of a prompt (placeholder or slot ids) and its media."""
        ids = np.array(input_ids, dtype=np.int64).reshape(-1)
        features = self.encode(inputs)
        images = 0
        if _given(inputs, "pixel_values"):
            images = np.asarray(inputs["image_sizes"]).reshape(-1, 2).shape[0]
        image_id = self.config.image_token_id
        audio_id = self.config.audio_config.audio_token_id if "audio_embed" in self else None
        if image_id in ids:
            to_slots(ids, image_id, [len(f) for f in features[:images]], 0, "image")
        if audio_id is not None and audio_id in ids:
            to_slots(ids, audio_id, [len(f) for f in features[images:]], images, "audio")
        return self.merge(mx.array(ids[None]), features)

    def __call__(
        self,
        input_ids: Any = None,
        cache: PromptCache | None = None,
        input_embeddings: mx.array | None = None,
        **inputs: Any,
    ) -> mx.array:
        """Logits [1, T, vocab] of a prompt (ids and media, or its input embeddings), run with
        the adapter its media select (a cache keeps the adapter its sequence started with)."""
        key = self.adapter_key(inputs)
        if cache is not None and key is not None:
            if cache.offset and cache.adapter != key:
                raise ValueError(
                    f"this cache holds a sequence read with adapter {cache.adapter!r}; "
                    f"its media need {key!r}"
                )
            cache.adapter = key
        if input_embeddings is None:
            input_embeddings = self.embed(input_ids, **inputs)
        with using(key):
            return self.language(input_embeddings, cache)

    def internal_name(self, name: str) -> str | None:
        """This model's name of a checkpoint tensor (or, with a trailing dot, a module) of
        either layout, None for a tensor it does not use."""
        if name.startswith(OWN_PREFIXES):
            return name
        if self.config.merged_adapters and name.startswith(MLX_VLM_PREFIXES):
            hub = hub_name(name)
            return None if hub is None else self.internal_name(hub)
        if name.startswith(conformer.CHECKPOINT_PREFIX):
            if "audio_embed" not in self:
                return None
            return "audio_embed." + conformer.audio_weight_name(name)
        if name.startswith(IMAGE_PREFIX):
            rest = name[len(IMAGE_PREFIX) :]
            for old, new in IMAGE_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
            layer = SIGLIP_LAYER.match(rest)
            if layer and int(layer.group(1)) >= self.config.vision_config.layers_used:
                return None
            return "image_embed." + rest
        if name.startswith("model."):
            rest = name[len("model.") :]
            adapted = ADAPTED.match(rest)
            if adapted:
                head, _, tail = adapted.groups()
                if tail.startswith("lora_"):  # an adapter matrix: an array, not a layer
                    if self.config.merged_adapters:
                        return None  # already merged into the decoder
                    rest = head + tail.removesuffix(".weight")
                else:
                    rest = head + ("base_layer." if self.adapter_configs else "") + tail
            return "language." + rest
        if name.startswith("lm_head."):
            return None if self.config.tie_word_embeddings else "language." + name
        return name

    def official_name(self, name: str) -> str:
        """The checkpoint name this package writes for one of its tensors: the native layout,
        adapters inside the decoder as the remote code names them."""
        if name.startswith("image_embed."):
            return IMAGE_PREFIX + name[len("image_embed.") :]
        if name.startswith("audio_embed."):
            return conformer.CHECKPOINT_PREFIX + name[len("audio_embed.") :]
        if name.startswith("language.lm_head."):
            return name[len("language.") :]
        if name.startswith("language."):
            weight = ".weight" if ADAPTER_MATRIX.search(name) else ""
            return "model." + name[len("language.") :] + weight
        return name

    def official_weights(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """A checkpoint's tensors (either layout) in the layout this package writes: native
        names, the adapters inside the decoder as the remote code names them, MLX layouts."""
        return {self.official_name(name): value for name, value in self.sanitize(weights).items()}

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Tensors of a checkpoint (native, remote-code or this package's names, adapters from
        the PEFT folders under remote-code names; mlx-vlm's conversion once its config says so)
        under this model's names and layouts; tensors the model never uses are left out."""
        if mlx_vlm_layout(weights):
            if not self.config.merged_adapters:
                raise ValueError(MERGED_REFUSAL)
            renamed = ((hub_name(name), value) for name, value in weights.items())
            weights = {name: value for name, value in renamed if name is not None}
        out = {}
        if "audio_embed" in self:
            audio = conformer.sanitize(weights)
            out.update({"audio_embed." + name: value for name, value in audio.items()})
        channels = self.config.vision_config.num_channels
        for name, value in weights.items():
            if name.startswith(conformer.CHECKPOINT_PREFIX) or UNUSED_TENSORS.search(name):
                continue
            new = self.internal_name(name)
            if new is None:
                continue
            if new.endswith("patch_embedding.weight") and value.shape[1] == channels:
                value = value.transpose(0, 2, 3, 1)  # PyTorch OIHW -> MLX OHWI
            out[new] = value
        return out
