"""Low-rank adapters on a model: mlx-lm's LoRA and DoRA layers (a quantized layer keeps its
quantization under them: QLoRA) and their files, ``adapters.safetensors`` and
``adapter_config.json`` in mlx-lm's format under the official tensor names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .models.base import DecoderModel

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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


def add_adapters(model: DecoderModel, settings: AdapterSettings) -> None:
    """Freeze the model and put mlx-lm's LoRA (or DoRA) layers on the targets: modules of the
    decoder layers (``self_attn.qkv_proj``...) or whole-model ones by official name
    (``lm_head``). A quantized layer stays quantized under its adapter (QLoRA)."""
    targets = settings.targets or model.lora_targets
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


def fused_weights(model: DecoderModel) -> dict[str, mx.array]:
    """Every adapted layer's weight with its adapter fused in, in float32 (a quantized layer
    dequantized first), under its official name."""
    fused = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRASwitchLinear, DoRALinear)):
            dense = module.fuse(dequantize=True)
            fused[model.official_name(f"{path}.weight")] = dense.weight.astype(mx.float32)
    return fused
