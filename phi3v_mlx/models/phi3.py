"""The Phi-3 decoder family: Phi-3-mini and -medium, Phi-3.5-mini and Phi-4-mini (``phi3``), and
Phi-3.5-MoE (``phimoe``), with su-scaled (LongRoPE) rotary embeddings, partial rotary and tied
embeddings; its decoder is also the language side of the multimodal architectures."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.phimoe import sparsemixer
from mlx_lm.models.switch_layers import SwitchGLU

from ..cache import PromptCache, RopeState
from ..config import ConfigError, config_from_dict, known_fields, read_config
from ..distributed import shard_decoder
from ..processor import Processor, make_processor
from .base import DecoderModel


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
class TextConfig:
    """The decoder's configuration (the whole configuration of a Phi-3 text model)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("phi3", "phimoe")

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = "phi3"
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
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
    quantization: dict[str, Any] | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dims % 2:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor} does not give an even "
                f"number of rotary dimensions of {self.head_dim}"
            )
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = known_fields(RopeScaling, self.rope_scaling)
        if self.rope_scaling is not None:
            half = self.rotary_dims // 2
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.rope_scaling, name)) != half:
                    raise ConfigError(
                        f"rope_scaling.{name} needs {half} values (rotary dimensions / 2)"
                    )
        if self.model_type == "phimoe":
            if self.num_local_experts < 1:
                raise ConfigError("num_local_experts must be at least 1")
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ConfigError("num_experts_per_tok must be between 1 and num_local_experts")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """The leading dimensions of each head that rotate (all but Phi-4-mini's last quarter)."""
        return int(self.head_dim * self.partial_rotary_factor)

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
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        return list(ids) if isinstance(ids, list) else [ids]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TextConfig:
        """Build a config from the parsed ``config.json``."""
        model_type = values.get("model_type")
        if model_type not in cls.MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not one {cls.__module__} reads "
                f"({', '.join(cls.MODEL_TYPES)})"
            )
        return config_from_dict(cls, values)

    @classmethod
    def from_file(cls, path: str | Path) -> TextConfig:
        """Read ``config.json`` (or the ``config.json`` inside a folder)."""
        return cls.from_dict(read_config(path))


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding of one forward: the long or the short factors, and the multiplier of
    cos and sin (``mscale``); each is one value, or one per row of a batch."""

    long: bool | mx.array
    mscale: float | mx.array


@dataclass
class Span:
    """Rows that one forward over the decoder reads together: their input embeddings
    [B, L, hidden] at positions ``offset``.. (one per row, or shared) of their layer caches
    (None: no cache), rotated by ``rotation``, the modality adapter their caches record (one
    name, one per row, or None; see ``PromptCache.adapter``), and the attention mask the forward
    gives them."""

    h: mx.array
    caches: Sequence[Any] | None
    offset: int | mx.array
    rotation: Rotation
    adapters: str | tuple[str | None, ...] | None = None
    mask: Any = None


def join_spans(parts: Sequence[mx.array]) -> mx.array:
    """One span's [B, L, ...] as it is, or several spans' positions one after another
    [1, N, ...]."""
    if len(parts) == 1:
        return parts[0]
    return mx.concatenate([part.reshape(1, -1, *part.shape[2:]) for part in parts], axis=1)


def split_spans(x: mx.array, spans: Sequence[Span]) -> list[mx.array]:
    """Each span's [B, L, ...] of what :func:`join_spans` joined."""
    if len(spans) == 1:
        return [x]
    out, start = [], 0
    for span in spans:
        rows, length = span.h.shape[:2]
        out.append(x[:, start : start + rows * length].reshape(rows, length, *x.shape[2:]))
        start += rows * length
    return out


class SuScaledRope:
    """Rotary frequencies for short and long sequences, and the threshold between them."""

    def __init__(self, config: TextConfig):
        dims = config.rotary_dims
        base = config.rope_theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        scaling = config.rope_scaling
        short = scaling.short_factor if scaling else 1.0
        long = scaling.long_factor if scaling else 1.0
        self.dims = dims
        self.short = mx.array(short, dtype=mx.float32) * base
        self.long = mx.array(long, dtype=mx.float32) * base
        # Computed now: a lazy array can only be evaluated on a stream of the thread that made
        # it, and generations run on other threads (a server's engine).
        mx.eval(self.short, self.long)
        self.threshold = config.original_max_position_embeddings if scaling else None
        self.long_at_threshold = config.long_at_threshold
        self.short_mscale, self.long_mscale = config.rope_mscales

    def is_long(self, length: int) -> bool:
        """Whether a forward over ``length`` positions (cached ones included) uses the long
        factors."""
        if self.threshold is None:
            return False
        return length >= self.threshold if self.long_at_threshold else length > self.threshold

    def rotation(self, length: int) -> Rotation:
        """The rotation of a forward over ``length`` positions (cached ones included)."""
        past = self.threshold is not None and length > self.threshold
        return Rotation(self.is_long(length), self.long_mscale if past else self.short_mscale)

    def __call__(self, x: mx.array, offset: int | mx.array, long: bool | mx.array) -> mx.array:
        """Rotate ``x`` [B, heads, L, head_dim] from position ``offset`` (an int, or one per row)
        with the long or the short factors (one flag, or a boolean per row)."""
        if isinstance(long, mx.array):
            rows = long.reshape(-1, 1, 1, 1)
            return mx.where(rows, self(x, offset, True), self(x, offset, False))
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self.long if long else self.short,
        )

    def scale_rotated(self, x: mx.array, mscale: float | mx.array) -> mx.array:
        """``x`` [B, heads, L, head_dim] with its rotated dimensions multiplied by ``mscale``
        (one value, or one per row): cos and sin scaled, the pass-through dimensions not."""
        if isinstance(mscale, mx.array):
            mscale = mscale.astype(x.dtype).reshape(-1, 1, 1, 1)
        return mx.concatenate([x[..., : self.dims] * mscale, x[..., self.dims :]], axis=-1)


class Attention(nn.Module):
    """Grouped-query attention: one fused ``qkv_proj`` (Phi-3), or biased ``q_proj``, ``k_proj``
    and ``v_proj`` (Phi-3.5-MoE)."""

    def __init__(self, config: TextConfig, rope: SuScaledRope):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        dims, q_width = config.hidden_size, self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        bias = config.attention_bias
        if config.model_type == "phimoe":
            self.q_proj = nn.Linear(dims, q_width, bias=bias)
            self.k_proj = nn.Linear(dims, kv_width, bias=bias)
            self.v_proj = nn.Linear(dims, kv_width, bias=bias)
        else:
            self.qkv_proj = nn.Linear(dims, q_width + 2 * kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, dims, bias=bias)
        self.rope = rope

    def __call__(self, x: mx.array, spans: Sequence[Span], layer: int) -> mx.array:
        """Attention output for ``x``: one span's rows [B, L, hidden], or several spans'
        positions one after another [1, N, hidden], each span attending over its own cache."""
        if "qkv_proj" in self:
            q_end = self.n_heads * self.head_dim
            q, k, v = mx.split(
                self.qkv_proj(x), [q_end, q_end + self.n_kv_heads * self.head_dim], -1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        parts = zip(*(split_spans(t, spans) for t in (q, k, v)), strict=True)
        outs = [self._attend(*part, span, layer) for part, span in zip(parts, spans, strict=True)]
        return self.o_proj(join_spans(outs))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, span: Span, layer: int) -> mx.array:
        """Attention [B, L, heads x head_dim] of one span's projections [B, L, width]."""
        B, L, _ = q.shape
        cache = span.caches[layer] if span.caches else None
        offset, rotation = span.offset, span.rotation
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset, rotation.long)
        k = self.rope(k, offset, rotation.long)
        scale = self.head_dim**-0.5
        if self.rope.dims < self.head_dim:  # mscale multiplies cos and sin of the rotated dims
            q = self.rope.scale_rotated(q, rotation.mscale)
            k = self.rope.scale_rotated(k, rotation.mscale)
        elif isinstance(rotation.mscale, mx.array):  # all rotate: mscale^2 on the scores
            q = q * (rotation.mscale**2).astype(q.dtype).reshape(-1, 1, 1, 1)
        else:
            scale *= rotation.mscale**2
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=span.mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


class SparseMoE(nn.Module):
    """Phi-3.5-MoE's experts: each token goes to its chosen experts by the inference rule of the
    official sparsemixer (the 2% band around each choice, weights not renormalized)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.jitter_eps = config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.switch_mlp = SwitchGLU(
            config.hidden_size, config.intermediate_size, config.num_local_experts
        )

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """The chosen experts [..., top_k] of each position and their weights."""
        return sparsemixer(self.gate(x), top_k=self.top_k, jitter_eps=self.jitter_eps)

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(x)
        y = self.switch_mlp(x, experts)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def _norm(config: TextConfig) -> nn.Module:
    """RMSNorm, or LayerNorm with a bias (Phi-3.5-MoE)."""
    if config.model_type == "phimoe":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, rope: SuScaledRope):
        super().__init__()
        self.self_attn = Attention(config, rope)
        if config.model_type == "phimoe":
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = MLP(config)
        self.input_layernorm = _norm(config)
        self.post_attention_layernorm = _norm(config)

    def __call__(self, x: mx.array, spans: Sequence[Span], layer: int) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), spans, layer)
        feed_forward = self.block_sparse_moe if "block_sparse_moe" in self else self.mlp
        return x + feed_forward(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Token embeddings, the Phi-3 decoder layers, the final norm and the LM head."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.rope = SuScaledRope(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, self.rope) for _ in range(config.num_hidden_layers)]
        self.norm = _norm(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(
                config.hidden_size, config.vocab_size, bias=config.lm_head_bias
            )

    def shard(self, group: mx.distributed.Group) -> None:
        """Split the layers across the ranks of ``group`` (tensor parallel; see
        :mod:`phi3v_mlx.distributed`): embeddings, norms and the head stay whole."""
        shard_decoder(self, group)

    def embed(self, input_ids: mx.array) -> mx.array:
        """Embeddings of token ids; negative ids (image slots) read row 0 until filled."""
        return self.embed_tokens(mx.maximum(input_ids, 0))

    def make_cache(self, max_kv_size: int | None = None) -> PromptCache:
        """An empty cache for one sequence (rotating layer caches with ``max_kv_size``)."""
        if max_kv_size is None:
            layers = [KVCache() for _ in self.layers]
        else:
            layers = [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in self.layers]
        # Inputs are kept for a switch of rope factors, which needs a rope scaling to happen.
        kept = self.config.original_max_position_embeddings if self.config.rope_scaling else 0
        return PromptCache(layers, RopeState(kept))

    def run(self, spans: Sequence[Span]) -> list[mx.array]:
        """The decoder layers and the final norm over each span's input embeddings, in one
        forward: every position of every span goes through each linear together, and each span
        attends over its own cache. Returns the spans' hidden states [B, L, hidden]."""
        for span in spans:
            first = span.caches[0] if span.caches else None
            span.mask = create_attention_mask(
                span.h, first, window_size=self._window(span.h, first)
            )
        h = join_spans([span.h for span in spans])
        for i, layer in enumerate(self.layers):
            h = layer(h, spans, i)
        return split_spans(self.norm(h), spans)

    def _window(self, h: mx.array, layer_cache: Any) -> int | None:
        """The sliding window, when the keys of this forward can reach beyond it."""
        window = self.config.sliding_window
        if not window or layer_cache is None:
            return window if window and h.shape[1] > window else None
        held = layer_cache.offset if isinstance(layer_cache.offset, int) else layer_cache.size()
        return window if held + h.shape[1] > window else None

    def hidden(self, embeddings: mx.array, cache: PromptCache | None = None) -> mx.array:
        """Final-norm hidden states [B, L, hidden] of input embeddings [B, L, hidden].

        With a cache, the positions follow the cached ones; when the sequence crosses the rope
        threshold, the cached keys are recomputed with the other factor set first.
        """
        (h,) = self.run([self._sequence_span(embeddings, cache)])
        return h[:, -embeddings.shape[1] :]

    def _sequence_span(self, embeddings: mx.array, cache: PromptCache | None) -> Span:
        """The span of a forward over one sequence's cache (its rope state advanced)."""
        length = embeddings.shape[1]
        if cache is None:
            return Span(embeddings, None, 0, self.rope.rotation(length))
        rope = cache.rope
        offset = cache.offset
        rotation = self.rope.rotation(max(offset + length, rope.expected))
        h = embeddings
        if offset and rotation.long != rope.long:
            past = rope.inputs.astype(h.dtype)
            cache.clear()
            h = mx.concatenate([past, h], axis=1)
            offset = 0
        rope.append(h)
        rope.long = rotation.long
        return Span(h, cache, offset, rotation, cache.adapter)

    def logits(self, h: mx.array) -> mx.array:
        """The LM head over final hidden states (the token embeddings when they are tied)."""
        if "lm_head" in self:
            return self.lm_head(h)
        return self.embed_tokens.as_linear(h)

    def __call__(
        self, embeddings: mx.array, cache: PromptCache | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits [B, L, vocab] for input embeddings [B, L, hidden] (L = 1 with ``last_only``)."""
        h = self.hidden(embeddings, cache)
        return self.logits(h[:, -1:] if last_only else h)

    def batch_logits(self, embeddings: mx.array, cache: list[Any]) -> mx.array:
        """Last-position logits [B, 1, vocab] of a batch step over mlx-lm's batch cache
        (per-layer ``BatchKVCache``, then :class:`RopeRows`).

        Every row is rotated with its own factor set, chosen from its own length as a solo
        generation would; a row whose length crosses the rope threshold has its cached keys
        recomputed with the other factors first, exactly as a solo cache is rebuilt.
        """
        (h,) = self.run([self._batch_span(embeddings, cache)])
        return self.logits(h[:, -1:])

    def mixed(
        self,
        embeddings: mx.array,
        cache: PromptCache,
        batch_embeddings: mx.array,
        batch_cache: list[Any],
    ) -> tuple[mx.array, mx.array]:
        """One forward over a piece of a sequence's prompt and a batch step together (their
        positions share every weight read): the piece's hidden states, as :meth:`hidden` gives
        them, and the batch's last-position logits, as :meth:`batch_logits` gives them."""
        sequence = self._sequence_span(embeddings, cache)
        h, batch_h = self.run([sequence, self._batch_span(batch_embeddings, batch_cache)])
        return h[:, -embeddings.shape[1] :], self.logits(batch_h[:, -1:])

    def _batch_span(self, embeddings: mx.array, cache: list[Any]) -> Span:
        """The span of a batch step (its rows' rope states advanced, keys recomputed where a
        row crosses the rope threshold)."""
        *layers, ropes = cache
        lengths = [rope.length + embeddings.shape[1] for rope in ropes.states]
        rotations = [self.rope.rotation(n) for n in lengths]
        for row, (rope, rotation) in enumerate(zip(ropes.states, rotations, strict=True)):
            if rope.length and rotation.long != rope.long:
                self._recompute_keys(row, layers, rope, rotation.long)
        for row, rope in enumerate(ropes.states):
            rope.append(embeddings[row : row + 1])
        adapters = tuple(rope.adapter for rope in ropes.states)
        rotation = batch_rotation(rotations)
        return Span(
            embeddings, layers, layers[0].offset, rotation, adapters if any(adapters) else None
        )

    def _recompute_keys(self, row: int, layers: list[Any], rope: RopeState, long: bool) -> None:
        """Rewrite one row's cached keys and values with the ``long`` factor set."""
        solo = self.make_cache()
        solo.rope.expected = rope.length + 1 if long else 0
        self.hidden(rope.inputs.astype(self.embed_tokens.weight.dtype), solo)
        start = int(layers[0].left_padding[row].item())
        end = start + rope.length
        for layer, computed in zip(layers, solo, strict=True):
            keys, values = computed.keys_and_values()
            layer.keys[row : row + 1, :, start:end] = keys.astype(layer.keys.dtype)
            layer.values[row : row + 1, :, start:end] = values.astype(layer.values.dtype)
        rope.long = long

    def training_hidden(
        self, embeddings: mx.array, lengths: list[int], checkpoint: bool = False
    ) -> mx.array:
        """Final hidden states [B, T, hidden] of a right-padded training batch, each row rotated
        as a forward over that row alone would be; with ``checkpoint`` each layer is recomputed
        in the backward pass instead of kept."""
        rotation = batch_rotation([self.rope.rotation(n) for n in lengths])
        span = Span(embeddings, None, 0, rotation)
        span.mask = create_attention_mask(embeddings, None, self._window(embeddings, None))
        h = embeddings
        for i, layer in enumerate(self.layers):
            if checkpoint:

                def run(params: Any, x: mx.array, layer: nn.Module = layer, i: int = i) -> mx.array:
                    layer.update(params)
                    return type(layer).__call__(layer, x, [span], i)

                h = mx.checkpoint(run)(layer.trainable_parameters(), h)
            else:
                h = layer(h, [span], i)
        return self.norm(h)


def batch_rotation(rotations: list[Rotation]) -> Rotation:
    """One rotation for a batch: shared values as such, differing ones one per row."""
    longs = {r.long for r in rotations}
    scales = {r.mscale for r in rotations}
    long = longs.pop() if len(longs) == 1 else mx.array([r.long for r in rotations])
    mscale = scales.pop() if len(scales) == 1 else mx.array([r.mscale for r in rotations])
    return Rotation(long, mscale)


class Model(DecoderModel):
    """A Phi-3 text model: the decoder alone."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.language = LanguageModel(config)

    @property
    def lora_targets(self) -> list[str]:
        """Phi-3.5-MoE adapts its attention (its experts are many); the others as the base."""
        if self.config.model_type == "phimoe":
            return ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        return super().lora_targets

    def official_weights(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Official names, Phi-3.5-MoE's experts stacked; a tied model's stored head dropped."""
        out = stack_experts(super().official_weights(weights))
        if self.config.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
        return out


EXPERT_TENSOR = re.compile(r"^(.*\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.(\w+)$")
EXPERT_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def stack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Phi-3.5-MoE's per-expert tensors (``experts.E.w1``..) stacked into the ``switch_mlp``
    projections mlx-lm uses (``gate_proj`` = w1, ``down_proj`` = w2, ``up_proj`` = w3); other
    tensors as they are."""
    out, groups = {}, {}
    for name, value in weights.items():
        match = EXPERT_TENSOR.match(name)
        if match is None:
            out[name] = value
            continue
        block, expert, projection, kind = match.groups()
        key = f"{block}.switch_mlp.{EXPERT_PROJECTIONS[projection]}.{kind}"
        groups.setdefault(key, {})[int(expert)] = value
    for key, experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"the experts of {key} are not numbered 0..{len(experts) - 1}")
        out[key] = mx.stack([experts[e] for e in range(len(experts))])
    return out


ModelConfig = TextConfig


def load_processor(path: Path, config: TextConfig) -> Processor:
    """The processor of a Phi-3 text checkpoint folder (plain-text prompts)."""
    return make_processor(path, config)
