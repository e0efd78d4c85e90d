"""Convert Hugging Face (or MLX) Phi-3-Vision and Phi-3 text weights to MLX, optionally
quantized."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

from .fidelity import FidelityReport, counter, fidelity, folder_bytes
from .loader import DTYPES, check_weights, read_checkpoint, resolve
from .models import architecture
from .models.base import DecoderModel, module_names

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
    "cl100k_base.tiktoken",
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


def source_weights(
    path: Path, tensors: dict[str, mx.array], config: dict[str, Any], skeleton: DecoderModel
) -> dict[str, mx.array]:
    """Every tensor of the source under its official name, dequantized, in MLX's layouts,
    checked against the model and still unread."""
    weights = skeleton.official_weights(tensors)
    quantization = module_names(config.get("quantization") or {}, skeleton.official_name)
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
    check_weights(skeleton, skeleton.sanitize(weights), path)
    return weights


def _any_layer(path: str) -> str:
    """A module path with its layer index replaced by ``*``."""
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", path)


def quantizable(skeleton: DecoderModel, quantize_vision: bool) -> dict[str, int]:
    """Official paths (layer index ``*``) of the modules to quantize and their input widths: the
    decoder's linear layers (experts included), token embeddings and LM head, and with
    ``quantize_vision`` the vision tower's and projector's linear layers (a layer whose input
    width no group size divides stays unquantized: SigLIP's fc2 reads 4304). Never a vision
    position table or patch embedding, nor an MoE router, whose choices quantization would
    change."""
    paths = {}
    for path, module in skeleton.named_modules():
        vision = path.startswith(skeleton.ENCODER_PREFIXES)
        if (vision and not quantize_vision) or path.endswith(
            ("block_sparse_moe.gate", "patch_embedding")
        ):
            continue
        linear = isinstance(module, (nn.Linear, SwitchLinear))
        if linear or (isinstance(module, nn.Embedding) and not vision):
            paths[_any_layer(skeleton.official_name(f"{path}.")[:-1])] = module.weight.shape[-1]
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
        width = quantizable.get(_any_layer(path)) if path else None
        if bits is None or width is None:
            out[name] = value
            continue
        group = next((g for g in (group_size, 64, 32) if width % g == 0), None)
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
    written = counter(total, progress)
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
    vision = config["model_type"] == "phi3_v"
    peer = "mlx-vlm" if vision else "mlx-lm"
    command = (
        'phi3v generate --model <this repo> --image photo.jpg --prompt "Describe it."'
        if vision
        else 'phi3v generate --model <this repo> --prompt "Hello!"'
    )
    return (
        f"---\nlibrary_name: mlx\ntags: [mlx, {config['model_type']}]\n---\n"
        f"# {Path(source).name} for MLX\n\nConverted from `{source}` with phi3v-mlx: {what}, "
        f"other tensors in {config.get('torch_dtype')}. The tensor names and config are those "
        f"{peer} reads, so both packages load it.\n\n"
        "phi3v-mlx is not on PyPI: install it from a clone of its repository "
        f"(`pip install -e .` in the clone), then:\n\n```bash\n{command}\n```\n"
    )


def upload(folder: Path, repo: str) -> None:
    """Create (if needed) a Hugging Face model repository and upload the folder to it."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:  # network, authentication, quota: all one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"upload to {repo} failed ({first}); the converted model is kept at {folder}"
        ) from None


PARTIAL_FOLDER = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the partial output folders in ``folder`` whose converting process is gone."""
    removed = []
    for entry in folder.iterdir():
        match = PARTIAL_FOLDER.match(entry.name)
        if match and entry.is_dir() and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """In the main thread, let SIGTERM unwind the stack (so cleanup runs) instead of killing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _check_target(target: Path, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless ``force`` and it holds
    a model."""
    if target.exists() and not target.is_dir():
        raise ConvertError(f"--mlx-path {target} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise ConvertError(f"{target} exists and is not empty (use --force to replace it)")
        if not _is_model_folder(target):
            raise ConvertError(
                f"{target} is not empty and holds no model (config.json and *.safetensors): "
                "--force replaces only a model folder"
            )


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    *,
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
    replace: dict[str, mx.array] | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    check_progress: Callable[[int, int], None] | None = None,
) -> FidelityReport | None:
    """Write an MLX checkpoint of ``hf_path`` to ``mlx_path`` in the layout mlx-vlm also reads.

    ``replace`` gives tensors (official names) that take the place of the source's, as fusing an
    adapter does. With ``quantize`` and ``check``, the fidelity report (also logged) is computed
    on the written files before they are published: nothing is left at ``mlx_path``, nor
    half-written beside it, if anything fails or the process is interrupted or terminated.
    """
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
    _check_target(target, force)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    skeleton_config, tensors = read_checkpoint(source)
    skeleton = architecture(skeleton_config.model_type).Model(skeleton_config)
    if config.get("quantization") and not (quantize or dequantize):
        raise ConvertError(
            f"{source} is quantized: pass --dequantize (or --quantize to requantize)"
        )
    dtype = dtype or config.get("torch_dtype") or "bfloat16"
    if dtype not in DTYPES:
        dtype = "bfloat16"
    weights = source_weights(source, tensors, config, skeleton)
    for name, value in (replace or {}).items():
        if name not in weights or weights[name].shape != value.shape:
            raise ConvertError(f"{name} cannot replace a tensor of {source}")
        weights[name] = value
    tensors, modules = plan_tensors(
        weights,
        quantizable(skeleton, quantize_vision),
        DTYPES[dtype],
        q_bits if quantize else None,
        q_group_size,
    )
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    if quantize:
        block = {"group_size": q_group_size, "bits": q_bits, "mode": "affine", **modules}
        config["quantization"] = config["quantization_config"] = block
    config["torch_dtype"] = dtype
    config = skeleton.checkpoint_config(config)

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    report = None
    with _sigterm_as_exit():
        try:
            what = f"{q_bits}-bit, group {q_group_size}" if quantize else dtype
            log(f"Converting {source} -> {target} ({what})")
            save_shards(partial, tensors, shard_bytes, progress)
            (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in COPIED_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, partial / name)
            (partial / "README.md").write_text(_model_card(str(hf_path), config))
            if quantize and check:
                log("Checking fidelity against the source on the calibration prompts")
                report = fidelity(source, partial, progress=check_progress)
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log(f"Wrote {target} ({folder_bytes(target) / 1e9:.3f} GB)")
    if report is not None:
        log(str(report))
    if upload_repo:
        upload(target, upload_repo)
        log(f"Uploaded to https://huggingface.co/{upload_repo}")
    return report
