"""The Phi-3-small decoder: grouped-query attention (block-sparse in most layers), gegelu MLPs,
LayerNorms with biases, muP scalings and the tied, masked head."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.models.phi3small import gegelu

from ...cache import PromptCache, RopeState
from ..base import DecoderModel
from .config import ModelConfig
from .sparse import SparsePattern, block_sparse_attention


class Attention(nn.Module):
    """Attention with one fused ``query_key_value`` whose rows are grouped per kv head
    (``[q.., k, v]`` for each group), rotary over every head dimension."""

    def __init__(self, config: ModelConfig, layer: int, freqs: mx.array):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.position_scale = config.rope_position_scale
        self._freqs = freqs
        width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.pattern = None if config.is_dense(layer) else SparsePattern.from_config(config)

    def rotate(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None,
            scale=self.position_scale,
            offset=offset,
            freqs=self._freqs,
        )

    def __call__(
        self,
        x: mx.array,
        cache: Any,
        offset: int | mx.array,
        masks: dict[str, mx.array] | None = None,
    ) -> mx.array:
        """``masks`` (a batch over mlx-lm's batch cache): the token masks of the dense and the
        sparse layers; otherwise the positions are ``offset``.. for every row."""
        B, L, _ = x.shape
        groups = self.query_key_value(x).reshape(B, L, self.n_kv_heads, -1, self.head_dim)
        q = groups[..., :-2, :].reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = groups[..., -2, :].transpose(0, 2, 1, 3)
        v = groups[..., -1, :].transpose(0, 2, 1, 3)
        q, k = self.rotate(q, offset), self.rotate(k, offset)
        if isinstance(cache, QuantizedKVCache):
            raise ValueError("Phi-3-small's attention does not read a quantized KV cache (kv_bits)")
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if masks is not None:
            mask = masks["dense" if self.pattern is None else "sparse"]
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        elif self.pattern is None:
            mask = "causal" if L > 1 else None
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            out = block_sparse_attention(q, k, v, offset, self.scale, self.pattern)
        return self.dense(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """``down(gegelu(up(x)))``, gegelu over the interleaved columns of ``up``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.limit = config.gegelu_limit
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        up = self.up_proj(x)
        if self.limit is None:
            a, b = up[..., ::2], up[..., 1::2]
            return self.down_proj(a * mx.sigmoid(1.702 * a) * (b + 1))
        return self.down_proj(gegelu(up, self.limit))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, freqs: mx.array):
        super().__init__()
        self.self_attn = Attention(config, layer, freqs)
        self.mlp = MLP(config)
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)

    def __call__(
        self,
        x: mx.array,
        cache: Any,
        offset: int | mx.array,
        masks: dict[str, mx.array] | None = None,
    ) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cache, offset, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Token embeddings, the decoder layers, the final LayerNorm and the head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dims = config.head_dim
        freqs = config.rope_embedding_base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        # Computed now: a lazy array can only be evaluated on a stream of the thread that made
        # it, and generations run on other threads (a server's engine).
        mx.eval(freqs)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i, freqs) for i in range(config.num_hidden_layers)]
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        unused = mx.zeros((config.vocab_size,), dtype=mx.bool_)
        if config.unused_ids:
            unused[mx.array(config.unused_ids)] = True
        mx.eval(unused)
        self._unused = unused
        self._pattern = SparsePattern.from_config(config)

    def embed(self, input_ids: mx.array) -> mx.array:
        """Token embeddings (negative ids read row 0)."""
        return self.embed_tokens(mx.maximum(input_ids, 0))

    def make_cache(self, max_kv_size: int | None = None) -> PromptCache:
        """An empty cache for one sequence."""
        if max_kv_size is not None:
            raise ValueError(
                "Phi-3-small's block-sparse layers need every cached key: "
                "max_kv_size is not supported"
            )
        return PromptCache([KVCache() for _ in self.layers], RopeState(0))

    def _scaled(self, embeddings: mx.array) -> mx.array:
        multiplier = self.config.mup_embedding_multiplier
        return embeddings * multiplier if multiplier else embeddings

    def hidden(self, embeddings: mx.array, cache: PromptCache | None = None) -> mx.array:
        """Final-norm hidden states [B, L, hidden] of input embeddings [B, L, hidden] (the
        token embeddings, before the muP embedding multiplier), following the cached
        positions."""
        offset = 0
        if cache is not None:
            offset = cache.offset
            cache.rope.append(embeddings)
        h = self._scaled(embeddings)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None, offset)
        return self.final_layernorm(h)

    def logits(self, h: mx.array) -> mx.array:
        """The head: tied embeddings (or ``lm_head``) divided by ``mup_width_multiplier``; the
        unused vocabulary ids get the lowest value of the dtype."""
        out = self.lm_head(h) if "lm_head" in self else self.embed_tokens.as_linear(h)
        if self.config.mup_width_multiplier:
            out = out / self.config.mup_width_multiplier
        return mx.where(self._unused, mx.array(mx.finfo(out.dtype).min, out.dtype), out)

    def __call__(
        self, embeddings: mx.array, cache: PromptCache | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits [B, L, vocab] for input embeddings [B, L, hidden] (L = 1 with ``last_only``)."""
        h = self.hidden(embeddings, cache)
        return self.logits(h[:, -1:] if last_only else h)

    def batch_logits(self, embeddings: mx.array, cache: list[Any]) -> mx.array:
        """Last-position logits [B, 1, vocab] of a batch step over mlx-lm's batch cache
        (per-layer ``BatchKVCache``, then the rows' rope states), every row at its own
        positions."""
        *layers, ropes = cache
        for row, rope in enumerate(ropes.states):
            rope.append(embeddings[row : row + 1])
        first = layers[0]
        offset, padding = first.offset, first.left_padding
        length = embeddings.shape[1]
        total = first.size() + length
        query = offset[:, None] + mx.arange(length)[None]  # [B, L]
        key = mx.arange(total)[None] - padding[:, None]  # [B, S]; negative: padding
        real = (key >= 0)[:, None, :]
        dense = real & (key[:, None, :] <= query[:, :, None])
        sparse = (
            mx.stack([self._pattern.allowed(q, k) for q, k in zip(query, key, strict=True)])
            & real[:, None]
        )
        masks = {"dense": dense[:, None], "sparse": sparse}
        h = self._scaled(embeddings)
        for layer, layer_cache in zip(self.layers, layers, strict=True):
            h = layer(h, layer_cache, offset, masks)
        return self.logits(self.final_layernorm(h[:, -1:]))

    def training_hidden(
        self, embeddings: mx.array, lengths: list[int], checkpoint: bool = False
    ) -> mx.array:
        """Final hidden states [B, T, hidden] of a right-padded training batch (every row from
        position 0); with ``checkpoint`` each layer is recomputed in the backward pass."""
        h = self._scaled(embeddings)
        for layer in self.layers:
            if checkpoint:

                def run(params: Any, x: mx.array, layer: nn.Module = layer) -> mx.array:
                    layer.update(params)
                    return type(layer).__call__(layer, x, None, 0)

                h = mx.checkpoint(run)(layer.trainable_parameters(), h)
            else:
                h = layer(h, None, 0)
        return self.final_layernorm(h)


class Model(DecoderModel):
    """A Phi-3-small checkpoint: the decoder alone (a text model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language = LanguageModel(config)

    @property
    def lora_targets(self) -> list[str]:
        """Phi-3-small's fused attention and its MLP."""
        return ["self_attn.query_key_value", "self_attn.dense", "mlp.up_proj", "mlp.down_proj"]

    def official_weights(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Official names; a tied model's stored head dropped."""
        out = super().official_weights(weights)
        if self.config.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
        return out
