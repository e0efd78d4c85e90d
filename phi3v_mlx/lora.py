"""Fine-tuning with low-rank adapters (LoRA, DoRA; QLoRA on a quantized base) on conversations
with images: the data, the loss, the training loop and ``phi3v lora``'s run.

The layers, optimizers and adapter files are mlx-lm's (see :mod:`phi3v_mlx.adapters`); the data,
the loss (assistant tokens only) and the loop are this model's: images go through the frozen
vision tower once, and each step reads the decoder with the cached image embeddings in their
slots.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterSettings,
    adapter_config,
    add_adapters,
    load_adapter_weights,
    save_adapter_weights,
)
from .keys import image_digest
from .models.base import DecoderModel
from .processor import IMAGE_TAG, Processor

END_OF_TURN = 32007


class DataError(ValueError):
    """A training row that cannot be used, named by its file and line."""


@dataclass
class Example:
    """One conversation: its ids (image slots negative), which positions are assistant tokens
    to learn, and the keys of its images (in order)."""

    ids: list[int]
    learn: list[bool]
    image_keys: list[tuple[str, int]]


@dataclass
class TrainSettings:
    """How training runs."""

    iters: int = 100
    batch_size: int = 1
    learning_rate: float = 1e-5
    steps_per_report: int = 10
    steps_per_eval: int = 50
    val_batches: int = 25
    save_every: int = 100
    grad_checkpoint: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


# ---------------------------------------------------------------- data


def _parse_row(line: str, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise DataError(f"{where}: a row must be an object with a messages list")
    messages, images = row["messages"], row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError(f"{where}: images must be a list of paths")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "user",
            "assistant",
        ):
            raise DataError(f"{where}: every message needs a role: system, user or assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    return messages, images


def _learned_positions(
    processor: Processor, messages: list[dict[str, Any]], counts: list[int], ids: list[int]
) -> list[bool]:
    """Per position, whether it is an assistant token to learn: each assistant message's
    content and the <|end|> that closes it."""
    learn = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = processor.apply_chat_template(messages[:i], add_generation_prompt=True)
        named = len(IMAGE_TAG.findall(before)) if processor.vision else 0
        start = len(processor.tokenize(before, counts[:named]))
        end = next((t + 1 for t in range(start, len(ids)) if ids[t] == END_OF_TURN), len(ids))
        for t in range(start, end):
            learn[t] = True
    return learn


def load_dataset(
    path: str | Path,
    processor: Processor,
    num_crops: int | None,
    max_seq_length: int,
) -> tuple[list[Example], dict[tuple[str, int], Any]]:
    """The rows of a JSONL file as examples, and their distinct images by key; every problem is
    a :class:`DataError` naming the file and line, raised before any training."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    crops = processor.crops(num_crops)
    examples, images = [], {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        messages, paths = _parse_row(line, where)
        try:
            loaded = processor.load_images([path.parent / p for p in paths])
            counts = [processor.image_tokens(image, crops) for image in loaded]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=False)
            ids = processor.tokenize(prompt, counts)
            learn = _learned_positions(processor, messages, counts, ids)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ids) > max_seq_length:
            raise DataError(
                f"{where}: {len(ids):,} tokens, over --max-seq-length {max_seq_length:,}"
            )
        keys = [(image_digest(image), crops) for image in loaded]
        images.update(zip(keys, loaded, strict=True))
        examples.append(Example(ids, learn, keys))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples, images


def encode_dataset_images(
    model: DecoderModel,
    processor: Processor,
    images: dict[tuple[str, int], Any],
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, int], mx.array]:
    """Each distinct image's embeddings, computed once (the vision tower is frozen)."""
    features = {}
    for i, (key, image) in enumerate(images.items()):
        pre = processor.preprocess([image], key[1])
        (features[key],) = model.encode_images(pre.pixel_values, pre.image_sizes)
        mx.eval(features[key])
        if progress is not None:
            progress(i + 1, len(images))
    return features


# ---------------------------------------------------------------- training


def _batch(
    model: DecoderModel, examples: Sequence[Example], features: dict[tuple[str, int], mx.array]
) -> tuple[mx.array, mx.array, mx.array, list[int]]:
    """Input embeddings [B, T, hidden] (right-padded), targets [B, T-1], target mask, and each
    row's length."""
    width = max(len(e.ids) for e in examples)
    rows, targets, masks = [], [], []
    for example in examples:
        pad = width - len(example.ids)
        embedded = model.merge(mx.array([example.ids]), [features[k] for k in example.image_keys])
        if pad:
            embedded = mx.pad(embedded, [(0, 0), (0, pad), (0, 0)])
        rows.append(embedded)
        ids = np.maximum(np.asarray(example.ids + [0] * pad), 0)
        targets.append(ids[1:])
        masks.append(np.asarray(example.learn + [False] * pad)[1:])
    return (
        mx.concatenate(rows, axis=0),
        mx.array(np.stack(targets), dtype=mx.int32),
        mx.array(np.stack(masks)),
        [len(e.ids) for e in examples],
    )


def loss(model: DecoderModel, batch: tuple, checkpoint: bool = False) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the assistant tokens of a batch, and how many there are (the
    LM head reads only the positions that predict one)."""
    embeddings, targets, mask, lengths = batch
    width = embeddings.shape[-1]
    rows = mx.array(np.flatnonzero(np.array(mask)), dtype=mx.int32)
    hidden = model.training_hidden(embeddings, lengths, checkpoint)
    logits = model.logits(hidden[:, :-1].reshape(-1, width)[rows]).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets.reshape(-1)[rows])
    return losses.mean(), mx.array(rows.shape[0])


def _batches(examples: list[Example], size: int, seed: int) -> Iterator[list[Example]]:
    """Shuffled batches, epoch after epoch."""
    order = random.Random(seed)
    while True:
        indices = list(range(len(examples)))
        order.shuffle(indices)
        for start in range(0, len(indices), size):
            yield [examples[i] for i in indices[start : start + size]]


def evaluate(
    model: DecoderModel,
    examples: list[Example],
    features: dict[tuple[str, int], mx.array],
    batch_size: int,
    max_batches: int,
) -> float:
    """Mean loss per assistant token over (up to ``max_batches`` of) ``examples``."""
    total, count = 0.0, 0
    for i in range(0, min(len(examples), max_batches * batch_size), batch_size):
        value, tokens = loss(model, _batch(model, examples[i : i + batch_size], features))
        total += float(value.item()) * float(tokens.item())
        count += int(tokens.item())
    return total / max(count, 1)


@dataclass
class Report:
    """One line of ``metrics.jsonl``."""

    iteration: int
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    peak_memory_gb: float | None = None

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def train(
    model: DecoderModel,
    train_set: list[Example],
    val_set: list[Example],
    features: dict[tuple[str, int], mx.array],
    settings: TrainSettings,
    adapter_file: Path,
    *,
    start: int = 0,
    report: Callable[[Report], None] | None = None,
    step_done: Callable[[int], None] | None = None,
) -> list[Report]:
    """Train the adapter layers for ``settings.iters`` steps (numbered on from ``start``),
    reporting train loss every ``steps_per_report`` steps and validation loss every
    ``steps_per_eval``, saving the adapter every ``save_every`` steps and at the end."""
    optimizer = optim.Adam(learning_rate=settings.learning_rate, bias_correction=True)
    step = nn.value_and_grad(model, lambda m, b: loss(m, b, settings.grad_checkpoint))
    batches = _batches(train_set, settings.batch_size, settings.seed + start)
    reports: list[Report] = []

    def emit(entry: Report) -> None:
        reports.append(entry)
        if report is not None:
            report(entry)

    model.train()
    losses, tokens, started = [], 0, time.perf_counter()
    mx.reset_peak_memory()
    for iteration in range(start + 1, start + settings.iters + 1):
        batch = _batch(model, next(batches), features)
        (value, count), grads = step(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, value, count)
        losses.append(float(value.item()))
        tokens += int(count.item())
        last = iteration == start + settings.iters
        if iteration % settings.steps_per_report == 0 or last:
            seconds = time.perf_counter() - started
            emit(Report(iteration, train_loss=float(np.mean(losses)),
                        learning_rate=settings.learning_rate,
                        tokens_per_second=tokens / max(seconds, 1e-9),
                        peak_memory_gb=mx.get_peak_memory() / 1e9))  # fmt: skip
            losses, tokens, started = [], 0, time.perf_counter()
        if val_set and (iteration % settings.steps_per_eval == 0 or last):
            model.eval()
            value = evaluate(model, val_set, features, settings.batch_size, settings.val_batches)
            model.train()
            emit(Report(iteration, val_loss=value))
        if iteration % settings.save_every == 0 or last:
            save_adapter_weights(model, adapter_file, iteration)
            if not last:
                numbered = adapter_file.with_name(f"{iteration:07d}_{adapter_file.name}")
                save_adapter_weights(model, numbered, iteration)
        if step_done is not None:
            step_done(iteration)
    model.eval()
    return reports


# ---------------------------------------------------------------- phi3v lora


def fine_tune(
    load_weights: Callable[[], DecoderModel],
    processor: Processor,
    data: Path,
    adapter_path: Path,
    adapter: AdapterSettings,
    schedule: TrainSettings,
    *,
    val_data: Path | None = None,
    resume_adapter_file: Path | None = None,
    num_crops: int | None = None,
    max_seq_length: int = 4096,
    recorded: dict[str, Any] | None = None,
    encoding: Callable[[int, int], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    report: Callable[[Report], None] | None = None,
) -> tuple[int, dict[str, Any]]:
    """``phi3v lora``: check every row, then load the weights (``load_weights()``), put the
    adapter on them (going on from ``resume_adapter_file``), train, and save the adapter, its
    config (with the run's ``recorded`` settings) and ``metrics.jsonl`` in ``adapter_path``.

    ``encoding(done, total)`` hears of the images encoded, ``progress(done, total, status)`` of
    each step (status: iteration, loss, learning rate, speed), ``report`` of each metrics row.
    Returns the iteration trained from and the last value of every metric."""
    if resume_adapter_file is not None and not resume_adapter_file.is_file():
        raise ValueError(f"--resume-adapter-file {resume_adapter_file}: no such file")
    train_set, images = load_dataset(data, processor, num_crops, max_seq_length)
    val_set = []
    if val_data is not None:
        val_set, val_images = load_dataset(val_data, processor, num_crops, max_seq_length)
        images.update(val_images)
    model = load_weights()
    mx.random.seed(schedule.seed)
    add_adapters(model, adapter)
    start = 0
    if resume_adapter_file is not None:
        start = load_adapter_weights(model, resume_adapter_file)
    adapter_path.mkdir(parents=True, exist_ok=True)
    config = adapter_config(adapter, **(recorded or {}))
    (adapter_path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    last: dict[str, Any] = {}
    with (adapter_path / "metrics.jsonl").open("a" if start else "w", encoding="utf-8") as metrics:

        def write(entry: Report) -> None:
            metrics.write(json.dumps(entry.row()) + "\n")
            metrics.flush()
            last.update(entry.row())
            if report is not None:
                report(entry)

        def step_done(iteration: int) -> None:
            if progress is not None:
                status = (
                    f"it {iteration}, loss {last.get('train_loss', float('nan')):.3f}, "
                    f"lr {schedule.learning_rate:g}, {last.get('tokens_per_second', 0):.1f} tok/s"
                )
                progress(iteration - start, schedule.iters, status)

        features = encode_dataset_images(model, processor, images, encoding)
        train(model, train_set, val_set, features, schedule, adapter_path / ADAPTER_WEIGHTS,
              start=start, report=write, step_done=step_done)  # fmt: skip
    return start, last
