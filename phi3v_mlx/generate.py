"""Text generation with images: prompt building, prefill and streamed decoding over mlx-lm."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, generation_stream, wired_limit
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .model import Model
from .processor import ImageInput, Processor

# <|end|>, <|endoftext|> and </s>: Phi-3 chat models end a turn with any of them.
STOP_TOKENS = (32007, 32000, 2)


@dataclass
class GenerationChunk:
    """One decoding step: the new text (possibly empty) and the running statistics."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """A finished generation; ``tokens`` are the generated ids without the stop token."""

    text: str
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None


@dataclass
class SamplingOptions:
    """How tokens are drawn and how the cache is kept during one generation."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    kv_bits: int | None = None
    max_kv_size: int | None = None
    prefill_step_size: int = 2048
    progress: Callable[[int, int], None] | None = None

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.kv_bits is not None and self.kv_bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8, got {self.kv_bits}")
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")


class StepModel:
    """What mlx-lm's ``generate_step`` calls: prompt embeddings, then sampled token ids.

    mlx-lm feeds a prompt's last position on its own after the rest; here the chunk before it
    waits and both go through the model in one forward, so a short prompt (a follow-up chat
    turn) reads the weights once, not twice. Only the last position's logits are computed.
    Token ids are embedded with MLX ops only, so decoding never waits on the host for the
    previous token and mlx-lm's asynchronous pipeline stays busy.
    """

    def __init__(self, model: Model, prompt_length: int):
        self.model = model
        self.unfed = prompt_length
        self.waiting: mx.array | None = None

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array | None:
        language = self.model.language
        if input_embeddings is None:
            input_embeddings = language.embed(inputs)
        self.unfed -= input_embeddings.shape[1]
        if self.unfed == 1:  # the chunk just before the prompt's last position: hold it
            self.waiting = input_embeddings
            return None
        if self.waiting is not None:
            input_embeddings = mx.concatenate([self.waiting, input_embeddings], axis=1)
            self.waiting = None
        return language(input_embeddings, cache, last_only=True)


def stop_token_ids(processor: Processor) -> set[int]:
    """Ids that end an answer: the Phi-3 turn ends and the checkpoint's configured eos."""
    return {*STOP_TOKENS, *processor.tokenizer.eos_token_ids}


def hidden_token_ids(processor: Processor) -> set[int]:
    """Ids never shown as text: special added tokens."""
    tokenizer = processor.tokenizer
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return special | set(tokenizer.all_special_ids) | stop_token_ids(processor)


def kv_group_size(model: Model) -> int:
    """The largest KV-cache quantization group that divides the head size."""
    for size in (128, 64, 32):
        if model.config.head_dim % size == 0:
            return size
    raise ValueError(
        f"kv_bits needs a head size divisible by 32, this model has {model.config.head_dim}"
    )


def decode(
    model: Model,
    processor: Processor,
    ids: Sequence[int],
    embeddings: mx.array,
    cache: list[Any],
    options: SamplingOptions,
    started: float,
) -> Iterator[GenerationChunk]:
    """Prefill ``embeddings`` (the prompt positions not yet in ``cache``) and stream the answer.

    ``ids`` are those positions' ids (image slots negative). ``started`` is when the request
    began, for the time to first token. The cache ends holding every yielded token.
    """
    if options.seed is not None:
        mx.random.seed(options.seed)
    history = cache[-1]
    if hasattr(history, "expected"):
        history.expected = cache[0].offset + len(ids)
    stops = stop_token_ids(processor)
    hidden = hidden_token_ids(processor)
    vocab = len(processor.tokenizer)
    detokenizer = processor.tokenizer.detokenizer
    steps = generate_step(
        mx.array(np.maximum(np.asarray(ids), 0), dtype=mx.int32),
        StepModel(model, len(ids)),
        max_tokens=options.max_tokens,
        sampler=make_sampler(options.temperature, options.top_p, options.min_p),
        logits_processors=make_logits_processors(repetition_penalty=options.repetition_penalty),
        prompt_cache=cache,
        prefill_step_size=options.prefill_step_size,
        kv_bits=options.kv_bits,
        kv_group_size=kv_group_size(model) if options.kv_bits else 64,
        quantized_kv_start=0,
        prompt_progress_callback=options.progress,
        input_embeddings=embeddings[0],
    )

    def chunk(text: str, token: int | None, n: int, finish: str | None) -> GenerationChunk:
        now = time.perf_counter()
        return GenerationChunk(
            text=text,
            token=token,
            prompt_tokens=len(ids),
            prompt_tps=len(ids) / max(first - started, 1e-9),
            generation_tokens=n,
            generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )

    first, token, count, finish = time.perf_counter(), None, 0, "length"
    with wired_limit(model, [generation_stream]):
        for n, (token, _) in enumerate(steps):
            if n == 0:
                first = time.perf_counter()
            if token in stops:
                finish = "stop"
                break
            count = n + 1
            if token not in hidden and token < vocab:
                detokenizer.add_token(token)
            if count == options.max_tokens:
                break
            yield chunk(detokenizer.last_segment, token, count, None)
    detokenizer.finalize()
    yield chunk(detokenizer.last_segment, token, count, finish)


def prepare(
    model: Model,
    processor: Processor,
    prompt: str | Sequence[int],
    images: Sequence[ImageInput] | ImageInput | None,
    num_crops: int | None,
) -> tuple[list[int], mx.array]:
    """Prompt ids (image slots negative) and their input embeddings [1, T, hidden]."""
    if isinstance(prompt, str):
        inputs = processor(prompt, images=images, num_crops=num_crops)
        ids = np.asarray(inputs["input_ids"]).reshape(-1).tolist()
        return ids, model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    if images is None:
        return ids, model.embed(mx.array([ids]))
    images = images if isinstance(images, (list, tuple)) else [images]
    pre = processor.preprocess(images, num_crops)
    return ids, model.embed(mx.array([ids]), pre.pixel_values, pre.image_sizes)


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: str | Sequence[int],
    images: Sequence[ImageInput] | ImageInput | None = None,
    num_crops: int | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
    prefill_step_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[GenerationChunk]:
    """Stream the answer to a prompt (a chat-formatted string or token ids), one chunk per step.

    The concatenated chunk texts are the answer; no stop or special token is ever part of it.
    """
    options = SamplingOptions(
        max_tokens, temperature, top_p, min_p, repetition_penalty, seed, kv_bits, max_kv_size,
        prefill_step_size, progress,
    )  # fmt: skip
    started = time.perf_counter()
    mx.reset_peak_memory()
    ids, embeddings = prepare(model, processor, prompt, images, num_crops)
    cache = model.make_cache(options.max_kv_size)
    yield from decode(model, processor, ids, embeddings, cache, options, started)


def collect(chunks: Iterator[GenerationChunk], out: TextIO | None = None) -> GenerationResult:
    """Run a chunk stream to its end (echoing text to ``out`` if given) and sum it up."""
    texts, tokens, last = [], [], None
    for last in chunks:
        texts.append(last.text)
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
    model: Model,
    processor: Processor,
    prompt: str | Sequence[int],
    images: Sequence[ImageInput] | ImageInput | None = None,
    num_crops: int | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    kv_bits: int | None = None,
    max_kv_size: int | None = None,
    prefill_step_size: int = 2048,
    verbose: bool = False,
) -> GenerationResult:
    """The whole answer to a prompt; with ``verbose`` it is printed as it comes, then statistics."""
    chunks = stream_generate(
        model, processor, prompt, images, num_crops, max_tokens, temperature, top_p, min_p,
        repetition_penalty, seed, kv_bits, max_kv_size, prefill_step_size,
    )  # fmt: skip
    result = collect(chunks, sys.stdout if verbose else None)
    if verbose:
        print("\n==========")
        print(summary(result))
    return result
