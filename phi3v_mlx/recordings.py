"""Recordings as prompt media, for a model that reads audio: loaded and checked once, keyed by
their samples, and encoded as ``generate()`` encodes them (every clip of a prompt in one run,
with the projection the prompt's images select), the features kept for reuse."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .models.base import DecoderModel

# (the digests of every clip of the prompt, in order; whether it has images): a clip's features
# depend on the clips padded with it and on the projection, so they are kept under this.
Signature = tuple[tuple[str, ...], bool]


def audio_processor(processor: Any) -> Any:
    """The processor's audio feature extractor; a model without one refuses audio."""
    extractor = getattr(processor, "audio_processor", None)
    if extractor is None:
        raise ValueError("this model reads no audio")
    return extractor


def as_list(audios: Any) -> list[Any]:
    """One recording or several as a list (an ``(samples, rate)`` pair is one recording)."""
    if audios is None:
        return []
    pair = isinstance(audios, tuple) and len(audios) == 2 and isinstance(audios[1], int)
    if pair or isinstance(audios, (str, Path, bytes, bytearray, np.ndarray)):
        return [audios]
    return list(audios)


def load_waves(processor: Any, audios: Any, first: int = 0) -> list[np.ndarray]:
    """Recordings as 16 kHz mono waveforms, numbered from ``first`` in errors (one line each)."""
    from .models.phi4mm.audio import SAMPLE_RATE, load_audio

    extractor = audio_processor(processor)
    return [  # bare sample arrays are read at 16 kHz, as generate() reads them
        load_audio(source, SAMPLE_RATE, first + i, extractor.max_seconds)
        for i, source in enumerate(as_list(audios))
    ]


def audio_digest(wave: np.ndarray) -> str:
    """A digest of a 16 kHz waveform's samples."""
    return hashlib.sha256(np.ascontiguousarray(wave, dtype=np.float32).tobytes()).hexdigest()


def audio_tokens(processor: Any, waves: Sequence[np.ndarray]) -> list[int]:
    """Prompt slots of each waveform (the encoder's output length), from its length alone."""
    from .models.phi4mm.features import audio_embed_size, num_frames

    config = audio_processor(processor).config
    return [audio_embed_size(num_frames(len(w), config), config) for w in waves]


def media_adapter(model: DecoderModel, images: bool, audios: bool) -> str | None:
    """The adapter a sequence with these media runs (``model.adapter_key``: None for a model
    without modality adapters)."""
    return model.adapter_key({"pixel_values": True if images else None,
                              "audio_features": True if audios else None})  # fmt: skip


def encode_waves(
    model: DecoderModel,
    processor: Any,
    waves: Sequence[np.ndarray],
    vision: bool,
    progress: Any = None,
) -> list[mx.array]:
    """Per clip, the embeddings that fill its slots: the clips framed and encoded together
    (as one prompt's clips are), projected as with images when ``vision``."""
    embed = getattr(model, "audio_embed", None)
    if embed is None:
        raise ValueError("this model reads no audio")
    sound = audio_processor(processor).extract(list(waves))
    return embed(
        mx.array(sound["audio_features"]),
        sound["audio_embed_sizes"],
        sound["audio_attention_mask"],
        vision=vision,
        progress=progress,
    )


@dataclass
class RowAudio:
    """The recordings of one prompt: waveforms, digests, slot counts, and whether the prompt
    has images too (which selects the projection)."""

    processor: Any
    waves: list[np.ndarray]
    digests: list[str]
    tokens: list[int]
    vision: bool

    @classmethod
    def load(cls, processor: Any, audios: Any, vision: bool) -> RowAudio:
        waves = load_waves(processor, audios)
        return cls(processor, waves, [audio_digest(w) for w in waves],
                   audio_tokens(processor, waves), vision)  # fmt: skip

    def keys(self) -> list[Any]:
        """Per clip, its key among stored features (and prompt positions)."""
        signature = (tuple(self.digests), self.vision)
        return [("audio", signature, k) for k in range(len(self.waves))]

    def features(self, model: DecoderModel, store: Any = None) -> list[mx.array]:
        """Per clip, its features: from ``store`` (a feature store) if it holds them all, else
        encoded together and put there."""
        keys = self.keys()
        known = [store.get(key) for key in keys] if store is not None else [None]
        if all(f is not None for f in known):
            return known
        features = encode_waves(model, self.processor, self.waves, self.vision)
        if store is not None:
            for key, value in zip(keys, features, strict=True):
                store.put(key, value)
        return features


class Recordings:
    """The recordings of a conversation: each clip's waveform by digest, and the features of
    the conversation's clips under its last signature, so that a follow-up question reads and
    encodes nothing again."""

    def __init__(self, model: DecoderModel, processor: Any):
        self.model = model
        self.processor = processor
        self.reset()

    def reset(self) -> None:
        self.digests: list[str] = []  # the conversation's clips, in order
        self._waves: dict[str, np.ndarray] = {}
        self._features: tuple[Signature | None, list[mx.array]] = (None, [])
        self.built: Signature | None = None  # what the cached positions were computed with

    def load(self, audios: Any) -> list[tuple[str, np.ndarray]]:
        """A turn's recordings (digest, waveform), numbered after the conversation's."""
        waves = load_waves(self.processor, audios, first=len(self.digests))
        return [(audio_digest(w), w) for w in waves]

    def tokens(self, digests: Sequence[str], new: Sequence[tuple[str, np.ndarray]]) -> list[int]:
        """Prompt slots of every clip named by ``digests``."""
        waves = {**self._waves, **dict(new)}
        return audio_tokens(self.processor, [waves[d] for d in digests])

    def features(
        self,
        digests: Sequence[str],
        new: Sequence[tuple[str, np.ndarray]],
        vision: bool,
        progress: Any = None,
    ) -> list[mx.array]:
        """Features of every clip named by ``digests``, encoded together once per signature
        (``progress(done, total)`` hears of the encoder's steps)."""
        signature = (tuple(digests), vision)
        if self._features[0] != signature:
            waves = {**self._waves, **dict(new)}
            features = encode_waves(self.model, self.processor, [waves[d] for d in digests],
                                    vision, progress) if digests else []  # fmt: skip
            self._features = (signature, features)
        return self._features[1]

    def keep(self, digests: Sequence[str], new: Sequence[tuple[str, np.ndarray]]) -> None:
        """The conversation now has the clips ``digests`` (a turn was kept)."""
        self._waves.update(dict(new))
        self.digests = list(digests)
