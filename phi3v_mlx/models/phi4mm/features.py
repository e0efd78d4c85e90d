"""Log-mel features of Phi-4-multimodal's speech input, exactly as the reference feature extractor
(``Phi4MultimodalFeatureExtractor``) computes them, batch padding included."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .audio import DEFAULT_MAX_SECONDS, SAMPLE_RATE, AudioError, AudioInput, load_audio

FRAMES_PER_BLOCK = 4096  # frames transformed at once: bounds the float64 FFT buffers


@dataclass(frozen=True)
class FeatureConfig:
    """The reference extractor's settings (its argument names and defaults)."""

    feature_size: int = 80
    sampling_rate: int = SAMPLE_RATE
    hop_length: int = 160
    n_fft: int = 512
    win_length: int = 400
    preemphasis: float = 0.97
    audio_compression_rate: int = 8
    audio_downsample_rate: int = 1
    audio_feat_stride: int = 1
    mel_min_frequency: float = 0.0
    mel_max_frequency: float = 7690.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FeatureConfig:
        """The settings found in a processor config; the others keep their defaults."""
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in names})
        if config.sampling_rate != SAMPLE_RATE:
            raise AudioError(f"the audio feature rate must be {SAMPLE_RATE} Hz")
        return config


def kaldi_mel(frequency: np.ndarray | float) -> np.ndarray | float:
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + np.asarray(frequency, dtype=np.float64) / 700.0)


def mel_filter_bank(config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """The [n_fft // 2 + 1, feature_size] float64 bank of triangular filters, triangular in Kaldi
    mel, unnormalized."""
    bins = config.n_fft // 2 + 1
    low, high = kaldi_mel(config.mel_min_frequency), kaldi_mel(config.mel_max_frequency)
    centres = np.linspace(low, high, config.feature_size + 2)
    mel = kaldi_mel(np.linspace(0, config.sampling_rate // 2, bins))
    rising = (mel[:, None] - centres[None, :-2]) / np.diff(centres)[None, :-1]
    falling = (centres[None, 2:] - mel[:, None]) / np.diff(centres)[None, 1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def num_frames(samples: int, config: FeatureConfig = FeatureConfig()) -> int:
    """Analysis frames of a clip: whole windows at each hop, no padding."""
    return (samples - config.win_length) // config.hop_length + 1


def audio_embed_size(frames: int, config: FeatureConfig = FeatureConfig()) -> int:
    """Audio tokens of a clip with ``frames`` analysis frames (the encoder's output length)."""
    tokens = math.ceil(frames * config.audio_feat_stride / config.audio_compression_rate)
    return math.ceil(tokens / config.audio_downsample_rate)


class AudioFeatureExtractor:
    """Clips to the model's audio inputs: log-mel features, token counts and the batch mask.

    Call it as ``extractor(audios, sampling_rate=16000)``; see ``__call__``.
    """

    def __init__(
        self,
        config: FeatureConfig = FeatureConfig(),
        max_seconds: float | None = DEFAULT_MAX_SECONDS,
    ):
        self.config = config
        self.max_seconds = max_seconds
        self.mel_filters = mel_filter_bank(config).astype(np.float32)
        n = np.arange(config.win_length)
        self.window = 0.54 - 0.46 * np.cos(2 * np.pi * n / (config.win_length - 1))

    def load(self, audios: Sequence[AudioInput], sampling_rate: int | None = None) -> list:
        """Each input as a mono float32 waveform at 16 kHz (errors numbered from 1)."""
        pair = isinstance(audios, tuple) and len(audios) == 2 and isinstance(audios[1], int)
        if pair or isinstance(audios, (str, Path, bytes, bytearray, np.ndarray)):
            audios = [audios]
        return [load_audio(a, sampling_rate, i, self.max_seconds) for i, a in enumerate(audios)]

    def __call__(
        self,
        audios: Sequence[AudioInput] | AudioInput,
        sampling_rate: int | None = SAMPLE_RATE,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, np.ndarray | None]:
        """Features of one or several clips processed as one batch.

        ``audios``: file paths, file bytes, sample arrays at ``sampling_rate`` or (array, rate)
        pairs. Returns ``audio_features`` float32 [n, frames, 80] (clips right-padded with zeros
        to the longest and framed together, as the reference does), ``audio_embed_sizes`` int64
        [n] (audio tokens per clip) and ``audio_attention_mask`` bool [n, frames] (valid frames;
        None for a single clip). ``progress(done, total)`` is called as frames are computed.
        """
        waveforms = self.load(audios, sampling_rate)
        if not waveforms:
            raise AudioError("no audio given")
        return self.extract(waveforms, progress)

    def extract(
        self,
        waveforms: Sequence[np.ndarray],
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, np.ndarray | None]:
        """The outputs of ``__call__`` for 16 kHz mono float32 waveforms."""
        c = self.config
        lengths = [w.shape[0] for w in waveforms]
        longest = max(lengths)
        if min(lengths) < c.win_length:
            raise AudioError(f"a clip shorter than one {c.win_length}-sample window was given")
        frames = num_frames(longest, c)
        valid = np.array([num_frames(n, c) for n in lengths], dtype=np.int64)
        features = np.zeros((len(waveforms), frames, c.feature_size), dtype=np.float32)
        total = sum(min(frames, -(-n // c.hop_length)) for n in lengths)
        done = 0
        for i, wave in enumerate(waveforms):
            # frames reaching into the clip; later frames see only padding (features 0)
            reach = min(frames, -(-lengths[i] // c.hop_length))
            # the reference zeroes frames [valid, n // hop - 1) of a clip shorter than the longest
            zero_from, zero_to = valid[i], lengths[i] // c.hop_length - 1
            if lengths[i] == longest:
                zero_to = zero_from
            for start in range(0, reach, FRAMES_PER_BLOCK):
                stop = min(reach, start + FRAMES_PER_BLOCK)
                block = self._frames(wave, start, stop)
                block[max(zero_from, start) - start : max(zero_to, start) - start] = 0.0
                features[i, start:stop] = self._log_mel(block)
                done += stop - start
                if progress is not None:
                    progress(done, total)
        sizes = np.array([audio_embed_size(int(f), c) for f in valid], dtype=np.int64)
        mask = np.arange(frames)[None, :] < valid[:, None] if len(waveforms) > 1 else None
        return {
            "audio_features": features,
            "audio_embed_sizes": sizes,
            "audio_attention_mask": mask,
        }

    def _frames(self, wave: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Frames ``start..stop-1`` of a clip zero-padded on the right as far as they need."""
        c = self.config
        first, last = start * c.hop_length, (stop - 1) * c.hop_length + c.win_length
        piece = wave[first:last]
        if piece.shape[0] < last - first:
            piece = np.pad(piece, (0, last - first - piece.shape[0]))
        strides = (piece.strides[0] * c.hop_length, piece.strides[0])
        view = np.lib.stride_tricks.as_strided(piece, (stop - start, c.win_length), strides)
        return np.array(view, dtype=np.float32)

    def _log_mel(self, frames: np.ndarray) -> np.ndarray:
        """ln(max(mel power, 1)) of frames: pre-emphasis within each frame, scaling to 16-bit
        range, Hamming window, power spectrum, mel filters."""
        c = self.config
        previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        emphasized = (frames - np.float32(c.preemphasis) * previous) * np.float32(32768)
        spectrum = np.fft.rfft(self.window * emphasized, n=c.n_fft, axis=1).astype(np.complex64)
        power = np.abs(spectrum) ** 2
        return np.log(np.maximum(power @ self.mel_filters, np.float32(1.0)))
