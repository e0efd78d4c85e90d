"""Load a checkpoint of any architecture this package runs (Hugging Face or MLX layout), lazily."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .adapters import load_adapter
from .config import read_config
from .distributed import shard_model
from .models import architecture
from .models.base import DecoderModel, module_names
from .processor import Processor

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class LoadError(ValueError):
    """A checkpoint that cannot be loaded."""


def resolve(path_or_repo: str | Path) -> Path:
    """A local folder as is; anything else is a Hugging Face Hub id, downloaded once."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is not a folder")
        return path
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise LoadError(f"no model folder at {path_or_repo}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"cannot download {text} from the Hugging Face Hub: {first} "
            "(for a model on disk, give its folder: --model PATH)"
        ) from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards, following ``model.safetensors.index.json`` when present."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index} is malformed: {e}") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).is_file():
                raise LoadError(f"missing weight file {path / name} (listed in {index.name})")
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no *.safetensors weights in {path}")
    return files


def read_weights(files: list[Path]) -> dict[str, mx.array]:
    """All tensors of the shards, memory-mapped and not yet read."""
    weights: dict[str, mx.array] = {}
    for file in files:
        _check_shard(file)
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as e:
            raise LoadError(f"cannot read {file}: {e}") from None
    return weights


def _check_shard(file: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before anything reads it."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{file} is truncated or not a safetensors file")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise LoadError(f"{file} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{file} has a corrupt header") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + header_len + max(ends, default=0) > size:
        raise LoadError(f"{file} is truncated: it holds {size} bytes, its header describes more")


def quantize_like_checkpoint(model: nn.Module, quantization: dict[str, Any], weights: dict) -> None:
    """Quantize the layers the checkpoint stores quantized (those with ``scales``)."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        own = quantization.get(path)
        if isinstance(own, dict):
            return {k: own[k] for k in ("group_size", "bits", "mode") if k in own}
        return True

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: Path) -> None:
    """One clear error for a missing, unexpected or mis-shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    for name in sorted(expected):
        if name not in weights:
            raise LoadError(f"checkpoint {where} lacks tensor {name!r}")
    for name in sorted(weights):
        if name not in expected:
            raise LoadError(f"checkpoint {where} has an unexpected tensor {name!r}")
        if tuple(weights[name].shape) != tuple(expected[name].shape):
            raise LoadError(
                f"tensor {name!r} in {where} has shape {list(weights[name].shape)}, "
                f"the model expects {list(expected[name].shape)}"
            )


def model_config(path: Path) -> Any:
    """The config of a checkpoint folder, as its architecture reads it."""
    values = read_config(path)
    return architecture(values.get("model_type")).ModelConfig.from_dict(values)


def read_checkpoint(path: Path) -> tuple[Any, dict[str, mx.array]]:
    """The config of a checkpoint folder and all its tensors, memory-mapped and not yet read:
    the safetensors, and what its architecture keeps beside them (``extra_weights``: Phi-4-
    multimodal's adapter folders), which may complete the config."""
    config = model_config(path)
    weights = read_weights(weight_files(path))
    extra_weights = getattr(architecture(config.model_type), "extra_weights", None)
    if extra_weights is not None:
        try:
            weights.update(extra_weights(path, config))
        except (ValueError, OSError, RuntimeError) as e:
            raise LoadError(f"cannot read {path}: {e}") from None
    return config, weights


def load_model(
    path: Path,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    progress: Callable[[int, int], None] | None = None,
    group: mx.distributed.Group | None = None,
    adapter_path: str | Path | None = None,
    allow_merged_adapters: bool = False,
    log: Callable[[str], None] | None = None,
) -> DecoderModel:
    """The model of a local checkpoint folder, its weights cast to ``dtype`` if given, with the
    adapter saved in ``adapter_path`` on it if given.

    Unless ``lazy``, the weights are read now, one tensor at a time; ``progress(done, total)``
    hears of each in bytes. With a ``group`` of several ranks, the model is split across them
    first (:func:`phi3v_mlx.distributed.shard_model`): each rank keeps only its part.
    ``allow_merged_adapters`` loads a checkpoint whose modality adapters are merged into the
    decoder (mlx-vlm's Phi-4-multimodal), refused otherwise; ``log`` (stderr by default)
    receives the one line on what then differs from the reference.
    """
    config, weights = read_checkpoint(path)
    module = architecture(config.model_type)
    note = None
    if allow_merged_adapters and hasattr(module, "allow_merged_adapters"):
        note = module.allow_merged_adapters(config, weights)
    model = module.Model(config)
    weights = model.sanitize(weights)
    if config.quantization:
        quantization = module_names(config.quantization, model.internal_name)
        quantize_like_checkpoint(model, quantization, weights)
    check_weights(model, weights, path)
    if note is not None:
        (log or _stderr)(note)
    if dtype is not None:
        target = float_dtype(dtype)
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=False)
    del weights  # a split model's parameters are parts of these: reading one must not keep it
    model.eval()
    if group is not None and group.size() > 1:
        shard_model(model, group)
    if not lazy:
        tensors = [v for _, v in tree_flatten(model.parameters())]
        total, done = sum(v.nbytes for v in tensors), 0
        for tensor in tensors:
            mx.eval(tensor)
            done += tensor.nbytes
            if progress is not None:
                progress(done, total)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    return model


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def float_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    """An MLX float dtype from its name ("float32", "float16", "bfloat16") or itself."""
    if isinstance(dtype, mx.Dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise LoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or mx.float32 ...)")


def load(
    path_or_repo: str | Path,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    progress: Callable[[int, int], None] | None = None,
    adapter_path: str | Path | None = None,
    group: mx.distributed.Group | None = None,
    allow_merged_adapters: bool = False,
) -> tuple[DecoderModel, Processor]:
    """A model and its processor from a local folder or a Hugging Face Hub id.

    The checkpoint dtype is kept unless ``dtype`` ("float32", "float16", "bfloat16", or the
    MLX dtype itself) is given; quantized weights stay quantized. ``adapter_path`` puts a
    fine-tuned adapter (``phi3v lora``'s output, in mlx-lm's format) on the model.

    ``group`` (``mx.distributed.init()`` in a process started by ``mlx.launch``) splits the
    model across its ranks, tensor parallel: each rank reads and keeps only its part of the
    decoder (the embeddings, the head and the vision tower whole), every rank runs the same
    calls in step, and all get the same logits. Every rank also gets the same global random
    seed, so unseeded sampling agrees.

    ``allow_merged_adapters`` loads mlx-vlm's conversion of Phi-4-multimodal (both modality
    adapters merged into the decoder), which is refused otherwise; one line on stderr then says
    what differs from the reference.
    """
    if adapter_path is not None and group is not None and group.size() > 1:
        raise LoadError("a model split across ranks takes no adapter: fuse it first (phi3v fuse)")
    path = resolve(path_or_repo)
    model = load_model(path, dtype, lazy, progress, group, adapter_path, allow_merged_adapters)
    return model, load_processor(path)


def load_processor(path: str | Path) -> Processor:
    """The processor of a local checkpoint folder (its tokenizer, stop ids and media settings)."""
    path = Path(path)
    config = model_config(path)
    try:
        return architecture(config.model_type).load_processor(path, config)
    except ValueError as e:
        raise LoadError(str(e)) from None
