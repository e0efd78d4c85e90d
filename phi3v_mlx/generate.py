"""Text generation with images: prompt building, prefill and streamed decoding over mlx-lm."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, generation_stream, maybe_quantize_kv_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler
from mlx_lm.sample_utils import make_logits_processors as mlx_logits_processors

from .cache import PromptCache
from .memory import PeakMemory, wired_limit
from .models.base import DecoderModel
from .processor import IMAGE_TAG, ImageInput, Processor
from .thinking import render

Progress = Callable[[int, int], None]
AUDIO_TAG = re.compile(r"<\|audio_(\d+)\|>")


def default_prefill_step() -> int:
    """Prompt positions per prefill forward: mlx-lm's 2048 on a GPU; 256 on the CPU backend,
    where a chunk takes seconds, so that progress and Ctrl-C come at a human pace."""
    return 2048 if mx.metal.is_available() else 256


@dataclass
class GenerationChunk:
    """One decoding step: the new text (possibly empty) and the running statistics; split by
    reasoning mode (see ``phi3v_mlx.thinking``), ``text`` is the answer's and ``reasoning`` the
    thought's."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    reasoning: str = ""


@dataclass
class GenerationResult:
    """A finished generation; ``tokens`` are the generated ids without the stop token (both
    the reasoning's and the answer's)."""

    text: str
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None
    reasoning: str = ""


@dataclass
class SamplingOptions:
    """How tokens are drawn and how the cache is kept during one generation."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    kv_bits: int | None = None
    max_kv_size: int | None = None
    prefill_step_size: int | None = None

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.kv_bits is not None and self.kv_bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8, got {self.kv_bits}")
        if self.max_kv_size is not None and self.max_kv_size < 1:
            raise ValueError(f"max_kv_size must be >= 1, got {self.max_kv_size}")
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise ValueError("kv_bits and max_kv_size exclude each other (a rotating cache "
                             "cannot be quantized)")  # fmt: skip
        if self.seed is not None:
            self.seed %= 2**64  # any integer is a seed: -1 (what chat UIs send) as 2**64 - 1
        if self.prefill_step_size is None:
            self.prefill_step_size = default_prefill_step()
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")


class Sampler:
    """Draws token ids from log-probabilities [B, vocab] with a random key of its own.

    Every generation owns its key (from ``seed``, or drawn from MLX's global generator), so a
    seeded generation gives the same tokens however its steps are interleaved with others'.
    """

    def __init__(
        self, temperature: float, top_p: float, min_p: float, top_k: int, seed: int | None
    ):
        self.temperature = temperature
        self.filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < top_p < 1:
            self.filters.append(lambda x: apply_top_p(x, top_p))
        if min_p > 0:
            self.filters.append(lambda x: apply_min_p(x, min_p))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, top_k))
        if seed is None:
            seed = int(mx.random.randint(0, 2**31 - 1).item())
        self.key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        for apply in self.filters:
            logprobs = apply(logprobs)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / self.temperature), key=draw)


def make_sampler(options: SamplingOptions) -> Callable[[mx.array], mx.array]:
    """mlx-lm's greedy sampler at temperature 0, else a :class:`Sampler` with its own key."""
    if options.temperature == 0:
        return greedy_sampler
    return Sampler(options.temperature, options.top_p, options.min_p, options.top_k, options.seed)


def make_logits_processors(
    options: SamplingOptions, before: Sequence[int] = ()
) -> list[Callable[[mx.array, mx.array], mx.array]]:
    """mlx-lm's logits processors for the options (the repetition penalty), seeing the ids
    ``before`` (prompt positions fed to the cache by other means) ahead of their own context."""
    processors = mlx_logits_processors(repetition_penalty=options.repetition_penalty)
    if not processors or not before:
        return processors
    head = mx.array(np.maximum(np.asarray(before), 0), dtype=mx.int32)

    def with_head(process: Callable) -> Callable:
        return lambda tokens, logits: process(mx.concatenate([head, tokens]), logits)

    return [with_head(process) for process in processors]


def kv_group_size(model: DecoderModel) -> int:
    """The largest KV-cache quantization group that divides the head size."""
    for size in (128, 64, 32):
        if model.config.head_dim % size == 0:
            return size
    raise ValueError(
        f"kv_bits needs a head size divisible by 32, this model has {model.config.head_dim}"
    )


class AnswerText:
    """Generated ids to the answer's text: stop ids end it, special ids are never shown (but the
    reasoning markers a processor names in ``visible_special_tokens``), and UTF-8 is streamed
    whole (mlx-lm's streaming detokenizer)."""

    def __init__(self, processor: Processor):
        tokenizer = processor.tokenizer
        self.stops = processor.stop_ids
        self.detokenizer = None  # a checkpoint without a tokenizer answers in ids only
        if tokenizer is None:
            return
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        shown = set()  # looked up one by one: a 200k vocabulary takes 0.4 s to list
        for token in getattr(processor, "visible_special_tokens", ()):
            found = tokenizer.convert_tokens_to_ids(token)
            if isinstance(found, int) and tokenizer.convert_ids_to_tokens(found) == token:
                shown.add(found)
        self.hidden = ((special | set(tokenizer.all_special_ids)) - shown) | self.stops
        self.vocab = len(tokenizer)
        self.detokenizer = tokenizer.detokenizer

    def add(self, token: int) -> str:
        """The new text after ``token`` (a token that is not a stop id)."""
        if self.detokenizer is None:
            return ""
        if token not in self.hidden and token < self.vocab:
            self.detokenizer.add_token(token)
        return self.detokenizer.last_segment

    def finish(self) -> str:
        """The text held back until the end (an incomplete UTF-8 sequence)."""
        if self.detokenizer is None:
            return ""
        self.detokenizer.finalize()
        return self.detokenizer.last_segment


def prompt_pieces(length: int, step: int) -> list[tuple[int, int]]:
    """The pieces ``(start, end)`` a prompt of ``length`` positions is read in: chunks of
    ``step`` positions, then a last piece of at most ``step`` that ends with the prompt's last
    position (the forward that also gives the first logits)."""
    last = (length - 1) // step * step
    return [(start, min(start + step, last)) for start in range(0, last, step)] + [(last, length)]


def begin_reading(cache: PromptCache, embeddings: mx.array) -> None:
    """Tell ``cache`` how long the prompt it is about to read is (``embeddings`` [1, T,
    hidden]), so that every piece of it is rotated as the whole prompt will be."""
    cache.rope.expected = cache.offset + embeddings.shape[1]


def settle(cache: PromptCache, model: DecoderModel, options: SamplingOptions) -> None:
    """Evaluate what a piece of prompt wrote into ``cache`` (quantized with ``kv_bits``) and
    give the memory of its intermediates back."""
    if options.kv_bits:
        maybe_quantize_kv_cache(cache, 0, kv_group_size(model), options.kv_bits)
    mx.eval([layer.state for layer in cache])
    mx.clear_cache()


def prefill(
    model: DecoderModel,
    embeddings: mx.array,
    cache: PromptCache,
    options: SamplingOptions,
    end: int | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Feed the prompt positions ``embeddings[:, :end]`` (all by default) into ``cache`` one
    evaluated chunk of at most ``prefill_step_size`` positions at a time, every chunk rotated as
    the whole prompt will be; after each, yield the positions read so far and the chunk's
    final-norm hidden states (not evaluated). Stopping between chunks leaves the cache holding
    them."""
    end = embeddings.shape[1] if end is None else end
    begin_reading(cache, embeddings)
    step = options.prefill_step_size
    for start in range(0, end, step):
        done = min(start + step, end)
        h = model.hidden(embeddings[:, start:done], cache)
        settle(cache, model, options)
        yield done, h


def read_prompt(
    model: DecoderModel, embeddings: mx.array, cache: PromptCache, options: SamplingOptions
) -> Iterator[int]:
    """:func:`prefill` of all but the prompt's last piece (see :func:`prompt_pieces`: the
    forward that also yields the first logits reads it), yielding the number of positions read
    after each chunk."""
    last, _ = prompt_pieces(embeddings.shape[1], options.prefill_step_size)[-1]
    for done, _ in prefill(model, embeddings, cache, options, last):
        yield done


class StepModel:
    """What mlx-lm's ``generate_step`` calls: the prompt's last chunk, then sampled token ids.

    ``generate_step`` feeds a prompt's last position alone after the positions before it; here
    those wait and go through the model together with it in one forward, so a short prompt (a
    follow-up chat turn) reads the weights once, not twice. Only the last position's logits are
    computed. Token ids are embedded with MLX ops only, so decoding never waits on the host for
    the previous token and mlx-lm's asynchronous pipeline stays busy.
    """

    def __init__(self, model: DecoderModel, prompt_length: int):
        self.model = model
        self.unfed = prompt_length
        self.waiting: mx.array | None = None

    def __call__(
        self,
        inputs: mx.array,
        cache: PromptCache | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array | None:
        if input_embeddings is None:
            input_embeddings = self.model.embed_tokens(inputs)
        self.unfed -= input_embeddings.shape[1]
        if self.unfed == 1:  # the positions just before the prompt's last one: hold them
            self.waiting = input_embeddings
            return None
        if self.waiting is not None:
            input_embeddings = mx.concatenate([self.waiting, input_embeddings], axis=1)
            self.waiting = None
        return self.model.logits(self.model.hidden(input_embeddings, cache)[:, -1:])


def decode(
    model: DecoderModel,
    processor: Processor,
    ids: Sequence[int],
    embeddings: mx.array,
    cache: PromptCache,
    options: SamplingOptions,
    *,
    started: float,
    peak: PeakMemory,
    progress: Progress | None = None,
    context: Sequence[int] = (),
) -> Iterator[GenerationChunk]:
    """Prefill ``embeddings`` (the prompt positions not yet in ``cache``) and stream the answer.

    ``ids`` are those positions' ids (image slots negative), ``context`` the ids of the
    positions ``cache`` already holds (the repetition penalty sees them as generate() would);
    ``started`` is when the request began, for the time to first token, and ``peak`` watches
    its memory. The cache ends holding
    the prompt and every generated token fed back (a step cut short may leave some layers one
    position ahead: see ``PromptCache.offset``).
    """
    answer = AnswerText(processor)
    total = len(ids)

    def chunk(text: str, token: int | None, n: int, finish: str | None) -> GenerationChunk:
        now = time.perf_counter()
        return GenerationChunk(
            text=text,
            token=token,
            prompt_tokens=total,
            prompt_tps=total / max(first - started, 1e-9),
            generation_tokens=n,
            generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
            peak_memory=peak.gb,
            finish_reason=finish,
        )

    def last_chunk_done(done: int, chunk_total: int) -> None:
        if progress is not None and done == chunk_total:
            progress(total, total)

    first, token, count, finish = time.perf_counter(), None, 0, "length"
    with wired_limit([generation_stream]):
        done = 0
        with mx.stream(generation_stream):
            for done in read_prompt(model, embeddings, cache, options):
                if progress is not None:
                    progress(done, total)
        tail = ids[done:]
        steps = generate_step(
            mx.array(np.maximum(np.asarray(tail), 0), dtype=mx.int32),
            StepModel(model, len(tail)),
            max_tokens=options.max_tokens,
            sampler=make_sampler(options),
            logits_processors=make_logits_processors(options, before=[*context, *ids[:done]]),
            prompt_cache=cache,
            prefill_step_size=options.prefill_step_size,
            kv_bits=options.kv_bits,
            kv_group_size=kv_group_size(model) if options.kv_bits else 64,
            quantized_kv_start=0,
            prompt_progress_callback=last_chunk_done,
            input_embeddings=embeddings[0, done:],
        )
        text = ""
        for n, (token, _) in enumerate(steps):
            if n == 0:
                first = time.perf_counter()
            if token in answer.stops:
                finish = "stop"
                break
            count = n + 1
            text = answer.add(token)
            if count == options.max_tokens:
                break
            yield chunk(text, token, count, None)
            text = ""
    yield chunk(text + answer.finish(), token, count, finish)


def chat_prompt(
    processor: Processor,
    question: str,
    images: int = 0,
    system: str | None = None,
    audios: int = 0,
    thinking: str | None = None,
) -> str:
    """One question in the chat format, after ``system`` if given, with ``images`` images and
    then ``audios`` recordings ahead of it, unless it places them itself with ``<|image_N|>``
    (``<|audio_N|>``) tags; ``thinking`` is the answer's reasoning mode ("on", "off", "auto")
    for a model that has them."""
    if audios and getattr(processor, "audio_processor", None) is None:
        raise ValueError("this model reads no audio")
    messages = [{"role": "system", "content": system}] if system else []
    own_images, own_audios = IMAGE_TAG.search(question), AUDIO_TAG.search(question)
    if (own_images or not images) and (own_audios or not audios):
        messages.append({"role": "user", "content": question})
    else:
        parts = [{"type": "image"} for _ in range(0 if own_images else images)]
        parts += [{"type": "audio"} for _ in range(0 if own_audios else audios)]
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
    return render(processor, messages, thinking)[0]


def prepare(
    model: DecoderModel,
    processor: Processor,
    prompt: str | Sequence[int],
    images: Sequence[ImageInput] | ImageInput | None,
    num_crops: int | None,
    progress: Progress | None = None,
    media: dict[str, Any] | None = None,
) -> tuple[list[int], mx.array, str | None]:
    """Prompt ids (media slots negative), their input embeddings [1, T, hidden], and the
    adapter the sequence runs (``model.adapter_key``; None for most architectures).

    ``media`` are further inputs and options of an architecture whose model reads its
    processor's whole output (``model.encode``: Phi-4-multimodal's ``audios=``, ``dynamic_hd=``).
    """
    media = {k: v for k, v in (media or {}).items() if v is not None}
    encode = getattr(model, "encode", None)
    if encode is not None:
        if num_crops is not None:
            media["num_crops"] = num_crops
        inputs = processor(prompt, images=images, **media)
        ids = np.asarray(inputs["input_ids"]).reshape(-1).tolist()
        given = {k: v for k, v in inputs.items() if k != "input_ids"}
        key = model.adapter_key(given)
        between = None if progress is None else lambda: progress(0, len(ids))
        return ids, model.merge(mx.array([ids]), encode(given, between)), key
    if media:
        raise ValueError(f"{model.config.model_type} models take no {', '.join(sorted(media))}")
    if isinstance(prompt, str):
        inputs = processor(prompt, images=images, num_crops=num_crops)
        ids = np.asarray(inputs["input_ids"]).reshape(-1).tolist()
        pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
    else:
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        pixels = sizes = None
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            pre = processor.preprocess(images, num_crops)
            pixels, sizes = pre.pixel_values, pre.image_sizes
    features = []
    if pixels is not None:
        between = None if progress is None else lambda: progress(0, len(ids))
        features = model.encode_images(pixels, sizes, between_batches=between)
    return ids, model.merge(mx.array([ids]), features), None


def prompt_or_ids(prompt: str | Sequence[int] | None, input_ids: Sequence[int] | None) -> Any:
    """The prompt given either as ``prompt`` (text or ids) or as ``input_ids``, not both."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("give the prompt either as text (or ids) or as input_ids, not both")
    return prompt if input_ids is None else input_ids


def stream_generate(
    model: DecoderModel,
    processor: Processor,
    prompt: str | Sequence[int] | None = None,
    images: Sequence[ImageInput] | ImageInput | None = None,
    num_crops: int | None = None,
    *,
    input_ids: Sequence[int] | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> Iterator[GenerationChunk]:
    """Stream the answer to a prompt (a chat-formatted string, or token ids as ``prompt`` or
    ``input_ids``: used as given, no template or BOS added), one chunk per step.

    ``options`` are :class:`SamplingOptions` fields (``max_tokens``, ``temperature``, ``top_p``,
    ``min_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``kv_bits``, ``max_kv_size``,
    ``prefill_step_size``); any other keyword is a media input or option of an architecture that
    takes it (Phi-4-multimodal: ``audios``, ``dynamic_hd``, ``sampling_rate``). The concatenated
    chunk texts are the answer; no stop or special token is ever part of it (a checkpoint without
    a tokenizer answers in token ids only). ``progress(done, total)`` hears of the prompt being
    read, after each unit of work; an exception it raises stops the generation there.
    """
    prompt = prompt_or_ids(prompt, input_ids)
    sampling = {f.name for f in fields(SamplingOptions)}
    media = {k: options.pop(k) for k in list(options) if k not in sampling}
    settings = SamplingOptions(**options)
    started = time.perf_counter()
    peak = PeakMemory()
    try:
        ids, embeddings, adapter = prepare(
            model, processor, prompt, images, num_crops, progress, media
        )
        cache = model.make_cache(settings.max_kv_size)
        cache.adapter = adapter
        yield from decode(
            model, processor, ids, embeddings, cache, settings, started=started, peak=peak,
            progress=progress,
        )  # fmt: skip
    finally:
        peak.close()


def collect(chunks: Iterator[GenerationChunk], out: TextIO | None = None) -> GenerationResult:
    """Run a chunk stream to its end (echoing text to ``out`` if given) and sum it up."""
    texts, thoughts, tokens, last = [], [], [], None
    for last in chunks:
        texts.append(last.text)
        thoughts.append(last.reasoning)
        if last.token is not None and last.finish_reason != "stop":
            tokens.append(last.token)
        if out is not None and last.text:
            out.write(last.text)
            out.flush()
    if last is None:
        return GenerationResult(text="")
    return GenerationResult(
        text="".join(texts),
        tokens=tokens,
        prompt_tokens=last.prompt_tokens,
        generation_tokens=last.generation_tokens,
        prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps,
        peak_memory=last.peak_memory,
        finish_reason=last.finish_reason,
        reasoning="".join(thoughts),
    )


def summary(result: GenerationResult) -> str:
    """mlx-lm style statistics lines."""
    return (
        f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {result.generation_tokens} tokens, "
        f"{result.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {result.peak_memory:.3f} GB"
    )


def generate(
    model: DecoderModel,
    processor: Processor,
    prompt: str | Sequence[int] | None = None,
    images: Sequence[ImageInput] | ImageInput | None = None,
    num_crops: int | None = None,
    *,
    input_ids: Sequence[int] | None = None,
    verbose: bool = False,
    **options: Any,
) -> GenerationResult:
    """The whole answer to a prompt (``options`` as for :func:`stream_generate`); with
    ``verbose`` it is printed as it comes, then statistics."""
    chunks = stream_generate(
        model, processor, prompt, images, num_crops, input_ids=input_ids, **options
    )
    result = collect(chunks, sys.stdout if verbose else None)
    if verbose:
        print("\n==========")
        print(summary(result))
    return result
