"""Multi-turn chat that keeps its KV cache and image features between turns."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .cache import PromptCache
from .generate import (
    GenerationChunk,
    GenerationResult,
    Progress,
    SamplingOptions,
    collect,
    decode,
)
from .keys import ImageKey, common_prefix, image_digest
from .memory import PeakMemory
from .models.base import DecoderModel
from .processor import ImageInput, Processor
from .recordings import Recordings, media_adapter
from .thinking import split_chunks, split_text, template_options, thinking_mode


@dataclass
class _Turn:
    """One question and its answer while it streams."""

    message: dict[str, Any]
    image_keys: list[ImageKey]  # every image of the conversation, this turn's included
    ids: list[int]  # the whole rendered conversation, ending with the answer prompt
    steps: Iterator[GenerationChunk]
    peak: PeakMemory
    mode: str | None  # the answer's reasoning mode (None: the model has none)
    texts: list[str] = field(default_factory=list)  # the generated text, reasoning included
    tokens: list[int] = field(default_factory=list)  # generated ids fed to the cache
    ended: bool = False
    audio: tuple[list[str], list[Any]] = ([], [])  # the conversation's clips, this turn's new


class ChatSession:
    """A conversation whose every answer equals ``generate()`` on the whole rendered conversation.

    Between turns the session keeps the KV cache (only the tokens after the longest common prefix
    are prefilled) and the projected features of every image, keyed by its pixels and num_crops,
    so a follow-up question about an image neither re-runs the vision tower nor re-reads it.

    One turn is in flight at a time. A turn starts when its stream is first advanced; starting
    one (or calling :meth:`reset`) while another's stream is still open ends that one first, as
    closing its stream would. A turn that ends early (its stream closed, Ctrl-C) keeps the answer
    as far as it was streamed, unless nothing was streamed yet; a turn that fails leaves no
    trace. Streams may be advanced from several threads: each step runs alone.

    A model with thinking modes answers each turn in the mode its ``thinking`` option picks
    ("on", "off", "auto"; None: "auto"), its chunks split into ``reasoning`` and ``text``. Later
    turns re-send an answer's reasoning only with ``keep_reasoning``: by default the conversation
    keeps the answer alone (``reasoning_content`` beside it in :attr:`messages`), so every turn's
    thought costs context only while it is generated; the answer is then read again on the next
    turn (the cache held it after the thought). With ``keep_reasoning`` the answer is re-sent as
    generated (mode marker and thought included) and the cache is reused whole.
    """

    def __init__(
        self,
        model: DecoderModel,
        processor: Processor,
        system: str | None = None,
        keep_reasoning: bool = False,
    ):
        self.model = model
        self.processor = processor
        self.system = system
        self.keep_reasoning = keep_reasoning
        self._lock = threading.RLock()
        self._turn: _Turn | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, its images and its cache (ending a turn in flight)."""
        with self._lock:
            if self._turn is not None:
                self._end(self._turn, keep=False)
            self.messages: list[dict[str, Any]] = []
            if self.system:
                self.messages.append({"role": "system", "content": self.system})
            self.images: list[ImageKey] = []
            self.recordings = Recordings(self.model, self.processor)
            self._features: dict[ImageKey, mx.array] = {}
            self._cache: PromptCache | None = None
            self._cache_kv_size: int | None = None
            self._ids: list[int] = []  # what the cache holds

    def stream(
        self,
        text: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        num_crops: int | None = None,
        *,
        progress: Progress | None = None,
        thinking: str | None = None,
        audios: Any = None,
        **options: Any,
    ) -> Iterator[GenerationChunk]:
        """Ask ``text`` (about ``images`` and the recordings ``audios``, attached to this turn,
        ahead of the text) and stream the answer, in the reasoning mode ``thinking`` for a model
        that has them (see the class).

        ``options`` are those of :func:`phi3v_mlx.stream_generate`; they are checked now.
        """
        settings = SamplingOptions(**options)
        mode = thinking_mode(self.processor, thinking)
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        num_crops = self.processor.crops(num_crops)
        chunks = self._run(text, list(images), num_crops, settings, progress, mode, audios)
        return split_chunks(chunks, self.processor, mode)

    def send(
        self,
        text: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        num_crops: int | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Ask ``text`` (about ``images``, attached to this turn) and return the whole answer."""
        return collect(self.stream(text, images, num_crops, **options))

    def _run(
        self,
        text: str,
        images: list[ImageInput],
        num_crops: int,
        settings: SamplingOptions,
        progress: Progress | None,
        mode: str | None,
        audios: Any = None,
    ) -> Iterator[GenerationChunk]:
        started = time.perf_counter()
        with self._lock:
            if self._turn is not None:
                self._end(self._turn, keep=True)
            turn = self._begin(text, images, num_crops, settings, started, progress, mode, audios)
        try:
            while True:
                with self._lock:
                    if turn.ended:
                        return
                    try:
                        chunk = next(turn.steps)
                    except StopIteration:
                        self._end(turn, keep=True)
                        return
                    except KeyboardInterrupt:
                        self._end(turn, keep=True)
                        raise
                    except BaseException:
                        self._end(turn, keep=False)
                        raise
                    turn.texts.append(chunk.text)
                    if chunk.token is not None:
                        turn.tokens.append(chunk.token)
                    if chunk.finish_reason is not None:
                        self._end(turn, keep=True, complete=True)
                yield chunk
        finally:
            with self._lock:
                if not turn.ended:
                    self._end(turn, keep=True)

    def _begin(
        self,
        text: str,
        images: list[ImageInput],
        num_crops: int,
        settings: SamplingOptions,
        started: float,
        progress: Progress | None,
        mode: str | None,
        audios: Any = None,
    ) -> _Turn:
        """Load and encode the turn's images and recordings, render the conversation and start
        decoding; an error here changes nothing."""
        peak = PeakMemory()
        try:
            loaded = self.processor.load_images(images, first=len(self.images))
            keys = [(image_digest(image), num_crops) for image in loaded]
            sounds = self.recordings.load(audios) if audios is not None else []
            parts = [{"type": "image"} for _ in keys] + [{"type": "audio"} for _ in sounds]
            message = {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
            digests = self.recordings.digests + [digest for digest, _ in sounds]
            image_keys = self.images + keys
            sizes = {**{key: len(f) for key, f in self._features.items()},
                     **{key: self.processor.image_tokens(image, num_crops)
                        for key, image in zip(keys, loaded, strict=True)}}  # fmt: skip
            prompt = self.processor.apply_chat_template(
                [*self.messages, message], **template_options(mode)
            )
            counts = [sizes[key] for key in image_keys]
            if digests:
                slots = self.recordings.tokens(digests, sounds)
                ids = self.processor.tokenize(prompt, counts, slots)
            else:
                ids = self.processor.tokenize(prompt, counts)
            self._encode(keys, loaded, num_crops)
            features = [self._features[key] for key in image_keys]
            signature = (tuple(digests), bool(image_keys))
            heard = None if progress is None else lambda done, total: progress(0, len(ids))
            features += self.recordings.features(digests, sounds, signature[1], heard)
            limit = len(ids)
            if self.recordings.built not in (None, signature) and self.recordings.built[0]:
                # the earlier clips' features change with the clips framed beside them
                limit = next(i for i, t in enumerate(ids) if t < -len(image_keys))
            adapter = media_adapter(self.model, signature[1], bool(digests))
            prefix = self._reusable_prefix(ids, settings, limit, adapter)
            self.recordings.built = signature
            embeddings = self.model.merge(mx.array([ids]), features, start=prefix)
        except BaseException:
            peak.close()
            raise
        steps = decode(
            self.model, self.processor, ids[prefix:], embeddings, self._cache, settings,
            started=started, peak=peak, progress=progress, context=ids[:prefix],
        )  # fmt: skip
        self._turn = _Turn(message, image_keys, ids, steps, peak, mode)
        self._turn.audio = (digests, sounds)
        return self._turn

    def _end(self, turn: _Turn, keep: bool, complete: bool = False) -> None:
        """Close a turn. Kept (complete, or cut short after some answer was streamed), its
        question and answer join the conversation; either way the cache keeps exactly the
        positions that were fully computed."""
        turn.ended = True
        if self._turn is turn:
            self._turn = None
        turn.steps.close()
        turn.peak.close()
        fed = turn.ids + turn.tokens
        if keep and (complete or turn.tokens):
            self.messages += [turn.message, self._answer(turn)]
            self.images = turn.image_keys
            self.recordings.keep(*turn.audio)
        if self._cache is not None:
            held = min(len(fed), self._cache.offset, self._cache.rope.length)
            if self._cache.trim_to(held):
                self._ids = fed[:held]
            else:
                self._cache, self._ids = None, []

    def _answer(self, turn: _Turn) -> dict[str, Any]:
        """The assistant message a turn's generated text becomes (see the class)."""
        text = "".join(turn.texts)
        if turn.mode is None:
            return {"role": "assistant", "content": text}
        reasoning, answer, _ = split_text(self.processor, turn.mode, text)
        if self.keep_reasoning:
            answer = self.processor.thinking_modes[turn.mode] + text
        return {"role": "assistant", "content": answer, "reasoning_content": reasoning}

    def _encode(self, keys: list[ImageKey], images: list[Any], num_crops: int) -> None:
        """Encode the images not seen before, all in one vision run."""
        new = {key: image for key, image in zip(keys, images, strict=True)
               if key not in self._features}  # fmt: skip
        if new:
            pre = self.processor.preprocess(list(new.values()), num_crops)
            embeds = self.model.encode_images(pre.pixel_values, pre.image_sizes)
            self._features.update(zip(new, embeds, strict=True))

    def _reusable_prefix(
        self, ids: list[int], settings: SamplingOptions, limit: int, adapter: str | None
    ) -> int:
        """Trim the cache to what the new prompt shares with it, at most ``limit`` positions
        and none if it was read with another adapter (at least one token is fed)."""
        if self._cache is None or self._cache_kv_size != settings.max_kv_size:
            self._cache = self.model.make_cache(settings.max_kv_size)
            self._cache_kv_size, self._ids = settings.max_kv_size, []
        if getattr(self._cache.rope, "adapter", None) != adapter:
            limit = 0  # the adapter acts on every position
        prefix = min(common_prefix(self._ids, ids), len(ids) - 1, limit)
        if not self._cache.trim_to(prefix):
            self._cache = self.model.make_cache(settings.max_kv_size)
            prefix = 0
        if hasattr(self._cache, "adapter"):
            self._cache.adapter = adapter
        self._ids = ids[:prefix]
        return prefix
