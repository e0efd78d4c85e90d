"""Fine-tuning with low-rank adapters (LoRA, DoRA; QLoRA on a quantized base) on conversations
with images, in mlx-lm's adapter format, and fusing an adapter into a checkpoint.

The layers, optimizers and adapter files are mlx-lm's; the data, the loss (assistant tokens only)
and the loop are this model's: images go through the frozen vision tower once, and each step
reads the decoder with the cached image embeddings in their slots.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .models.base import DecoderModel
from .processor import IMAGE_TAG, Processor
from .session import image_digest

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
END_OF_TURN = 32007
DEFAULT_TARGETS = {
    "phimoe": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "default": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}


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
class AdapterSettings:
    """The adapter's shape: mlx-lm's ``lora_parameters`` and where they go."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1
    fine_tune_type: str = "lora"
    targets: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.fine_tune_type not in ("lora", "dora"):
            raise ValueError(f"fine_tune_type must be lora or dora, got {self.fine_tune_type!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


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


# ---------------------------------------------------------------- adapters


def add_adapters(model: DecoderModel, settings: AdapterSettings) -> None:
    """Freeze the model and put mlx-lm's LoRA (or DoRA) layers on the targets: modules of the
    decoder layers (``self_attn.qkv_proj``...) or whole-model ones by official name
    (``lm_head``). A quantized layer stays quantized under its adapter (QLoRA)."""
    targets = settings.targets or DEFAULT_TARGETS.get(
        model.config.model_type, DEFAULT_TARGETS["default"]
    )
    in_layers = {path for path, _ in model.layers[0].named_modules() if path}
    whole = {model.official_name(f"{path}."): path for path, _ in model.named_modules() if path}
    keys = []
    for target in targets:
        if target in in_layers:
            keys.append(target)
        elif f"{target}." in whole and not target.startswith("model.vision_embed_tokens"):
            keys.append(whole[f"{target}."])
        else:
            raise ValueError(
                f"no module {target!r} to adapt: name one of a decoder layer's "
                f"({', '.join(sorted(in_layers))}) or of the model (lm_head, ...)"
            )
    model.freeze()
    settings.targets = list(targets)
    parameters = {"rank": settings.rank, "scale": settings.scale, "dropout": settings.dropout}
    linear_to_lora_layers(
        model,
        settings.num_layers,
        {**parameters, "keys": keys},
        use_dora=settings.fine_tune_type == "dora",
    )


def adapter_config(settings: AdapterSettings, **extra: Any) -> dict[str, Any]:
    """``adapter_config.json`` in mlx-lm's format (plus this run's own settings)."""
    return {
        "fine_tune_type": settings.fine_tune_type,
        "num_layers": settings.num_layers,
        "lora_parameters": {
            "rank": settings.rank,
            "scale": settings.scale,
            "dropout": settings.dropout,
            "keys": settings.targets,
        },
        **extra,
    }


def save_adapter_weights(model: DecoderModel, file: Path, iteration: int) -> None:
    """The adapter's tensors under their official names (as mlx-lm names them for its own Phi-3
    models), with the iteration they were saved at; written whole or not at all."""
    weights = {model.official_name(k): v for k, v in tree_flatten(model.trainable_parameters())}
    partial = file.with_name(f".partial-{file.name}")
    mx.save_safetensors(str(partial), weights, {"iteration": str(iteration)})
    partial.replace(file)


def load_adapter_weights(model: DecoderModel, file: Path) -> int:
    """Load adapter tensors into a model that has its adapter layers; returns the iteration
    they were saved at (0 if unknown)."""
    if not file.is_file():
        raise ValueError(f"no adapter weights at {file}")
    weights, metadata = mx.load(str(file), return_metadata=True)
    expected = dict(tree_flatten(model.trainable_parameters()))
    named = {model.internal_name(k): v for k, v in weights.items()}
    for name, value in named.items():
        if name not in expected:
            raise ValueError(f"{file}: {model.official_name(name)} is not an adapter of this model")
        if value.shape != expected[name].shape:
            raise ValueError(
                f"{file}: {model.official_name(name)} has shape {list(value.shape)}, the model's "
                f"adapter has {list(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(named))
    if missing:
        raise ValueError(f"{file} lacks {model.official_name(missing[0])}")
    model.load_weights(list(named.items()), strict=False)
    return int(metadata.get("iteration", 0))


def load_adapter(model: DecoderModel, adapter_path: str | Path) -> AdapterSettings:
    """Put the adapter saved in ``adapter_path`` on the model (see :func:`phi3v_mlx.load`)."""
    folder = Path(adapter_path).expanduser()
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ValueError(f"no {ADAPTER_CONFIG} in {folder}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        lora = config["lora_parameters"]
        settings = AdapterSettings(
            rank=int(lora["rank"]),
            scale=float(lora["scale"]),
            dropout=float(lora.get("dropout", 0.0)),
            num_layers=int(config["num_layers"]),
            fine_tune_type=config.get("fine_tune_type", "lora"),
            targets=list(lora.get("keys") or []),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_file} is not an adapter config: {e}") from None
    add_adapters(model, settings)
    load_adapter_weights(model, folder / ADAPTER_WEIGHTS)
    model.eval()
    return settings


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


# ---------------------------------------------------------------- fusing


@dataclass
class FuseReport:
    """How close the fused model is to base + adapter, and how far the adapter moves the base
    (so that an adapter lost in fusing shows: the fused model would sit where the base does)."""

    positions: int
    top1_agreement: float
    mean_kl: float
    base_top1_agreement: float
    base_mean_kl: float

    def __str__(self) -> str:
        return (
            f"Fused vs base + adapter on {self.positions} calibration positions: top-1 agreement "
            f"{100 * self.top1_agreement:.1f}%, mean KL {self.mean_kl:.4g} nats "
            f"(the base alone: {100 * self.base_top1_agreement:.1f}%, "
            f"{self.base_mean_kl:.4g} nats)"
        )


def fuse(
    model_path: str | Path,
    adapter_path: str | Path,
    save_path: str | Path,
    *,
    dequantize: bool = False,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    check_progress: Callable[[int, int], None] | None = None,
) -> FuseReport:
    """Fuse an adapter into its base and write the result as the converter writes checkpoints.

    Every adapted layer is fused in float32 (a quantized base is dequantized first); the result
    is quantized again as the base was (or as ``quantize`` asks), or kept unquantized with
    ``dequantize``. The report compares the fused model with base + adapter."""
    from .convert import (
        agreement,
        calibration_inputs,
        calibration_log_probs,
        check_dtype,
        convert,
        counter,
    )
    from .loader import load_model, load_processor, resolve

    base = resolve(model_path)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization") or {}
    if quantize and dequantize:
        raise ValueError("--dequantize and --quantize exclude each other")
    model = load_model(base, "float32")
    load_adapter(model, adapter_path)
    fused = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRASwitchLinear, DoRALinear)):
            dense = module.fuse(dequantize=True)
            fused[model.official_name(f"{path}.weight")] = dense.weight.astype(mx.float32)
    del model
    requantize = quantize or (bool(quantization) and not dequantize)
    bits = q_bits or quantization.get("bits", 4)
    group = q_group_size or quantization.get("group_size", 64)
    convert(
        base, save_path, quantize=requantize, dequantize=bool(quantization) and not requantize,
        q_bits=bits, q_group_size=group, dtype=dtype, force=force, check=False, replace=fused,
        log=log, progress=progress,
    )  # fmt: skip
    save_path = Path(save_path).expanduser()
    log("Comparing the fused model with base + adapter on the calibration prompts")
    compute = check_dtype(base, None)
    inputs = calibration_inputs(load_processor(base))
    advance = counter(3 * sum(item["input_ids"].shape[1] for item in inputs), check_progress)
    cpu = not mx.metal.is_available()

    def adapted(d: str | None) -> DecoderModel:
        loaded = load_model(base, d)
        load_adapter(loaded, adapter_path)
        return loaded

    reference = calibration_log_probs(adapted, inputs, compute, cpu, advance)
    merged = calibration_log_probs(lambda d: load_model(save_path, d), inputs, compute, cpu,
                                   advance)  # fmt: skip
    alone = calibration_log_probs(lambda d: load_model(base, d), inputs, compute, cpu, advance)
    report = FuseReport(len(reference), *agreement(reference, merged), *agreement(reference, alone))
    log(str(report))
    return report
