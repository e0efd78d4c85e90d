"""Phi-4-multimodal's mixture of LoRAs: the decoder's four linears of every layer carry the vision
and the speech adapter side by side, never merged; each forward picks one adapter (or none) for
the whole sequence, or one per row of a batch."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ...config import ConfigError
from .config import AdapterConfig, ModelConfig

ADAPTERS = ("vision", "speech")
TARGETS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
           ("mlp", "down_proj"))  # fmt: skip
# A PEFT folder's tensor (no adapter name) -> the same tensor named for its adapter.
PEFT_TENSOR = re.compile(r"^(?:base_model\.model\.)?(.*\.lora_[AB])\.weight$")

# The adapter of the forward being built: None, one name for every row, one per row, or one per
# position of a forward over several spans of rows (their positions one after another).
Selection = str | tuple[str | None, ...] | None
_selection: ContextVar[Selection] = ContextVar("phi4mm_adapter", default=None)


@contextmanager
def using(selection: Selection) -> Iterator[None]:
    """Forwards built inside run with ``selection``: no adapter (None), one adapter for every row
    (its name), or one per row of the batch or per position of a [1, N, ...] input (a tuple of
    names or None)."""
    token = _selection.set(selection)
    try:
        yield
    finally:
        _selection.reset(token)


class AdapterLinear(nn.Module):
    """A decoder linear (``base_layer``, quantized or not once loaded) with low-rank adapters
    beside it: ``base(x) + scale * B A x`` for the adapter the current forward selects. The
    adapters are plain arrays (``lora_A[name]`` [r, in], ``lora_B[name]`` [out, r]), not linear
    layers, so that quantizing the model's linear layers never touches them."""

    def __init__(self, base: nn.Linear, adapters: dict[str, AdapterConfig]):
        super().__init__()
        self.base_layer = base
        out_dims, in_dims = base.weight.shape
        self.lora_A = {name: mx.zeros((a.r, in_dims)) for name, a in adapters.items()}
        self.lora_B = {name: mx.zeros((out_dims, a.r)) for name, a in adapters.items()}
        self.scale = {name: a.scale for name, a in adapters.items()}

    def delta(self, x: mx.array, name: str) -> mx.array:
        return (x @ self.lora_A[name].T) @ self.lora_B[name].T * self.scale[name]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_layer(x)
        selection = _selection.get()
        if selection is None:
            return y
        if isinstance(selection, str):
            return y + self.delta(x, selection).astype(y.dtype)
        if len(selection) == x.shape[0]:  # one per row
            shape = (-1, *[1] * (x.ndim - 1))
        elif x.shape[0] == 1 and len(selection) == x.shape[1]:  # one per position
            shape = (1, -1, *[1] * (x.ndim - 2))
        else:
            raise ValueError(f"{len(selection)} adapter choices for inputs of shape {x.shape}")
        for name in sorted({s for s in selection if s is not None}):
            chosen = mx.array([s == name for s in selection]).reshape(shape)
            y = y + mx.where(chosen, self.delta(x, name), 0).astype(y.dtype)
        return y


def attach(layers: Sequence[nn.Module], adapters: dict[str, AdapterConfig]) -> None:
    """Put the adapters beside the four linears of every decoder layer."""
    if not adapters:
        return
    for layer in layers:
        for block, name in TARGETS:
            parent = getattr(layer, block)
            setattr(parent, name, AdapterLinear(getattr(parent, name), adapters))


def read_folders(path: Path, config: ModelConfig) -> dict[str, mx.array]:
    """The adapters of the native layout's ``vision-lora/`` and ``speech-lora/`` PEFT folders:
    their tensors under the remote-code names (``...qkv_proj.lora_A.vision.weight``), and their
    rank and scale recorded on ``config`` (a folder beats the config's own entry)."""
    tensors: dict[str, mx.array] = {}
    for name in ADAPTERS:
        folder = Path(path) / f"{name}-lora"
        if not folder.is_dir():
            continue
        settings_file = folder / "adapter_config.json"
        weights_file = folder / "adapter_model.safetensors"
        if not settings_file.is_file() or not weights_file.is_file():
            raise ConfigError(f"{folder} needs adapter_config.json and adapter_model.safetensors")
        try:
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
            adapter = AdapterConfig(int(settings["r"]), float(settings["lora_alpha"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{settings_file} is malformed: {e}") from None
        if settings.get("use_dora") or settings.get("use_rslora"):
            raise ConfigError(f"{settings_file}: DoRA and rsLoRA adapters are not supported")
        setattr(config, f"{name}_lora", adapter)
        for key, value in mx.load(str(weights_file)).items():
            match = PEFT_TENSOR.match(key)
            if match is None:
                raise ConfigError(f"{weights_file} has an unexpected tensor {key!r}")
            tensors[f"{match.group(1)}.{name}.weight"] = value
    return tensors
