"""Model configuration read from a checkpoint's ``config.json``: Phi-3-Vision (``phi3_v``) and
the text models sharing its decoder (``phi3``: Phi-3-mini, -medium, Phi-3.5-mini; ``phimoe``:
Phi-3.5-MoE)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "phi3_v"
MODEL_TYPES = ("phi3_v", "phi3", "phimoe")


class ConfigError(ValueError):
    """A configuration this package cannot run."""


def _check_model_type(model_type: Any) -> None:
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"model_type {model_type!r} is not one phi3v-mlx runs "
            f"({', '.join(MODEL_TYPES)}: Phi-3(.5)-Vision, Phi-3(.5) text models, Phi-3.5-MoE)"
        )


def _from_dict(cls, values: dict[str, Any]):
    """Build a dataclass from the keys it knows, ignoring the rest."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class VisionConfig:
    """The CLIP vision tower; the defaults are CLIP ViT-L/14-336."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.hidden_act != "quick_gelu":
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported")
        if self.image_size != 336:
            raise ConfigError("vision_config.image_size must be 336 (the HD crop size)")
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % 2:
            raise ConfigError("vision_config: image_size / patch_size must be an even integer")

    @property
    def grid(self) -> int:
        """Patches per side of one crop (24 for CLIP ViT-L/14-336)."""
        return self.image_size // self.patch_size


@dataclass
class ImageProcessorConfig:
    """The ``img_processor`` block: which CLIP features feed the projector."""

    image_dim_out: int = 1024
    num_img_tokens: int = 144
    layer_idx: int = -2
    type_feature: str = "patch"
    name: str = "clip_vision_model"

    def __post_init__(self):
        if self.type_feature != "patch":
            raise ConfigError(f"img_processor.type_feature {self.type_feature!r} is not supported")


@dataclass
class EmbeddingConfig:
    """The ``embd_layer`` block: how image features are arranged and projected."""

    embedding_cls: str = "image"
    hd_transform_order: str = "sub_glb"
    projection_cls: str = "mlp"
    use_hd_transform: bool = True
    with_learnable_separator: bool = True

    def __post_init__(self):
        if self.hd_transform_order not in ("sub_glb", "glb_sub"):
            raise ConfigError(
                f"embd_layer.hd_transform_order {self.hd_transform_order!r} is unknown"
            )
        if self.projection_cls != "mlp":
            raise ConfigError(f"embd_layer.projection_cls {self.projection_cls!r} is not supported")
        if not (self.use_hd_transform and self.with_learnable_separator):
            raise ConfigError(
                "embd_layer: only the HD transform with learnable separators is supported"
            )


@dataclass
class RopeScaling:
    """Su-scaled (LongRoPE) rotary embedding factors, one per rotary frequency, and (Phi-3.5-MoE)
    the multipliers of cos and sin in each regime."""

    type: str
    short_factor: list[float]
    long_factor: list[float]
    short_mscale: float | None = None
    long_mscale: float | None = None

    def __post_init__(self):
        if self.type not in ("su", "longrope"):
            raise ConfigError(f"rope_scaling type {self.type!r} is not supported (su, longrope)")


@dataclass
class ModelConfig:
    """The whole Phi-3-Vision configuration."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = MODEL_TYPE
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    lm_head_bias: bool = False
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    embd_layer: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    img_processor: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    quantization: dict[str, Any] | None = None

    def __post_init__(self):
        _check_model_type(self.model_type)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _from_dict(RopeScaling, self.rope_scaling)
        if isinstance(self.embd_layer, dict):
            self.embd_layer = _from_dict(EmbeddingConfig, self.embd_layer)
        if isinstance(self.img_processor, dict):
            self.img_processor = _from_dict(ImageProcessorConfig, self.img_processor)
        if isinstance(self.vision_config, dict):
            self.vision_config = _from_dict(VisionConfig, self.vision_config)
        if self.rope_scaling is not None:
            half = self.head_dim // 2
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.rope_scaling, name)) != half:
                    raise ConfigError(f"rope_scaling.{name} needs {half} values (head_dim / 2)")
        if self.model_type == "phimoe":
            if self.num_local_experts < 1:
                raise ConfigError("num_local_experts must be at least 1")
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ConfigError("num_experts_per_tok must be between 1 and num_local_experts")
        if not self.has_vision:
            return
        if self.img_processor.image_dim_out != self.vision_config.hidden_size:
            raise ConfigError("img_processor.image_dim_out must equal the CLIP hidden size")
        layers = self.vision_config.num_hidden_layers
        if not -(layers + 1) <= self.img_processor.layer_idx <= layers:
            raise ConfigError(
                f"img_processor.layer_idx {self.img_processor.layer_idx} is out of range"
            )

    @property
    def has_vision(self) -> bool:
        """Whether the model reads images (Phi-3-Vision) or text only."""
        return self.model_type == MODEL_TYPE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_mscale(self) -> float:
        """The factor the su-scaled rotary embedding multiplies cos and sin by (computed from the
        context extension, as Phi-3 does)."""
        if self.rope_scaling is None:
            return 1.0
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))

    @property
    def rope_mscales(self) -> tuple[float, float]:
        """The cos and sin multipliers of the short and the long regime: the configured ones
        (Phi-3.5-MoE) or the computed one for both."""
        scaling = self.rope_scaling
        short = scaling.short_mscale if scaling and scaling.short_mscale else self.rope_mscale
        long = scaling.long_mscale if scaling and scaling.long_mscale else self.rope_mscale
        return short, long

    @property
    def long_at_threshold(self) -> bool:
        """Whether a sequence of exactly ``original_max_position_embeddings`` positions uses the
        long factors (Phi-3.5-MoE's code: at and above it; Phi-3's: above it)."""
        return self.model_type == "phimoe"

    @property
    def clip_layers_used(self) -> int:
        """How many CLIP encoder layers produce ``hidden_states[layer_idx]``."""
        return self.img_processor.layer_idx % (self.vision_config.num_hidden_layers + 1)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        return list(ids) if isinstance(ids, list) else [ids]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from the parsed ``config.json``."""
        _check_model_type(values.get("model_type"))
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in values
        ]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        try:
            return _from_dict(cls, values)
        except (TypeError, KeyError) as e:
            raise ConfigError(f"config.json is malformed: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (or the ``config.json`` inside a folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_dict(values)
