"""Phi-4-multimodal's configuration: the Phi-4-mini decoder's, the SigLIP image tower, the audio
encoder's settings and the two modality adapters, read from either layout users download (the
transformers-native ``phi4_multimodal`` config or the Hub remote-code ``phi4mm`` config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...config import ConfigError, known_fields
from ..phi3 import TextConfig
from .conformer import AudioConfig

NATIVE_TYPE = "phi4_multimodal"
REMOTE_TYPE = "phi4mm"
IMAGE_TOKEN_ID = 200010


@dataclass
class VisionConfig:
    """The SigLIP image tower and how its features are read; defaults are SigLIP-400M at 448."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    crop_size: int = 448
    feature_layer: int = -2
    image_token_id: int = IMAGE_TOKEN_ID

    def __post_init__(self):
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported")
        if self.image_size != self.crop_size:
            raise ConfigError("vision_config: image_size must equal crop_size")
        if self.image_size % self.patch_size or self.grid % 2:
            raise ConfigError("vision_config: image_size / patch_size must be an even integer")
        if not -(self.num_hidden_layers + 1) <= self.feature_layer <= self.num_hidden_layers:
            raise ConfigError(f"vision_config.feature_layer {self.feature_layer} is out of range")

    @property
    def grid(self) -> int:
        """Patches per side of one crop (32 for 448 / 14)."""
        return self.image_size // self.patch_size

    @property
    def layers_used(self) -> int:
        """How many encoder layers produce ``hidden_states[feature_layer]``."""
        return self.feature_layer % (self.num_hidden_layers + 1)


@dataclass
class AdapterConfig:
    """One modality adapter (LoRA on the decoder's four linears): rank and ``lora_alpha``."""

    r: int
    lora_alpha: float

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"a LoRA rank must be at least 1, got {self.r}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r


@dataclass
class ModelConfig(TextConfig):
    """The whole Phi-4-multimodal configuration (native names; a remote-code config is renamed
    on reading). ``audio_config`` is None for a checkpoint without the audio tower;
    ``vision_lora`` / ``speech_lora`` are the adapters named in the config (the native layout
    keeps them in ``vision-lora/`` and ``speech-lora/`` folders instead). ``merged_adapters``
    says the decoder's linears hold both adapters merged in, ``image_separators`` whether the
    checkpoint has the image separators (mlx-vlm's conversion: merged, none; loaded only when
    asked)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = (NATIVE_TYPE, REMOTE_TYPE)

    model_type: str = NATIVE_TYPE
    bos_token_id: int | None = 199999
    eos_token_id: int | list[int] = field(default_factory=lambda: [199999, 200020])
    pad_token_id: int | None = 199999
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    audio_config: AudioConfig | None = None
    vision_lora: AdapterConfig | None = None
    speech_lora: AdapterConfig | None = None
    merged_adapters: bool = False
    image_separators: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.vision_config, dict):
            self.vision_config = known_fields(VisionConfig, self.vision_config)
        for name in ("vision_lora", "speech_lora"):
            value = getattr(self, name)
            if isinstance(value, dict):
                if "r" not in value or "lora_alpha" not in value:
                    raise ConfigError(f"{name} needs r and lora_alpha")
                setattr(self, name, AdapterConfig(int(value["r"]), float(value["lora_alpha"])))

    @property
    def image_token_id(self) -> int:
        return self.vision_config.image_token_id

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from a parsed ``config.json`` of either layout."""
        audio = None
        if "audio_config" in values or "audio_processor" in values:
            audio = AudioConfig.from_model_config(values)
        if values.get("model_type") == REMOTE_TYPE:
            values = remote_values(values)
        return super().from_dict({**values, "audio_config": audio})


def remote_values(values: dict[str, Any]) -> dict[str, Any]:
    """A remote-code ``phi4mm`` config with its image settings (``embd_layer``, SigLIP-400M
    otherwise) as the native ``vision_config``."""
    embedding = values.get("embd_layer") or {}
    crop = (embedding.get("image_embd_layer") or {}).get("crop_size", 448)
    vision = {"crop_size": crop, "image_size": crop}
    layer = (values.get("img_processor") or {}).get("layer_idx")
    if layer is not None:
        vision["feature_layer"] = layer
    return {**values, "vision_config": vision}
