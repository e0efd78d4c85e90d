"""Phi-3-small's configuration, read from the keys of its ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import ConfigError, config_from_dict, read_config

# Ids of the official tokenizer that stand for no token (its dummy ids, the unused FIM tokens and
# <|endofprompt|>); the model's head never predicts them.
UNUSED_IDS = (100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352))


def _next_multiple(value: int, step: int) -> int:
    return (value + step - 1) // step * step


@dataclass
class ModelConfig:
    """Phi-3-small (8k and 128k): GQA with block-sparse layers, gegelu MLP, muP scalings."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = "phi3small"
    num_key_value_heads: int = 8
    ff_intermediate_size: int | None = 14336
    ff_dim_multiplier: int | None = None
    gegelu_pad_to_256: bool = True
    gegelu_limit: float | None = 20.0
    hidden_act: str = "gegelu"
    layer_norm_epsilon: float = 1e-5
    rope_embedding_base: float = 1e6
    rope_position_scale: float = 1.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192
    dense_attention_every_n_layers: int | None = 2
    blocksparse_block_size: int = 64
    blocksparse_num_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head_pattern: bool = False
    mup_use_scaling: bool = True
    mup_attn_multiplier: float = 1.0
    mup_embedding_multiplier: float | None = 10.0
    mup_width_multiplier: float | None = 8.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 100257
    eos_token_id: int | list[int] = 100257
    torch_dtype: str | None = None
    quantization: dict[str, Any] | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if (self.ff_intermediate_size is None) == (self.ff_dim_multiplier is None):
            raise ConfigError("give exactly one of ff_intermediate_size and ff_dim_multiplier")
        if self.hidden_act != "gegelu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (gegelu)")
        if self.rope_scaling is not None:
            raise ConfigError(
                "rope_scaling (Phi-3-small-128k's long-context rotary) is not supported yet: "
                "only the 8k model's plain rotary embedding is implemented"
            )
        if self.blocksparse_block_size < 1 or self.blocksparse_num_local_blocks < 1:
            raise ConfigError(
                "blocksparse_block_size and blocksparse_num_local_blocks must be >= 1"
            )
        if self.blocksparse_vert_stride < 1:
            raise ConfigError("blocksparse_vert_stride must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        """The gegelu width: ``ff_intermediate_size``, or the one ``ff_dim_multiplier`` gives."""
        if self.ff_intermediate_size is not None:
            return self.ff_intermediate_size
        size = self.ff_dim_multiplier * (self.hidden_size // 3) * 2
        return _next_multiple(size, 256) if self.gegelu_pad_to_256 else size

    def is_dense(self, layer: int) -> bool:
        """Whether layer ``layer`` (from 0) attends densely; the others are block-sparse."""
        every = self.dense_attention_every_n_layers
        return bool(every) and (layer + 1) % every == 0

    @property
    def attention_scale(self) -> float:
        """The softmax scale: muP's ``mup_attn_multiplier / head_dim``, else 1/sqrt(head_dim)."""
        if self.mup_use_scaling:
            return self.mup_attn_multiplier / self.head_dim
        return self.head_dim**-0.5

    @property
    def unused_ids(self) -> list[int]:
        """Vocabulary ids whose logits the head masks out."""
        return [i for i in UNUSED_IDS if i < self.vocab_size]

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        return list(ids) if isinstance(ids, list) else [ids]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from the parsed ``config.json``."""
        if values.get("model_type") != "phi3small":
            raise ConfigError(f"model_type {values.get('model_type')!r} is not phi3small")
        return config_from_dict(cls, values)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (or the ``config.json`` inside a folder)."""
        return cls.from_dict(read_config(path))
