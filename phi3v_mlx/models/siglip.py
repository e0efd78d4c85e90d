"""The SigLIP encoder layer both Phi-4 vision towers use (Phi-4-multimodal's SigLIP, Phi-4-
reasoning-vision's SigLIP-2): attention with an optional key mask, and a tanh-GELU MLP. A config
gives ``hidden_size``, ``intermediate_size``, ``num_attention_heads`` and ``layer_norm_eps``."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


class SiglipAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        dims = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.scale = (dims // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        B, L, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))
