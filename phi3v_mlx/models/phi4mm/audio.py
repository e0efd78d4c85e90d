"""Audio inputs (files, encoded bytes, sample arrays) to mono float32 waveforms at 16 kHz."""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
MIN_SAMPLES = 400  # one 25 ms analysis window at 16 kHz
DEFAULT_MAX_SECONDS = 1800.0  # half an hour: 22,500 audio tokens
CONVERT_HINT = "convert it first, e.g. `ffmpeg -i INPUT -ac 1 -ar 16000 OUTPUT.wav`"

AudioInput = str | Path | bytes | bytearray | np.ndarray | tuple[Any, int]


class AudioError(ValueError):
    """An audio input that cannot be used."""


def _describe(source: Any, index: int) -> str:
    if isinstance(source, (str, Path)):
        return f"audio {index + 1} ({source})"
    if isinstance(source, tuple):
        return f"audio {index + 1} ({type(source[0]).__name__} at {source[1]} Hz)"
    return f"audio {index + 1} ({type(source).__name__})"


def _soundfile(name: str):
    try:
        import soundfile
    except ImportError:
        raise AudioError(
            f"{name}: reading audio files needs the 'audio' extra: pip install 'phi3v-mlx[audio]'"
        ) from None
    return soundfile


def readable_formats() -> str:
    """The common audio formats this installation's libsndfile decodes, for messages."""
    try:
        import soundfile
    except ImportError:
        return "none (the 'audio' extra is not installed)"
    known = soundfile.available_formats()
    common = ["WAV", "FLAC", "OGG", "MP3", "AIFF"]
    return ", ".join(f for f in common if f in known)


def load_audio(
    source: AudioInput,
    sampling_rate: int | None = None,
    index: int = 0,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """A mono float32 waveform at 16 kHz from a file path, encoded file bytes, a sample array at
    ``sampling_rate`` ([samples] or [samples, channels]) or an ``(array, rate)`` pair.

    Channels are averaged; other rates are resampled with a polyphase filter
    (``scipy.signal.resample_poly``). Raises AudioError (one line) for a missing, empty, corrupt or
    unreadable file, a clip shorter than one 25 ms window, or one longer than ``max_seconds``.
    """
    name = _describe(source, index)
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError(f"{name}: a tuple must be (samples, sampling_rate)")
        samples, rate = source
        waveform, rate = _from_array(samples, rate, name), int(rate)
    elif isinstance(source, (str, Path, bytes, bytearray)):
        waveform, rate = _read(source, name, max_seconds)
    elif isinstance(source, (np.ndarray, list)) or hasattr(source, "__array__"):
        waveform = _from_array(source, sampling_rate, name)
        rate = int(sampling_rate) if sampling_rate is not None else SAMPLE_RATE
    else:
        raise AudioError(
            f"{name}: unsupported audio type {type(source).__name__} "
            "(give a file path, file bytes or a sample array with its rate)"
        )
    if rate <= 0:
        raise AudioError(f"{name}: the sampling rate must be positive, not {rate}")
    _check_length(waveform.shape[0], rate, name, max_seconds)
    if not np.all(np.isfinite(waveform)):
        raise AudioError(f"{name} holds NaN or infinite samples")
    return resample(waveform, rate)


def _from_array(samples: Any, rate: int | None, name: str) -> np.ndarray:
    if rate is None:
        raise AudioError(f"{name}: a sample array needs its sampling rate")
    array = np.asarray(samples)
    if array.dtype == np.int16:
        array = array.astype(np.float32) / np.float32(32768)
    elif array.dtype == np.int32:
        array = (array.astype(np.float64) / 2**31).astype(np.float32)
    elif array.dtype.kind != "f":
        raise AudioError(f"{name}: samples must be float or int16/int32 PCM, not {array.dtype}")
    if array.ndim == 2:
        array = to_mono(array)
    elif array.ndim != 1:
        raise AudioError(
            f"{name}: samples must be [samples] or [samples, channels], not {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """The average of the channels of a [samples, channels] (or [channels, samples]) array; the
    channel axis is the shorter one."""
    axis = 1 if samples.shape[1] <= samples.shape[0] else 0
    return samples.astype(np.float32).mean(axis=axis, dtype=np.float64).astype(np.float32)


def _read(
    source: str | Path | bytes | bytearray, name: str, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            raise AudioError(f"{name} is a folder, not an audio file")
        if not path.is_file():
            raise AudioError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name} is an empty file")
        data: Any = path
    else:
        if len(source) == 0:
            raise AudioError(f"{name} is empty")
        data = io.BytesIO(bytes(source))
    soundfile = _soundfile(name)
    try:
        with soundfile.SoundFile(data) as handle:
            rate, frames = handle.samplerate, handle.frames
            if frames > 0:  # streams of unknown length report 0 and are checked once decoded
                _check_length(frames, rate, name, max_seconds)
            samples = handle.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        reason = str(e).split(": ", 1)[-1].strip() or type(e).__name__
        raise AudioError(
            f"{name} cannot be read ({reason}): the formats read are {readable_formats()}; "
            f"{CONVERT_HINT}"
        ) from None
    return to_mono(samples) if samples.shape[1] > 1 else samples[:, 0], rate


def _check_length(samples: int, rate: int, name: str, max_seconds: float | None) -> None:
    seconds = samples / rate
    if samples * SAMPLE_RATE < MIN_SAMPLES * rate:
        raise AudioError(
            f"{name} is {seconds * 1000:.1f} ms long: shorter than one 25 ms analysis window"
        )
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            f"{name} is {seconds:.1f} s long, over the limit of {max_seconds:g} s; split it first"
        )


def resample(waveform: np.ndarray, rate: int) -> np.ndarray:
    """A float32 waveform at ``rate`` Hz brought to 16 kHz by polyphase filtering (computed in
    float64); at 16 kHz it is returned as it is."""
    if rate == SAMPLE_RATE:
        return waveform
    try:
        from scipy.signal import resample_poly
    except ImportError:
        raise AudioError(
            f"audio at {rate} Hz needs resampling to {SAMPLE_RATE} Hz, which needs the 'audio' "
            "extra: pip install 'phi3v-mlx[audio]'"
        ) from None
    common = gcd(SAMPLE_RATE, rate)
    up, down = SAMPLE_RATE // common, rate // common
    return resample_poly(waveform.astype(np.float64), up, down).astype(np.float32)
