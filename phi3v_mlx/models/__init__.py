"""The architectures this package runs: one module per architecture, found by ``model_type``."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..config import ConfigError

# model_type -> the module holding its ModelConfig, Model and load_processor.
REGISTRY = {
    "phi3_v": "phi3v_mlx.models.phi3v",
    "phi3": "phi3v_mlx.models.phi3",
    "phimoe": "phi3v_mlx.models.phi3",
    "phi3small": "phi3v_mlx.models.phi3small",
    "phi4-siglip": "phi3v_mlx.models.phi4rv",
    "phi4_multimodal": "phi3v_mlx.models.phi4mm",
    "phi4mm": "phi3v_mlx.models.phi4mm",
}


def architecture(model_type: object) -> ModuleType:
    """The module of an architecture; one clear error for a model type this package does not run."""
    if model_type not in REGISTRY:
        raise ConfigError(
            f"model_type {model_type!r} is not one phi3v-mlx runs ({', '.join(REGISTRY)})"
        )
    return importlib.import_module(REGISTRY[model_type])
