"""Speech tasks shared by ``phi3v transcribe`` and the server's audio endpoints: one instruction
and one set of settings for each, so both give the same text for the same recording."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from .generate import GenerationChunk, SamplingOptions, chat_prompt, decode
from .memory import PeakMemory
from .models.base import DecoderModel
from .recordings import audio_tokens, encode_waves, load_waves, media_adapter

TRANSCRIBE = "Transcribe the audio to text."
TRANSLATE = "Translate the audio to {language}."
# Enough for half an hour of speech; the answer ends at the model's stop token well before.
MAX_TOKENS = 4096
# The languages Phi-4-multimodal's speech path was trained on, by ISO 639-1 code.
LANGUAGES = {
    "en": "English",
    "zh": "Chinese",
    "de": "German",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "es": "Spanish",
    "pt": "Portuguese",
}
# Formats of OpenAI's speech-to-text API this server writes, and those it cannot (they carry
# timestamps, which the model does not produce).
RESPONSE_FORMATS = ("json", "text")
TIMESTAMP_FORMATS = ("srt", "vtt", "verbose_json")


def language_name(language: str) -> str:
    """The English name of one of the model's speech languages, given by name or ISO code."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return LANGUAGES[key]
    for name in LANGUAGES.values():
        if key == name.lower():
            return name
    known = ", ".join(f"{name} ({code})" for code, name in LANGUAGES.items())
    raise ValueError(f"unknown speech language {language!r}: the model knows {known}")


def instruction(translate_to: str | None = None, hint: str | None = None) -> str:
    """The question asked about a recording: transcribe it, or translate it to a language;
    ``hint`` (names, spellings, the topic) follows on a line of its own."""
    text = (
        TRANSCRIBE
        if translate_to is None
        else TRANSLATE.format(language=language_name(translate_to))
    )
    return f"{text}\n{hint.strip()}" if hint and hint.strip() else text


def speech_prompt(processor: Any, translate_to: str | None = None, hint: str | None = None) -> str:
    """The chat prompt of a transcription (or translation) of one recording: the audio first,
    then the instruction, as the official examples lay it out."""
    return chat_prompt(processor, instruction(translate_to, hint), audios=1)


def stream_transcription(
    model: DecoderModel,
    processor: Any,
    audio: Any,
    translate_to: str | None = None,
    hint: str | None = None,
    *,
    listening: Callable[[int, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Iterator[GenerationChunk]:
    """Stream the transcription (or translation) of one recording, exactly
    ``generate(model, processor, speech_prompt(...), audios=[audio], **options)`` (greedy and
    :data:`MAX_TOKENS` unless ``options`` say otherwise), reporting the encoder's steps to
    ``listening(done, total)`` and the prompt's reading to ``progress(done, total)``."""
    settings = SamplingOptions(**{"max_tokens": MAX_TOKENS, **options})
    prompt = speech_prompt(processor, translate_to, hint)
    started = time.perf_counter()
    peak = PeakMemory()
    try:
        waves = load_waves(processor, audio)
        ids = processor.tokenize(prompt, [], audio_tokens(processor, waves))
        features = encode_waves(model, processor, waves, vision=False, progress=listening)
        embeddings = model.merge(mx.array([ids]), features)
        cache = model.make_cache(settings.max_kv_size)
        cache.adapter = media_adapter(model, images=False, audios=True)
        yield from decode(
            model, processor, ids, embeddings, cache, settings, started=started, peak=peak,
            progress=progress,
        )  # fmt: skip
    finally:
        peak.close()
