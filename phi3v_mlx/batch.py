"""Many generations decoded together: continuous batching over mlx-lm's ``BatchGenerator``.

Each row's prompt, its image embeddings included, is read into a cache of its own exactly as
:func:`phi3v_mlx.generate` reads it, and its first token drawn the same way; the row then joins
mlx-lm's ``BatchGenerator``, whose per-layer ``BatchKVCache`` keeps every row left-padded, and is
decoded together with the others until it stops, when the next waiting row takes its place.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, generation_stream

from .cache import PromptCache
from .generate import (
    AnswerText,
    GenerationResult,
    SamplingOptions,
    begin_reading,
    make_logits_processors,
    make_sampler,
    prompt_pieces,
    settle,
)
from .memory import PeakMemory, wired_limit
from .models.base import DecoderModel, media_slots
from .processor import ImageInput, Processor
from .recordings import RowAudio, media_adapter
from .thinking import ThinkingError, check_rendered, declared_mode, split_result


@dataclass
class Request:
    """One generation of a batch: a chat-formatted prompt (or token ids, media slots negative:
    the images, then the audios), the images its ``<|image_N|>`` tags name and the recordings
    its ``<|audio_N|>`` tags name (a model that reads audio), what differs from the batch's
    sampling settings (``options``: any :class:`SamplingOptions` field, such as
    ``max_tokens``), and the reasoning mode its prompt was rendered in when it differs from the
    batch's (``thinking``: "on", "off" or "auto", for a model with thinking modes)."""

    prompt: str | Sequence[int]
    images: Sequence[ImageInput] = ()
    num_crops: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stop: Sequence[str] = ()
    audios: Sequence[Any] = ()
    thinking: str | None = None


RequestLike = Request | str | dict[str, Any]


def as_request(item: RequestLike) -> Request:
    """A :class:`Request` from itself, a prompt string, or a dict with the request's fields
    (``prompt``, ``images``, ``audios``, ``num_crops``, ``stop``, ``thinking``) and sampling
    options."""
    if isinstance(item, Request):
        return item
    if isinstance(item, str):
        return Request(item)
    if isinstance(item, dict):
        names = ("prompt", "images", "audios", "num_crops", "stop", "thinking")
        fields = {k: item[k] for k in names if k in item}
        options = {k: v for k, v in item.items() if k not in fields}
        if "prompt" not in fields:
            raise ValueError("a request needs a prompt")
        return Request(**fields, options=options)
    raise ValueError(
        f"a request is a Request, a prompt string or a dict, not {type(item).__name__}"
    )


@dataclass
class RowEvent:
    """What a step did for one row: new answer text, and when it ended its result (or error).

    ``fault`` tells an error that is not the request's (its own work raised something other
    than a ``ValueError``). ``cache`` is the row's cache when it ended and keeping it was asked
    for.
    """

    row: int
    text: str = ""
    result: GenerationResult | None = None
    error: str | None = None
    fault: bool = False
    cache: PromptCache | None = None


@dataclass
class Carried:
    """A piece of one sequence's prompt that goes through the model with the next batch step;
    ``hidden`` holds its hidden states once it has."""

    embeddings: mx.array
    cache: PromptCache
    hidden: mx.array | None = None


class BatchStep:
    """What mlx-lm's ``BatchGenerator`` calls: each row's last token [B, 1] and the batch cache
    (per-layer ``BatchKVCache``, then the rows' :class:`RopeRows`). A piece of prompt handed
    over with :meth:`carry` is read in the same forward as the next step (``mixed``)."""

    def __init__(self, model: DecoderModel):
        self.model = model
        self.carried: Carried | None = None

    def carry(self, embeddings: mx.array, cache: PromptCache) -> Carried:
        self.carried = Carried(embeddings, cache)
        return self.carried

    def __call__(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        embeddings = self.model.embed_tokens(inputs)
        carried, self.carried = self.carried, None
        if carried is None:
            return self.model.batch_logits(embeddings, cache)
        carried.hidden, logits = self.model.mixed(carried.embeddings, carried.cache,
                                                  embeddings, cache)  # fmt: skip
        return logits


class StopStrings:
    """Stop strings over streamed text: the text before the first match is released, and what
    could still begin a match is held back until it cannot."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that can be shown now, and whether a stop string was reached."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])),
                   default=0)  # fmt: skip
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        return out, False

    def flush(self) -> str:
        """What was held back, at the end of the text."""
        out, self.held = self.held, ""
        return out


@dataclass
class EngineStats:
    """What an engine has done: seconds reading prompts (images included) and decoding, and the
    tokens decoding produced (a row's first token comes with its prompt)."""

    prompt_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tps(self) -> float:
        """Aggregate decoding speed: tokens of every row per second."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class _Row:
    """A request in the engine, from its admission to its end."""

    index: int
    request: Request
    options: SamplingOptions
    keep_cache: bool
    submitted: float
    cache: PromptCache | None = None
    prefix: int = 0  # prompt positions the reused cache holds
    image_keys: Sequence[Any] = ()  # per image, its key in the feature store
    audio: Any = None  # the row's recordings (RowAudio), if any
    peak: PeakMemory | None = None
    ids: list[int] = field(default_factory=list)  # the prompt, image slots negative
    images: list[Any] = field(default_factory=list)  # decoded, until encoded
    missing: list[int] = field(default_factory=list)  # media the feature store lacks
    features: list[mx.array | None] = field(default_factory=list)
    embeddings: mx.array | None = None  # positions prefix.. of the prompt
    pieces: list[tuple[int, int]] = field(default_factory=list)  # of those, still to read
    done: int = 0  # of those, read into the cache
    answer: AnswerText | None = None
    stops: StopStrings | None = None
    sampler: Callable[[mx.array], mx.array] | None = None
    processors: list[Callable] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    first_token_at: float = 0.0
    uid: int | None = None  # in the BatchGenerator, once decoding

    def result(self, finish: str) -> GenerationResult:
        now, n, read = time.perf_counter(), len(self.tokens), len(self.ids) - self.prefix
        return GenerationResult(
            text="".join(self.texts),
            tokens=list(self.tokens),
            prompt_tokens=read,
            generation_tokens=n,
            prompt_tps=read / max(self.first_token_at - self.submitted, 1e-9),
            generation_tps=(n - 1) / (now - self.first_token_at) if n > 1 else 0.0,
            peak_memory=self.peak.gb if self.peak else 0.0,
            finish_reason=finish,
        )


class FeatureStore(Protocol):
    """Where image features are kept between requests, by a key of the image's pixels."""

    def get(self, key: Any) -> mx.array | None: ...

    def put(self, key: Any, features: mx.array) -> None: ...


class BatchEngine:
    """The one place where concurrent generations are decoded together.

    ``submit`` queues a request; each ``step`` admits waiting requests into free rows, runs the
    encoders on their media (the images of all admitted rows through the vision tower together,
    only real crops), reads prompts into their caches and runs one decoding step of every row,
    returning what happened to each row. With ``interleave``, a step does one piece of prompt
    work with its decoding, one row's encoder run or one prompt chunk (what a server wants:
    answers in flight keep flowing), the chunk in the same forward as the decoding step where
    the model can; without it every admitted prompt is read first (throughput). ``features``
    keeps image features between requests.
    """

    def __init__(
        self,
        model: DecoderModel,
        processor: Processor,
        *,
        batch_size: int = 8,
        interleave: bool = False,
        features: FeatureStore | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.interleave = interleave
        self.features = features
        stops = sorted(AnswerText(processor).stops)
        self._step_model = BatchStep(model)
        self._generator = BatchGenerator(
            self._step_model,
            stop_tokens=[[t] for t in stops],
            completion_batch_size=batch_size,
            prefill_batch_size=batch_size,
        )
        self._count = itertools.count()
        self._waiting: deque[_Row] = deque()
        self._encoding: deque[_Row] = deque()  # admitted, media not yet encoded
        self._reading: deque[_Row] = deque()
        self._decoding: dict[int, _Row] = {}  # by BatchGenerator uid
        self._wired = wired_limit([generation_stream])
        self._wired.__enter__()
        self.stats = EngineStats()

    def submit(
        self,
        request: RequestLike,
        options: SamplingOptions | None = None,
        *,
        keep_cache: bool = False,
        cache: PromptCache | None = None,
        prefix: int = 0,
        image_keys: Sequence[Any] = (),
    ) -> int:
        """Queue a request (``options`` default to its own); returns its row number.

        The first ``prefix`` positions of ``cache``, which the caller knows to equal the
        prompt's (images included), are reused; with ``keep_cache`` the row's cache comes with
        its result. ``image_keys`` name the request's images in the feature store."""
        request = as_request(request)
        settings = options or SamplingOptions(**request.options)
        row = _Row(next(self._count), request, settings, keep_cache, time.perf_counter())
        row.cache, row.prefix, row.image_keys = cache, prefix, image_keys
        self._waiting.append(row)
        return row.index

    def cancel(self, index: int) -> bool:
        """Drop a row wherever it is; False if it is not in the engine (anymore)."""
        for queue in (self._waiting, self._encoding, self._reading):
            for row in queue:
                if row.index == index:
                    queue.remove(row)
                    self._release(row)
                    return True
        for uid, row in list(self._decoding.items()):
            if row.index == index:
                self._generator.remove([uid])
                del self._decoding[uid]
                self._release(row)
                return True
        return False

    def pending(self) -> int:
        """Rows submitted and not yet ended."""
        return len(self._waiting) + self._rows_in_use()

    def step(self) -> list[RowEvent]:
        """Admit, read prompts, decode one token of every decoding row."""
        events: list[RowEvent] = []
        with mx.stream(generation_stream):
            started = time.perf_counter()
            self._admit(events)
            carried = None
            if self.interleave:  # one encoder run or one prompt chunk, with the decoding
                encoded = False if self._reading else self._encode(events, first_only=True)
                if self._reading and not encoded:
                    carried = self._read_or_carry(self._reading[0], events)
            else:
                self._encode(events, first_only=False)
                while self._reading:
                    self._read(self._reading[0], events)
            decoding = time.perf_counter()
            self.stats.prompt_seconds += decoding - started
            if self._decoding:
                try:
                    self.stats.decode_tokens += self._decode(events)
                finally:
                    self._step_model.carried = None
                self.stats.decode_seconds += time.perf_counter() - decoding
            if carried is not None:
                row, piece = carried
                self._read(row, events, piece.hidden)
        return events

    def _read_or_carry(self, row: _Row, events: list[RowEvent]) -> tuple[_Row, Carried] | None:
        """Hand the row's next piece of prompt to the coming decoding step, or, with no row
        decoding (or no first token to draw), read it now."""
        last = len(row.pieces) == 1
        if not self._decoding or (last and not row.options.max_tokens):
            self._read(row, events)
            return None
        start, end = row.pieces[0]
        return row, self._step_model.carry(row.embeddings[:, start:end], row.cache)

    def close(self) -> None:
        """Drop every row and give the wired limit back."""
        for row in [*self._waiting, *self._encoding, *self._reading, *self._decoding.values()]:
            self._release(row)
        self._waiting.clear()
        self._encoding.clear()
        self._reading.clear()
        self._decoding.clear()
        self._generator.close()
        if self._wired is not None:
            self._wired.__exit__(None, None, None)
            self._wired = None

    def _release(self, row: _Row) -> None:
        if row.peak is not None:
            row.peak.close()

    def _admit(self, events: list[RowEvent]) -> None:
        """Move waiting requests into the free rows: their prompt ids, their caches, their
        decoded media and which of them the feature store lacks (no encoder runs here)."""
        while self._waiting and self._rows_in_use() < self.batch_size:
            row = self._waiting.popleft()
            row.peak = PeakMemory()
            try:
                row.images = self._prepare(row)
                row.missing = self._fill_known_features(row, row.images)
            except Exception as e:
                self._fail(row, e, events)
                continue
            self._encoding.append(row)

    def _encode(self, events: list[RowEvent], first_only: bool) -> bool:
        """Encode the admitted rows' missing media (their images in one vision run), merge
        their prompts and start reading them; with ``first_only``, stop after the first row
        that needs an encoder. Whether an encoder ran."""
        encoded_rows, crops, sizes = [], [], []
        while self._encoding:
            row = self._encoding.popleft()
            try:
                missing = self._fill_audio(row, row.missing, len(row.images))
                if missing:
                    pixels = self.processor.preprocess([row.images[k] for k in missing],
                                                       row.request.num_crops)  # fmt: skip
                    crops.append(pixels.pixel_values)
                    sizes.extend(pixels.image_sizes)
            except Exception as e:
                self._fail(row, e, events)
                continue
            encoded_rows.append((row, missing))
            if first_only and row.missing:
                break
        encoded = iter(self.model.encode_images(np.concatenate(crops), sizes) if sizes else [])
        for row, missing in encoded_rows:
            for k in missing:
                row.features[k] = next(encoded)
                if self.features is not None and row.image_keys:
                    self.features.put(row.image_keys[k], row.features[k])
            try:
                row.embeddings = self.model.merge(
                    mx.array([row.ids]), row.features, start=row.prefix
                )
                begin_reading(row.cache, row.embeddings)
                step = row.options.prefill_step_size
                row.pieces = prompt_pieces(row.embeddings.shape[1], step)
            except Exception as e:
                self._fail(row, e, events)
                continue
            finally:
                row.features, row.images = [], []
            row.answer = AnswerText(self.processor)
            row.stops = StopStrings(row.request.stop)
            self._reading.append(row)
        return any(row.missing for row, _ in encoded_rows)

    def _rows_in_use(self) -> int:
        """Rows admitted and not yet ended."""
        return len(self._encoding) + len(self._reading) + len(self._decoding)

    def _fail(self, row: _Row, error: Exception, events: list[RowEvent]) -> None:
        """End a row whose own work raised: a ValueError is the request's, anything else a
        fault; the other rows go on."""
        events.append(RowEvent(row.index, error=str(error) or type(error).__name__,
                               fault=not isinstance(error, ValueError)))  # fmt: skip
        self._release(row)

    def _prepare(self, row: _Row) -> list[Any]:
        """Set the row's prompt ids and cache (trimmed to the reusable prefix) and return its
        decoded images; a bad request raises ValueError (before any heavy work)."""
        request = row.request
        if row.options.kv_bits is not None or row.options.max_kv_size is not None:
            raise ValueError("kv_bits and max_kv_size are not supported in batched generation")
        crops = self.processor.crops(request.num_crops)
        images = self.processor.load_images(list(request.images))
        counts = [self.processor.image_tokens(image, crops) for image in images]
        if request.audios:
            row.audio = RowAudio.load(self.processor, request.audios, vision=bool(images))
        sounds = row.audio.tokens if row.audio is not None else []
        if isinstance(request.prompt, str):
            if sounds:
                row.ids = self.processor.tokenize(request.prompt, counts, sounds)
            else:
                row.ids = self.processor.tokenize(request.prompt, counts)
        else:
            row.ids = [int(t) for t in request.prompt]
            if not row.ids:
                raise ValueError("the prompt is empty")
            self.processor.check_length(len(row.ids))
            check_slots(row.ids, counts + sounds, len(counts))
        adapter = media_adapter(self.model, bool(images), bool(sounds))
        if row.cache is not None and getattr(row.cache.rope, "adapter", None) != adapter:
            row.cache = None  # its positions were read with another adapter
        if row.cache is not None:
            row.prefix = min(row.prefix, len(row.ids) - 1)
            if not row.cache.trim_to(row.prefix):
                row.cache = None
        if row.cache is None:
            row.cache, row.prefix = self.model.make_cache(), 0
            if adapter is not None:
                row.cache.adapter = adapter
        return images

    def _fill_audio(self, row: _Row, missing: list[int], images: int) -> list[int]:
        """Encode the row's recordings (all in one run, as ``generate()`` does) when a slot
        after the reused prefix needs them or the feature store lacks them; the images still
        missing."""
        audio_missing = [k for k in missing if k >= images]
        if row.audio is None or not audio_missing:
            return missing
        features = row.audio.features(self.model, self.features)
        for k in audio_missing:
            row.features[k] = features[k - images]
        return [k for k in missing if k < images]

    def _fill_known_features(self, row: _Row, images: list[Any]) -> list[int]:
        """Fill the row's image features from the feature store; the images it still needs
        encoded (an image whose slots all lie in the reused prefix is not needed)."""
        row.features = [None] * len(images)
        needed = {k for begin, length, k in media_slots(np.asarray(row.ids))
                  if begin + length > row.prefix}  # fmt: skip
        missing = []
        row.features += [None] * (len(row.audio.tokens) if row.audio is not None else 0)
        for k in sorted(needed):
            key = row.image_keys[k] if k < len(row.image_keys) else None
            known = self.features.get(key) if self.features is not None and key else None
            if known is None:
                missing.append(k)
            row.features[k] = known
        return missing

    def _read(self, row: _Row, events: list[RowEvent], hidden: mx.array | None = None) -> None:
        """Read the next piece of a row's prompt (``hidden``: its hidden states, when it was
        read along with a decoding step); after its last, draw the row's first token as
        ``generate()`` does and let it join the decoding rows. A row whose reading raises ends
        with its error."""
        start, end = row.pieces[0]
        try:
            if len(row.pieces) == 1 and not row.options.max_tokens:
                token = None
            else:
                if hidden is None:
                    hidden = self.model.hidden(row.embeddings[:, start:end], row.cache)
                if len(row.pieces) > 1:
                    settle(row.cache, self.model, row.options)
                    row.pieces.pop(0)
                    row.done = end
                    return
                token = self._first_token(row, hidden)
            self._reading.popleft()
        except Exception as e:
            if self._reading and self._reading[0] is row:
                self._reading.popleft()
            self._fail(row, e, events)
            return
        if token is None:
            self._finish(row, "length", events)
            return
        if self._show_or_finish(row, token, events):
            return
        if row.options.max_tokens == 1:
            self._finish(row, "length", events)
            return
        (uid,) = self._generator.insert(
            [[token]],
            max_tokens=[row.options.max_tokens - 1],
            caches=[[*row.cache, row.cache.rope]],
            all_tokens=[np.maximum(row.ids, 0).tolist()],
            samplers=[row.sampler],
            logits_processors=[row.processors],
        )
        row.uid, row.cache = uid, None  # the generator merges it into the batch's cache
        self._decoding[uid] = row

    def _first_token(self, row: _Row, hidden: mx.array) -> int:
        """Draw a row's first token from the hidden states of its prompt's last piece."""
        logits = self.model.logits(hidden[:, -1:])[:, -1, :]
        self.stats.prompt_tokens += len(row.ids) - row.prefix
        seen = row.prefix + row.done  # the positions the cache held before this forward
        row.processors = make_logits_processors(row.options, before=row.ids[:seen])
        context = mx.array(np.maximum(row.ids[seen:], 0), dtype=mx.int32)
        for process in row.processors:
            logits = process(context, logits)
        row.sampler = make_sampler(row.options)
        token = int(row.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item())
        row.first_token_at = time.perf_counter()
        row.embeddings = None
        return token

    def _decode(self, events: list[RowEvent]) -> int:
        """One decoding step of every decoding row; returns the tokens it produced."""
        responses = self._generator.next_generated()
        for response in responses:
            row = self._decoding.get(response.uid)
            if row is None:
                continue
            if response.finish_reason is not None:
                del self._decoding[response.uid]
                if row.keep_cache:
                    *layers, rope = response.prompt_cache
                    row.cache = PromptCache(layers, rope)
            if self._show_or_finish(row, response.token, events):
                if response.finish_reason is None:
                    self._generator.remove([response.uid])
                    del self._decoding[response.uid]
            elif response.finish_reason is not None:
                self._finish(row, "length", events)
        return len(responses)

    def _show_or_finish(self, row: _Row, token: int, events: list[RowEvent]) -> bool:
        """Show a generated token, or finish the row if it ends it (a stop id or string: then
        True)."""
        if token in row.answer.stops:
            self._finish(row, "stop", events)
            return True
        row.tokens.append(token)
        text, stopped = row.stops.feed(row.answer.add(token))
        if text:
            row.texts.append(text)
            events.append(RowEvent(row.index, text=text))
        if stopped:
            self._finish(row, "stop", events, stopped_by_text=True)
        return stopped

    def _finish(
        self, row: _Row, finish: str, events: list[RowEvent], stopped_by_text: bool = False
    ) -> None:
        tail = ""
        if not stopped_by_text:
            tail, stopped = row.stops.feed(row.answer.finish())
            tail += "" if stopped else row.stops.flush()
            finish = "stop" if stopped else finish
        if tail:
            row.texts.append(tail)
        result = row.result(finish)
        self._release(row)
        cache = None
        if row.keep_cache:
            cache = row.cache or self._decoding_cache(row)
        events.append(RowEvent(row.index, text=tail, result=result, cache=cache))

    def _decoding_cache(self, row: _Row) -> PromptCache:
        """A copy of the cache of a row still in the generator (it ended on a stop string)."""
        (*layers, rope), _ = self._generator.extract_cache([row.uid])[row.uid]
        return PromptCache(layers, rope)


def stream_batch_generate(
    model: DecoderModel,
    processor: Processor,
    requests: Iterable[RequestLike],
    *,
    batch_size: int = 8,
    thinking: str | None = None,
    **sampling: Any,
) -> Iterator[tuple[int, GenerationResult | Exception]]:
    """Answer many requests decoded together; yields ``(index, result)`` as each row ends, the
    index that of the request in ``requests``. A request that cannot be used (a missing image, a
    prompt over the context, image slots that do not match its images, a prompt rendered in
    another reasoning mode than its own) yields a ``ValueError`` in place of its result, a
    failure of its own work anything else a ``RuntimeError``, and the rest go on.

    ``sampling`` are :class:`SamplingOptions` fields shared by every request, which a request's
    own ``options`` override. With temperature 0 every row's tokens equal ``generate()``'s.

    ``thinking`` ("on", "off", "auto"; a request's own ``thinking`` overrides it) is the
    reasoning mode of a model that has them in which the prompts were rendered
    (``chat_prompt(..., thinking=mode)``; a text prompt ending as another mode's is refused): a
    row's result then has its ``reasoning`` apart from its ``text`` (the answer), as the chat
    session and ``phi3v_mlx.thinking.split_text`` split them, and finishes with "length" if the
    thought never closed. Without a mode the text is left as generated, markers included. A
    model without thinking modes refuses the option (``ThinkingError``, a ``ValueError``).
    """
    default = declared_mode(processor, thinking)
    engine = BatchEngine(model, processor, batch_size=batch_size)
    try:
        order, modes, refused = {}, {}, []
        for position, item in enumerate(requests):
            request = as_request(item)
            try:
                own = request.thinking
                mode = default if own is None else declared_mode(processor, own)
                if mode is not None and isinstance(request.prompt, str):
                    check_rendered(processor, mode, request.prompt)
            except ThinkingError as e:
                refused.append((position, e))
                continue
            options = SamplingOptions(**{**sampling, **request.options})
            row = engine.submit(request, options)
            order[row], modes[row] = position, mode
        yield from refused
        while engine.pending():
            for event in engine.step():
                if event.error is not None:
                    kind = RuntimeError if event.fault else ValueError
                    yield order[event.row], kind(event.error)
                elif event.result is not None:
                    yield order[event.row], split_result(processor, modes[event.row],
                                                         event.result)  # fmt: skip
    finally:
        engine.close()


def check_slots(ids: Sequence[int], counts: Sequence[int], images: int | None = None) -> None:
    """Refuse prompt ids whose media slots do not match the media, item k filling one run of
    ``counts[k]`` slots (id ``-(k + 1)``), with a ValueError naming the mismatch; the first
    ``images`` items (all by default) are images, the rest recordings."""
    images = len(counts) if images is None else images

    def name(k: int) -> str:
        return f"image {k + 1}" if k < images else f"audio {k - images + 1}"

    runs = media_slots(np.asarray(ids))
    for _, length, k in runs:
        if k >= len(counts):
            what = "image" if images == len(counts) else "media item"
            raise ValueError(f"the prompt has slots for {what} {k + 1} but {len(counts)} "
                             f"{what}(s) were given")  # fmt: skip
        if length != counts[k]:
            raise ValueError(f"{name(k)} fills {counts[k]} slots but the prompt has a run "
                             f"of {length}")  # fmt: skip
    named = {k for _, _, k in runs}
    for k in range(len(counts)):
        if k not in named:
            raise ValueError(f"{name(k)} is given but the prompt has no slots for it")


def batch_generate(
    model: DecoderModel,
    processor: Processor,
    requests: Iterable[RequestLike],
    *,
    batch_size: int = 8,
    thinking: str | None = None,
    **sampling: Any,
) -> list[GenerationResult]:
    """One :class:`GenerationResult` per request, in order (see :func:`stream_batch_generate`,
    also for ``thinking``); the first request that cannot be used raises its ``ValueError``.

    A request is a prompt string, a :class:`Request`, or a dict such as ``{"prompt": ...,
    "images": [...], "num_crops": 4, "max_tokens": 64, "thinking": "on"}``.
    """
    requests = list(requests)
    results: list[GenerationResult | None] = [None] * len(requests)
    for index, result in stream_batch_generate(
        model, processor, requests, batch_size=batch_size, thinking=thinking, **sampling
    ):
        if isinstance(result, Exception):
            raise type(result)(f"request {index + 1}: {result}")
        results[index] = result
    return results
