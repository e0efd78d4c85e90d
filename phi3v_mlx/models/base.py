"""What every architecture shares: the model interface the engine calls (a decoder with a cache,
media features filling prompt slots, official tensor names both ways)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import PromptCache


def media_slots(input_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of media slots (negative ids, ``-(k + 1)`` for item k) in a 1-D id sequence as
    (start, length, item index from 0)."""
    runs = []
    t, n = 0, len(input_ids)
    while t < n:
        if input_ids[t] < 0:
            start, value = t, input_ids[t]
            while t < n and input_ids[t] == value:
                t += 1
            runs.append((start, t - start, int(-value) - 1))
        else:
            t += 1
    return runs


def fill_slots(
    text: mx.array, ids: np.ndarray, features: Sequence[mx.array | None], start: int = 0
) -> mx.array:
    """Embeddings [1, T - start, hidden] of positions ``start``.. of a prompt: ``text`` (the
    token embeddings of those positions) with the slots of item k replaced by ``features[k]``
    (None for an item whose slots all lie before ``start``)."""
    runs = media_slots(ids)
    if features and not runs:
        raise ValueError(f"{len(features)} image(s) given but the prompt has no image slots")
    for begin, length, k in runs:
        if k >= len(features):
            raise ValueError(
                f"the prompt has slots for image {k + 1} but {len(features)} image(s) were given"
            )
        if features[k] is None and begin + length > start:
            raise ValueError(f"image {k + 1} is needed from position {start} on")
        if features[k] is not None and length != len(features[k]):
            raise ValueError(
                f"image {k + 1} fills {len(features[k])} slots but the prompt has a run of {length}"
            )
    runs = [(b - start, n, k) for b, n, k in runs if b + n > start]
    if not runs:
        return text
    used = sorted({k for _, _, k in runs})
    sizes = [len(ids) - start] + [len(features[k]) for k in used]
    rows = dict(zip(used, np.cumsum(sizes)[:-1].tolist(), strict=True))
    index = np.arange(len(ids) - start)
    for begin, length, k in runs:
        slots = np.arange(begin, begin + length)
        keep = slots >= 0
        index[slots[keep]] = rows[k] + np.arange(length)[keep]
    parts = [text[0], *(features[k].astype(text.dtype) for k in used)]
    return mx.concatenate(parts, axis=0)[mx.array(index)][None]


class DecoderModel(nn.Module):
    """The interface shared code uses, for an architecture whose decoder is ``self.language``
    (with ``embed``, ``hidden``, ``logits``, ``make_cache``, ``batch_logits``,
    ``training_hidden`` and ``layers``).

    Subclasses that read media override :meth:`encode`; ``NAME_PREFIXES`` pairs official
    tensor-name prefixes with this package's, ``UNUSED_TENSORS`` matches official tensors the
    model has no use for.
    """

    NAME_PREFIXES: ClassVar[list[tuple[str, str]]] = [("lm_head.", "language.lm_head."),
                                                     ("model.", "language.")]  # fmt: skip
    UNUSED_TENSORS: ClassVar[re.Pattern] = re.compile(r"\.position_ids$|\.rotary_emb\.inv_freq$")
    # The modules (prefixes of our names) of the media encoders and their projectors, which the
    # converter keeps unquantized unless asked.
    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ("vision.",)

    @property
    def layers(self) -> list[nn.Module]:
        return self.language.layers

    @property
    def lora_targets(self) -> list[str]:
        """The modules of a decoder layer a fine-tuning adapter goes on by default."""
        return ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]

    def shard(self, group: mx.distributed.Group) -> None:
        """Split the decoder across the ranks of ``group`` (tensor parallel); media encoders
        stay whole on every rank."""
        if not hasattr(self.language, "shard"):
            raise ValueError(f"{self.config.model_type} models cannot be split across ranks")
        self.language.shard(group)

    def make_cache(self, max_kv_size: int | None = None) -> PromptCache:
        """An empty cache for one sequence."""
        return self.language.make_cache(max_kv_size)

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        """Token embeddings (media slots read row 0 until filled)."""
        return self.language.embed(input_ids)

    def hidden(self, embeddings: mx.array, cache: PromptCache | None = None) -> mx.array:
        """Final-norm hidden states of input embeddings [B, L, hidden]."""
        return self.language.hidden(embeddings, cache)

    def logits(self, h: mx.array) -> mx.array:
        """The LM head over final hidden states."""
        return self.language.logits(h)

    def batch_logits(self, embeddings: mx.array, cache: list[Any]) -> mx.array:
        """Last-position logits of one step of a batch over mlx-lm's batch cache."""
        return self.language.batch_logits(embeddings, cache)

    def mixed(
        self,
        embeddings: mx.array,
        cache: PromptCache,
        batch_embeddings: mx.array,
        batch_cache: list[Any],
    ) -> tuple[mx.array, mx.array]:
        """A piece of one sequence's prompt and a batch step: the piece's hidden states (as
        :meth:`hidden`) and the batch's logits (as :meth:`batch_logits`), in one forward where
        the decoder can read them together (so the step costs no weight read of its own)."""
        if hasattr(self.language, "mixed"):
            return self.language.mixed(embeddings, cache, batch_embeddings, batch_cache)
        return self.hidden(embeddings, cache), self.batch_logits(batch_embeddings, batch_cache)

    def training_hidden(
        self, embeddings: mx.array, lengths: list[int], checkpoint: bool = False
    ) -> mx.array:
        """Final hidden states of a right-padded training batch (rows of ``lengths``)."""
        return self.language.training_hidden(embeddings, lengths, checkpoint)

    def adapter_key(self, inputs: Mapping[str, Any]) -> str | None:
        """The modality adapter a sequence with these media runs (None: the base weights; only
        Phi-4-multimodal switches adapters by modality)."""
        return None

    def encode_images(
        self,
        pixel_values: Any,
        image_sizes: Any,
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, the embeddings that fill its prompt slots; a text model reads none."""
        raise ValueError(f"this is a text model ({self.config.model_type}): it reads no images")

    def merge(
        self, input_ids: Any, features: Sequence[mx.array | None], start: int = 0
    ) -> mx.array:
        """Input embeddings [1, T - start, hidden] of positions ``start``.. of a prompt, the
        slots of media item k filled by ``features[k]``."""
        ids = np.asarray(input_ids).reshape(-1)
        text = self.embed_tokens(mx.array(ids[None, start:]))
        return fill_slots(text, ids, features, start)

    def embed(self, input_ids: Any, **media: Any) -> mx.array:
        """Input embeddings [1, T, hidden] for a prompt and the media tensors of its processor."""
        ids = mx.array(input_ids).reshape(1, -1)
        if all(value is None for value in media.values()):
            return self.merge(ids, [])
        return self.merge(ids, self.encode_images(**media))

    def __call__(
        self,
        input_ids: Any = None,
        cache: PromptCache | None = None,
        input_embeddings: mx.array | None = None,
        **media: Any,
    ) -> mx.array:
        """Logits [1, T, vocab] of a prompt (ids and media, or its input embeddings)."""
        if input_embeddings is None:
            input_embeddings = self.embed(input_ids, **media)
        return self.language(input_embeddings, cache)

    @classmethod
    def _swap_prefix(cls, name: str, side: int) -> str:
        for pair in sorted(cls.NAME_PREFIXES, key=lambda pair: -len(pair[side])):
            if name.startswith(pair[side]):
                return pair[1 - side] + name[len(pair[side]) :]
        return name

    @classmethod
    def internal_name(cls, name: str) -> str:
        """This package's name of a tensor (or, with a trailing dot, a module) given either."""
        return cls._swap_prefix(name, 0)

    @classmethod
    def official_name(cls, name: str) -> str:
        """The official name of a tensor (or, with a trailing dot, a module) given either."""
        return cls._swap_prefix(name, 1)

    def checkpoint_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """The ``config.json`` values a checkpoint written from this model needs (what the
        source kept elsewhere included)."""
        return values

    def official_weights(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """A checkpoint's tensors under their official names, in the layout this package writes
        (what the converter saves)."""
        return {self.official_name(name): value for name, value in weights.items()}

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Tensors of a checkpoint (official or this package's names) under this model's names
        and layouts; tensors the model never uses are left out."""
        return {
            self.internal_name(name): value
            for name, value in self.official_weights(weights).items()
            if not self.UNUSED_TENSORS.search(name)
        }


def module_names(
    quantization: dict[str, Any], rename: Callable[[str], str | None]
) -> dict[str, Any]:
    """A ``quantization`` config block with its per-module entries renamed by ``rename``; the
    entries of modules the model does not use (renamed to None) are left out."""
    out = {}
    for key, value in quantization.items():
        if isinstance(value, (dict, bool)):
            name = rename(f"{key}.")
            if name is None:
                continue
            key = name[:-1]
        out[key] = value
    return out
