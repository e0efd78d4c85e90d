"""Convert Hugging Face (or MLX) Phi-3-Vision weights to MLX, optionally quantized."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .config import ModelConfig
from .loader import DTYPES, check_weights, read_weights, resolve, weight_files
from .model import Model

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
SHARD_BYTES = 5 * 2**30
COPIED_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
]
SAFETENSORS_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint8: "U8",
    mx.int64: "I64",
    mx.bool_: "BOOL",
}


class ConvertError(ValueError):
    """A conversion that cannot be done."""


def _source_weights(path: Path, config: dict[str, Any], skeleton: Model) -> dict[str, mx.array]:
    """Every tensor of the source under this package's names, dequantized, still unread."""
    weights = skeleton.sanitize(read_weights(weight_files(path)))
    quantization = config.get("quantization")
    if quantization:
        for name in [n for n in weights if n.endswith(".scales")]:
            base = name[: -len(".scales")]
            own = quantization.get(base)
            params = own if isinstance(own, dict) else quantization
            weights[f"{base}.weight"] = mx.dequantize(
                weights[f"{base}.weight"],
                weights.pop(name).astype(mx.float32),
                weights.pop(f"{base}.biases").astype(mx.float32),
                group_size=params["group_size"],
                bits=params["bits"],
                mode=params.get("mode", "affine"),
            )
    check_weights(skeleton, weights, path)
    return weights


def _quantizable(skeleton: Model, quantize_vision: bool) -> dict[str, int]:
    """Paths of the layers to quantize and their input widths."""
    paths = {}
    for path, module in skeleton.named_modules():
        if not hasattr(module, "to_quantized") or not path:
            continue
        if path.startswith("vision.") and not quantize_vision:
            continue
        paths[path] = module.weight.shape[-1]
    return paths


def plan_tensors(
    weights: dict[str, mx.array],
    quantizable: dict[str, int],
    dtype: mx.Dtype,
    bits: int | None,
    group_size: int,
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """The output tensors (lazy) and the per-module quantization entries that differ.

    ``weights`` is emptied, so that a source tensor is freed once its output is written.
    """
    out: dict[str, mx.array] = {}
    modules: dict[str, Any] = {}
    for name in sorted(weights):
        value = weights.pop(name)
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        path = name[: -len(".weight")] if name.endswith(".weight") else None
        if bits is None or path not in quantizable:
            out[name] = value
            continue
        group = next((g for g in (group_size, 64, 32) if quantizable[path] % g == 0), None)
        if group is None:
            modules[path] = False
            out[name] = value
            continue
        if group != group_size:
            modules[path] = {"group_size": group, "bits": bits}
        out[name], out[f"{path}.scales"], out[f"{path}.biases"] = mx.quantize(value, group, bits)
    return out, modules


def save_safetensors(
    path: Path,
    tensors: dict[str, mx.array],
    fmt: str = "mlx",
    written: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file, computing one tensor at a time and emptying ``tensors`` as it
    goes, so memory holds one tensor, never the file. ``written(nbytes)`` hears of each."""
    header: dict[str, Any] = {"__metadata__": {"format": fmt}}
    offset = 0
    for name, value in tensors.items():
        if value.dtype not in SAFETENSORS_DTYPES:
            raise ConvertError(f"cannot store {name} of dtype {value.dtype}")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in list(tensors):
            value = tensors.pop(name)
            mx.eval(value)
            raw = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value
            f.write(np.asarray(raw).tobytes())
            if written is not None:
                written(value.nbytes)
            del value, raw


def save_shards(
    folder: Path,
    tensors: dict[str, mx.array],
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
    fmt: str = "mlx",
) -> int:
    """Sharded safetensors plus ``model.safetensors.index.json``; returns the byte total.

    ``tensors`` (lazy arrays) is emptied as they are written; ``progress(done, total)`` in bytes.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    total = sum(v.nbytes for v in tensors.values())
    weight_map: dict[str, str] = {}
    done = 0

    def written(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    for i, names in enumerate(shards):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        save_safetensors(folder / file, {n: tensors.pop(n) for n in names}, fmt, written)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _model_card(source: str, config: dict[str, Any]) -> str:
    quant = config.get("quantization")
    what = f"{quant['bits']}-bit (group size {quant['group_size']})" if quant else "unquantized"
    usage = 'phi3v generate --model <this repo> --image photo.jpg --prompt "Describe it."'
    return (
        "---\nlibrary_name: mlx\ntags: [mlx, phi3_v, vision]\n---\n"
        f"# {Path(source).name} for MLX\n\nConverted from `{source}` with phi3v-mlx: {what}, "
        f"other tensors in {config.get('torch_dtype')}.\n\n"
        f"```bash\npip install phi3v-mlx\n{usage}\n```\n"
    )


def folder_bytes(path: Path) -> int:
    """Bytes of the safetensors weights in a folder."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def upload(folder: Path, repo: str) -> None:
    """Create (if needed) a Hugging Face model repository and upload the folder to it."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")


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


CALIBRATION_PROMPTS = [
    "<|user|>\nExplain why the sky is blue in two sentences.<|end|>\n<|assistant|>\n",
    "<|user|>\nWrite a short Python function that reverses a string.<|end|>\n<|assistant|>\n",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nList three uses of copper."
    "<|end|>\n<|assistant|>\nCopper is used in",
]
IMAGE_PROMPT = "<|user|>\n<|image_1|>\nWhat shapes are in this picture?<|end|>\n<|assistant|>\n"


def calibration_image() -> np.ndarray:
    """A deterministic synthetic picture: a colour gradient with a disc and a bar."""
    y, x = np.mgrid[0:360, 0:480]
    image = np.stack([x * 255 // 479, y * 255 // 359, (x + y) * 255 // 838], -1)
    image[(x - 150) ** 2 + (y - 180) ** 2 < 70**2] = (230, 40, 40)
    image[60:100, 260:440] = (20, 20, 200)
    return image.astype(np.uint8)


def _log_probs(path: Path, dtype: str | None) -> list[np.ndarray]:
    """Next-token log-probabilities of a model on the calibration inputs (then freed)."""
    from .loader import load

    model, processor = load(path, dtype=dtype)
    inputs = [processor(p) for p in CALIBRATION_PROMPTS]
    inputs.append(processor(IMAGE_PROMPT, images=[calibration_image()], num_crops=1))
    out = []
    for item in inputs:
        hidden = model.language.hidden(model.embed(**item))[:, -64:]
        logits = model.language.lm_head(hidden).astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0])
    del model
    mx.clear_cache()
    return out


def _stored_dtype(path: Path) -> str | None:
    value = json.loads((path / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    return value if value in DTYPES else None


def fidelity(source: Path, converted: Path, dtype: str | None = None) -> FidelityReport:
    """Top-1 agreement and mean KL(source || converted) over the built-in calibration, both
    models computing in ``dtype`` (default: the source's stored dtype, so memory stays low)."""
    ref = np.concatenate(_log_probs(source, dtype))
    got = np.concatenate(_log_probs(converted, dtype or _stored_dtype(source)))
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    kl = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    return FidelityReport(len(ref), agree, kl, folder_bytes(source), folder_bytes(converted))


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    quantize_vision: bool = False,
    dequantize: bool = False,
    upload_repo: str | None = None,
    force: bool = False,
    check: bool = True,
    shard_bytes: int = SHARD_BYTES,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
) -> FidelityReport | None:
    """Write an MLX checkpoint of ``hf_path`` to ``mlx_path``; with ``quantize`` and ``check``,
    return (and log) the fidelity report. Nothing is left behind if it fails."""
    if quantize and dequantize:
        raise ConvertError("--quantize and --dequantize exclude each other")
    if q_bits not in Q_BITS:
        raise ConvertError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, got {q_bits}")
    if q_group_size not in Q_GROUP_SIZES:
        sizes = ", ".join(map(str, Q_GROUP_SIZES))
        raise ConvertError(f"--q-group-size must be one of {sizes}, got {q_group_size}")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    source = resolve(hf_path)
    target = Path(mlx_path).expanduser()
    if target.resolve() == source.resolve():
        raise ConvertError("--mlx-path must differ from the source folder")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise ConvertError(f"{target} exists and is not empty (use --force to replace it)")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    skeleton = Model(ModelConfig.from_file(source))
    if config.get("quantization") and not (quantize or dequantize):
        raise ConvertError(
            f"{source} is quantized: pass --dequantize (or --quantize to requantize)"
        )
    dtype = dtype or config.get("torch_dtype") or "bfloat16"
    if dtype not in DTYPES:
        dtype = "bfloat16"
    weights = _source_weights(source, config, skeleton)
    quantizable = _quantizable(skeleton, quantize_vision)
    tensors, modules = plan_tensors(
        weights, quantizable, DTYPES[dtype], q_bits if quantize else None, q_group_size
    )
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    if quantize:
        config["quantization"] = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        config["quantization"].update(modules)
    config["torch_dtype"] = dtype

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        what = f"{q_bits}-bit, group {q_group_size}" if quantize else dtype
        log(f"Converting {source} -> {target} ({what})")
        save_shards(partial, tensors, shard_bytes, progress)
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, partial / name)
        (partial / "README.md").write_text(_model_card(str(hf_path), config))
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"Wrote {target} ({folder_bytes(target) / 1e9:.3f} GB)")
    report = None
    if quantize and check:
        report = fidelity(source, target)
        log(str(report))
    if upload_repo:
        upload(target, upload_repo)
        log(f"Uploaded to https://huggingface.co/{upload_repo}")
    return report
