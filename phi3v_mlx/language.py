"""The Phi-3 decoder (and Phi-3.5-MoE's) with su-scaled (LongRoPE) rotary embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.phimoe import sparsemixer
from mlx_lm.models.switch_layers import SwitchGLU

from .config import ModelConfig


class RopeState:
    """Which rotary factors the cached keys of one sequence use, and what switching them needs.

    The official code rotates every position of a forward with the long factors once the sequence
    is longer than ``original_max_position_embeddings`` and with the short ones otherwise. When a
    cached sequence moves across that threshold its keys are recomputed with the other factor set,
    from the input embeddings of its first ``limit`` positions kept here (a switch never needs
    more). ``expected`` announces the full length of a prompt whose prefill is chunked, so that
    every chunk already uses the factors of the whole prompt.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[mx.array] = []  # input embeddings [1, n, hidden] of the first positions
        self.kept = 0
        self.length = 0
        self.long = False
        self.expected = 0

    @property
    def inputs(self) -> mx.array | None:
        """The kept input embeddings [1, min(length, limit), hidden]."""
        if len(self.chunks) > 1:
            self.chunks = [mx.concatenate(self.chunks, axis=1)]
        return self.chunks[0] if self.chunks else None

    def append(self, embeddings: mx.array) -> None:
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(embeddings[:, :room])
            self.kept += min(room, embeddings.shape[1])
        self.length += embeddings.shape[1]

    def trim_to(self, length: int) -> None:
        self.length = min(self.length, length)
        self.expected = 0
        if self.kept > self.length:
            self.chunks = [self.inputs[:, : self.length]] if self.length else []
            self.kept = self.length

    def clear(self) -> None:
        """Forget the kept positions (``expected`` still announces the prompt being read)."""
        self.chunks, self.kept, self.length = [], 0, 0

    @property
    def nbytes(self) -> int:
        return sum(chunk.nbytes for chunk in self.chunks)

    @classmethod
    def merge(cls, states: list[RopeState]) -> RopeRows:
        """The rope states of rows joining a batch (as mlx-lm merges KV caches into a batch)."""
        return RopeRows(list(states))


class RopeRows:
    """The :class:`RopeState` of every row of a batch: an entry of the batch's cache list, after
    the layer caches, so that mlx-lm's batch generator moves it with the rows (``extend``,
    ``filter``, ``extract``) as it moves the layer caches."""

    def __init__(self, states: list[RopeState]):
        self.states = states

    def extend(self, other: RopeRows) -> None:
        self.states.extend(other.states)

    def filter(self, keep: list[int]) -> None:
        self.states = [self.states[i] for i in keep]

    def extract(self, index: int) -> RopeState:
        return self.states[index]

    def prepare(self, **kwargs: Any) -> None:
        """Rows join with their prompts already read: nothing to pad."""

    def finalize(self) -> None:
        """Rows join with their prompts already read: nothing to pad."""

    @property
    def state(self) -> list[mx.array]:
        return [chunk for rope in self.states for chunk in rope.chunks]

    @property
    def nbytes(self) -> int:
        return sum(rope.nbytes for rope in self.states)

    def size(self) -> int:
        return max((rope.length for rope in self.states), default=0)

    def empty(self) -> bool:
        return not self.states

    def is_trimmable(self) -> bool:
        return False


class PromptCache(list):
    """The cache of one sequence: its per-layer KV caches, in order (the list mlx-lm's
    ``generate_step`` reads and updates in place), and the :class:`RopeState` of the positions
    they hold."""

    def __init__(self, layers: list[Any], rope: RopeState):
        super().__init__(layers)
        self.rope = rope

    @property
    def offset(self) -> int:
        """Positions held by every layer (a step cut short leaves some layers ahead)."""
        return min(layer.offset for layer in self)

    def trim_to(self, length: int) -> bool:
        """Keep only the first ``length`` positions in every layer; False if a layer cannot
        give positions back (a full rotating cache) or holds fewer."""
        if any(layer.offset < length for layer in self):
            return False
        if any(layer.offset > length and not layer.is_trimmable() for layer in self):
            return False
        for layer in self:
            layer.trim(layer.offset - length)
        self.rope.trim_to(length)
        return True

    def clear(self) -> None:
        """Hold nothing, keeping the kind of each layer cache."""
        for i, layer in enumerate(self):
            if layer.is_trimmable():
                layer.trim(layer.offset)
            elif isinstance(layer, RotatingKVCache):
                self[i] = RotatingKVCache(max_size=layer.max_size, keep=layer.keep)
            else:
                raise ValueError(f"cannot empty a {type(layer).__name__}")
        self.rope.clear()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self) + self.rope.nbytes


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding of one forward: the long or the short factors, and the multiplier of
    cos and sin (``mscale``); each is one value, or one per row of a batch."""

    long: bool | mx.array
    mscale: float | mx.array


class SuScaledRope:
    """Rotary frequencies for short and long sequences, and the threshold between them."""

    def __init__(self, config: ModelConfig):
        dims = config.head_dim
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


class Attention(nn.Module):
    """Grouped-query attention: one fused ``qkv_proj`` (Phi-3), or biased ``q_proj``, ``k_proj``
    and ``v_proj`` (Phi-3.5-MoE)."""

    def __init__(self, config: ModelConfig, rope: SuScaledRope):
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

    def __call__(
        self, x: mx.array, mask: Any, cache: Any, offset: int | mx.array, rotation: Rotation
    ) -> mx.array:
        B, L, _ = x.shape
        if "qkv_proj" in self:
            q_end = self.n_heads * self.head_dim
            q, k, v = mx.split(
                self.qkv_proj(x), [q_end, q_end + self.n_kv_heads * self.head_dim], -1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset, rotation.long)
        k = self.rope(k, offset, rotation.long)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # mscale multiplies cos and sin for queries and keys: mscale^2 on the scores.
        scale = self.head_dim**-0.5
        if isinstance(rotation.mscale, mx.array):
            q = q * (rotation.mscale**2).astype(q.dtype).reshape(-1, 1, 1, 1)
        else:
            scale *= rotation.mscale**2
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


class SparseMoE(nn.Module):
    """Phi-3.5-MoE's experts: each token goes to its chosen experts by the inference rule of the
    official sparsemixer (the 2% band around each choice, weights not renormalized)."""

    def __init__(self, config: ModelConfig):
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


def _norm(config: ModelConfig) -> nn.Module:
    """RMSNorm, or LayerNorm with a bias (Phi-3.5-MoE)."""
    if config.model_type == "phimoe":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rope: SuScaledRope):
        super().__init__()
        self.self_attn = Attention(config, rope)
        if config.model_type == "phimoe":
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = MLP(config)
        self.input_layernorm = _norm(config)
        self.post_attention_layernorm = _norm(config)

    def __call__(
        self, x: mx.array, mask: Any, cache: Any, offset: int | mx.array, rotation: Rotation
    ) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask, cache, offset, rotation)
        feed_forward = self.block_sparse_moe if "block_sparse_moe" in self else self.mlp
        return x + feed_forward(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Token embeddings, the Phi-3 decoder layers, the final norm and the LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rope = SuScaledRope(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, self.rope) for _ in range(config.num_hidden_layers)]
        self.norm = _norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)

    def embed(self, input_ids: mx.array) -> mx.array:
        """Embeddings of token ids; negative ids (image slots) read row 0 until filled."""
        return self.embed_tokens(mx.maximum(input_ids, 0))

    def make_cache(self, max_kv_size: int | None = None) -> PromptCache:
        """An empty cache for one sequence (rotating layer caches with ``max_kv_size``)."""
        if max_kv_size is None:
            layers = [KVCache() for _ in self.layers]
        else:
            layers = [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in self.layers]
        return PromptCache(layers, RopeState(self.config.original_max_position_embeddings))

    def run(
        self,
        h: mx.array,
        layer_caches: list[Any] | None,
        offset: int | mx.array,
        rotation: Rotation,
    ) -> mx.array:
        """The decoder layers and the final norm over input embeddings ``h`` [B, L, hidden] at
        positions ``offset``.., with the given rotary embedding."""
        layer_caches = layer_caches or [None] * len(self.layers)
        mask = create_attention_mask(
            h, layer_caches[0], window_size=self._window(h, layer_caches[0])
        )
        for layer, layer_cache in zip(self.layers, layer_caches, strict=True):
            h = layer(h, mask, layer_cache, offset, rotation)
        return self.norm(h)

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
        length = embeddings.shape[1]
        if cache is None:
            return self.run(embeddings, None, 0, self.rope.rotation(length))
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
        return self.run(h, cache, offset, rotation)[:, -length:]

    def __call__(
        self, embeddings: mx.array, cache: PromptCache | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits [B, L, vocab] for input embeddings [B, L, hidden] (L = 1 with ``last_only``)."""
        h = self.hidden(embeddings, cache)
        return self.lm_head(h[:, -1:] if last_only else h)
