"""How closely one model's next-token distributions follow another's on built-in calibration
prompts: the converter's fidelity report and fuse's check of a fused adapter."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.utils import dequantize_model

from .generate import SamplingOptions, prefill
from .loader import DTYPES, load_model, load_processor
from .models.base import DecoderModel

CALIBRATION_PROMPTS = [
    "<|user|>\nExplain why the sky is blue in two sentences.<|end|>\n<|assistant|>\n",
    "<|user|>\nWrite a short Python function that reverses a string.<|end|>\n<|assistant|>\n",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nList three uses of copper."
    "<|end|>\n<|assistant|>\nCopper is used in",
]
IMAGE_QUESTION = "What shapes are in this picture?"
SCORED_POSITIONS = 64  # per prompt, the last ones

ModelLoader = Callable[[str | None], DecoderModel]  # the model, computing in the given dtype


@dataclass
class FidelityReport:
    """How closely a converted model's next-token distributions follow the source's."""

    positions: int
    top1_agreement: float
    mean_kl: float
    source_bytes: int
    converted_bytes: int

    def __str__(self) -> str:
        gb = 1e9
        return (
            f"Fidelity on {self.positions} calibration positions: top-1 agreement "
            f"{100 * self.top1_agreement:.1f}%, mean KL {self.mean_kl:.4g} nats\n"
            f"Size: {self.source_bytes / gb:.3f} GB -> {self.converted_bytes / gb:.3f} GB"
        )


def calibration_image() -> np.ndarray:
    """A deterministic synthetic picture: a colour gradient with a disc and a bar."""
    y, x = np.mgrid[0:360, 0:480]
    image = np.stack([x * 255 // 479, y * 255 // 359, (x + y) * 255 // 838], -1)
    image[(x - 150) ** 2 + (y - 180) ** 2 < 70**2] = (230, 40, 40)
    image[60:100, 260:440] = (20, 20, 200)
    return image.astype(np.uint8)


def calibration_inputs(processor: Any) -> list[dict[str, Any]]:
    """The calibration prompts as model inputs, for a vision model the image prompt last."""
    inputs = [processor(p) for p in CALIBRATION_PROMPTS]
    if processor.vision:
        content = [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}])
        # The fewest crops where the model crops images; a model that sizes them otherwise
        # (its default is None) takes no num_crops.
        crops = {} if processor.crops(None) is None else {"num_crops": 1}
        inputs.append(processor(prompt, images=[calibration_image()], **crops))
    return inputs


def calibration_log_probs(
    load: ModelLoader,
    inputs: list[dict[str, Any]],
    dtype: str | None,
    dense: bool,
    advance: Callable[[int], None],
) -> np.ndarray:
    """Next-token log-probabilities [positions, vocab] of a model at the last positions of each
    input, the prompt read in prefill chunks (``advance(positions)`` after each); with
    ``dense`` its quantized layers are expanded first. The model is freed after."""
    model = load(dtype)
    if dense:
        dequantize_model(model)
    options = SamplingOptions()
    out = []
    for item in inputs:
        embeddings = model.embed(**item)
        total = embeddings.shape[1]
        scored, read = [], 0
        for done, h in prefill(model, embeddings, model.make_cache(), options):
            skip = max(total - SCORED_POSITIONS - read, 0)
            if skip < h.shape[1]:
                scored.append(h[:, skip:])
                mx.eval(scored)
            advance(done - read)
            read = done
        logits = model.logits(mx.concatenate(scored, axis=1)).astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0])
    del model
    mx.clear_cache()
    return np.concatenate(out)


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || other) of two log-probability arrays."""
    top1 = float((reference.argmax(-1) == other.argmax(-1)).mean())
    kl = float((np.exp(reference) * (reference - other)).sum(-1).mean())
    return top1, kl


def comparison_dtype(source: Path, dtype: str | None) -> str | None:
    """The dtype a comparison computes in: ``dtype`` if given, float32 on the CPU backend
    (where 16-bit and quantized products are slow), else the source's stored dtype."""
    if dtype is not None:
        return dtype
    if not mx.metal.is_available():
        return "float32"
    value = json.loads((source / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    return value if value in DTYPES else None


def counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """``advance(amount)`` that reports the running sum out of ``total``."""
    done = 0

    def advance(amount: int) -> None:
        nonlocal done
        done += amount
        if progress is not None:
            progress(done, total)

    return advance


def compare(
    source: Path,
    reference: ModelLoader,
    others: Sequence[ModelLoader],
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, list[tuple[float, float]]]:
    """The calibration positions scored and, for each of ``others``, its top-1 agreement and
    mean KL(reference || other) over the built-in calibration (tokenized by ``source``'s
    processor). Every model computes in :func:`comparison_dtype`'s dtype, one at a time; on the
    CPU backend quantized layers are expanded (the same arithmetic, far faster there).
    ``progress(done, total)`` counts prompt positions read by all the models."""
    dtype = comparison_dtype(source, dtype)
    inputs = calibration_inputs(load_processor(source))
    positions = sum(item["input_ids"].shape[1] for item in inputs)
    advance = counter((1 + len(others)) * positions, progress)
    dense = not mx.metal.is_available()
    want = calibration_log_probs(reference, inputs, dtype, dense, advance)
    scores = [
        agreement(want, calibration_log_probs(other, inputs, dtype, dense, advance))
        for other in others
    ]
    return len(want), scores


def folder_bytes(path: Path) -> int:
    """Bytes of the safetensors weights in a folder."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def fidelity(
    source: Path,
    converted: Path,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FidelityReport:
    """Top-1 agreement and mean KL(source || converted) over the built-in calibration (see
    :func:`compare`)."""
    positions, [(top1, kl)] = compare(
        source,
        lambda d: load_model(source, d),
        [lambda d: load_model(converted, d)],
        dtype,
        progress,
    )
    return FidelityReport(positions, top1, kl, folder_bytes(source), folder_bytes(converted))
