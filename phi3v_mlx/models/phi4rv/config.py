"""Phi-4-reasoning-vision-15B's configuration (``model_type`` "phi4-siglip"): the SigLIP-2 NaFlex
vision tower, the projector, and the Phi-4 decoder read as a Phi-3 text configuration."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import ConfigError, config_from_dict, known_fields, read_config
from ..phi3 import TextConfig

MODEL_TYPE = "phi4-siglip"
PROJECTOR_TYPE = re.compile(r"^(linear|mlp(\d+)x_gelu)$")


@dataclass
class VisionConfig:
    """The SigLIP-2 NaFlex tower (``vision_config``); the defaults are transformers'
    Siglip2VisionConfig's, which the checkpoint relies on for the keys it leaves out."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    num_patches: int = 256
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    model_type: str = "siglip2_vision_model"

    def __post_init__(self):
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vision_config.hidden_size must be a multiple of its head count")
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ConfigError("vision_config.num_patches must be a square (the position grid)")
        if self.num_hidden_layers < 2:
            raise ConfigError("vision_config needs at least 2 layers (features are the 2nd last)")

    @property
    def position_grid(self) -> int:
        """Side of the square grid of learned position embeddings (16 for 256)."""
        return math.isqrt(self.num_patches)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch (16 x 16 x 3 = 768)."""
        return self.patch_size * self.patch_size * self.num_channels


@dataclass
class ModelConfig:
    """The whole configuration: the multimodal keys, the vision tower's, and ``text`` (the
    decoder's, built from the same ``config.json``)."""

    text: TextConfig
    mm_vision_tower: str
    model_type: str = MODEL_TYPE
    mm_projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 1152
    min_num_patches: int = 256
    max_num_patches: int = 3600
    tokenizer_model_max_length: int | None = None
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    quantization: dict[str, Any] | None = None

    def __post_init__(self):
        if "naflex" not in self.mm_vision_tower.lower():
            raise ConfigError(
                f"mm_vision_tower {self.mm_vision_tower!r} is not a SigLIP-2 NaFlex tower"
            )
        if not PROJECTOR_TYPE.match(self.mm_projector_type):
            raise ConfigError(f"mm_projector_type {self.mm_projector_type!r} is not supported")
        if self.mm_hidden_size != self.vision_config.hidden_size:
            raise ConfigError("mm_hidden_size must equal vision_config.hidden_size")
        if not 1 <= self.min_num_patches <= self.max_num_patches:
            raise ConfigError("min_num_patches must be between 1 and max_num_patches")

    @property
    def projector_depth(self) -> int:
        """Linear layers in the projector (GELU between them)."""
        depth = PROJECTOR_TYPE.match(self.mm_projector_type).group(2)
        return int(depth) if depth else 1

    @property
    def head_dim(self) -> int:
        return self.text.head_dim

    @property
    def num_hidden_layers(self) -> int:
        return self.text.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def eos_token_id(self) -> int | list[int]:
        return self.text.eos_token_id

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @property
    def torch_dtype(self) -> str | None:
        """The stored weights' dtype (``dtype`` in the Hub's config, ``torch_dtype`` in older
        ones and in this package's conversions)."""
        return self.text.torch_dtype

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from the parsed ``config.json``."""
        if values.get("model_type") != MODEL_TYPE:
            raise ConfigError(
                f"model_type {values.get('model_type')!r} is not {MODEL_TYPE!r} "
                "(Phi-4-reasoning-vision)"
            )
        vision = values.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise ConfigError("config.json: vision_config must be an object")
        tower = values.get("mm_vision_tower")
        if not isinstance(tower, str):
            raise ConfigError("config.json lacks mm_vision_tower")
        if "patch_size" not in vision:  # the reference reads it from the tower's name
            vision = {**vision, "patch_size": 14 if "patch14" in tower.lower() else 16}
        try:
            vision_config = known_fields(VisionConfig, vision)
        except TypeError as e:
            raise ConfigError(f"config.json: vision_config is malformed: {e}") from None
        dtype = values.get("torch_dtype") or values.get("dtype")
        text = TextConfig.from_dict(
            {**values, "model_type": "phi3", "quantization": None, "torch_dtype": dtype}
        )
        return config_from_dict(
            cls, {**values, "text": text, "vision_config": vision_config, "model_type": MODEL_TYPE}
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (or the ``config.json`` inside a folder)."""
        return cls.from_dict(read_config(path))
