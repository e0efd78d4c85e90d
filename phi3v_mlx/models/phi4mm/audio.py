"""Audio inputs (files, encoded bytes, sample arrays) to mono float32 waveforms at 16 kHz."""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
MIN_SAMPLES = 400  # one 25 ms analysis window at 16 kHz
DEFAULT_MAX_SECONDS = 1800.0  # half an hour: 22,500 audio tokens
CONVERT_HINT = "convert others with e.g. ffmpeg -i in.m4a out.wav"
# What libmpg123 (libsndfile's MP3 decoder) prints on stderr about a damaged stream.
DECODER_NOISE = re.compile(rb"^(?:Note|Warning|Error): |^\[[^\]]*libmpg123[^\]]*\]")
_stderr_lock = threading.Lock()

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


@contextmanager
def decoder_noise_dropped() -> Iterator[None]:
    """Inside the block, what the C decoders print on file descriptor 2 about damaged data
    (libmpg123's notes) is dropped; whatever else is written there meanwhile (other threads'
    logs) follows once the block ends. fd 2 is the process's: one block runs at a time."""
    with _stderr_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no stderr to protect
            yield
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError, AttributeError):
                    pass
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                kept = [line for line in sink.read().splitlines(keepends=True)
                        if not DECODER_NOISE.match(line)]  # fmt: skip
                if kept:
                    os.write(2, b"".join(kept))


def _decode_failure(error: Exception) -> str:
    """What libsndfile says of data it cannot decode, for a message."""
    reason = str(getattr(error, "error_string", "") or error).strip().rstrip(".")
    if reason.startswith("File does not exist"):  # said of undecodable MP3 data
        return "corrupt or unsupported data"
    return (reason[:1].lower() + reason[1:]) or type(error).__name__


def _read(
    source: str | Path | bytes | bytearray, name: str, max_seconds: float | None
) -> tuple[np.ndarray, int]:
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            raise AudioError(f"{name} is a folder, not an audio file")
        if not path.is_file():
            raise AudioError(f"no such audio file: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"{name} is an empty file")
        data: Any = path
        what = f"audio file {path}"
    else:
        if len(source) == 0:
            raise AudioError(f"{name} is empty")
        data = io.BytesIO(bytes(source))
        what = name
    soundfile = _soundfile(name)
    try:
        with decoder_noise_dropped(), soundfile.SoundFile(data) as handle:
            rate, frames = handle.samplerate, handle.frames
            if frames > 0:  # streams of unknown length report 0 and are checked once decoded
                _check_length(frames, rate, name, max_seconds)
            samples = handle.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(
            f"cannot decode {what}: {_decode_failure(e)} (read: {readable_formats()}; "
            f"{CONVERT_HINT})"
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
