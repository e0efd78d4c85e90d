"""Phi-3-Vision's configuration (``phi3_v``): the Phi-3 decoder's, plus the CLIP tower, which of
its features feed the projector, and how image features are arranged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError, known_fields
from ..phi3 import TextConfig

MODEL_TYPE = "phi3_v"


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
class ModelConfig(TextConfig):
    """The whole Phi-3-Vision configuration."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = (MODEL_TYPE,)

    model_type: str = MODEL_TYPE
    embd_layer: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    img_processor: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.embd_layer, dict):
            self.embd_layer = known_fields(EmbeddingConfig, self.embd_layer)
        if isinstance(self.img_processor, dict):
            self.img_processor = known_fields(ImageProcessorConfig, self.img_processor)
        if isinstance(self.vision_config, dict):
            self.vision_config = known_fields(VisionConfig, self.vision_config)
        if self.img_processor.image_dim_out != self.vision_config.hidden_size:
            raise ConfigError("img_processor.image_dim_out must equal the CLIP hidden size")
        layers = self.vision_config.num_hidden_layers
        if not -(layers + 1) <= self.img_processor.layer_idx <= layers:
            raise ConfigError(
                f"img_processor.layer_idx {self.img_processor.layer_idx} is out of range"
            )

    @property
    def clip_layers_used(self) -> int:
        """How many CLIP encoder layers produce ``hidden_states[layer_idx]``."""
        return self.img_processor.layer_idx % (self.vision_config.num_hidden_layers + 1)
