"""The vision side: CLIP crop features, the HD arrangement and the projection to text width."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig, VisionConfig

CROP = 336


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dims = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dims // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class ClipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = ClipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )
        self.class_embedding = mx.zeros((config.hidden_size,))
        self.position_embedding = nn.Embedding(config.grid**2 + 1, config.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))
        B = patches.shape[0]
        patches = patches.reshape(B, -1, patches.shape[-1])
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (B, 1, patches.shape[-1]))
        x = mx.concatenate([cls, patches], axis=1)
        # Called, not read as .weight: a checkpoint may store the table quantized.
        return x + self.position_embedding(mx.arange(x.shape[1]))


class ClipVisionTower(nn.Module):
    """CLIP ViT truncated to the layers that produce the selected hidden state."""

    def __init__(self, config: VisionConfig, num_layers: int):
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = [ClipEncoderLayer(config) for _ in range(num_layers)]

    def __call__(self, pixels: mx.array) -> mx.array:
        """Patch features [B, grid*grid, hidden] of crops [B, 336, 336, 3] (CLS dropped)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:]


class Projector(nn.Module):
    """Linear, exact GELU, Linear: merged CLIP features to the text width."""

    def __init__(self, in_dims: int, out_dims: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dims, out_dims)
        self.linear_2 = nn.Linear(out_dims, out_dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))


def merge_2x2(features: mx.array, grid: int) -> mx.array:
    """[n, grid*grid, C] patch features to [n, grid/2, grid/2, 4C], each 2x2 block concatenated."""
    n, _, C = features.shape
    half = grid // 2
    x = features.reshape(n, half, 2, half, 2, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, half, half, 4 * C)


class VisionEncoder(nn.Module):
    """Images (crops from the processor) to the embeddings that fill their prompt slots."""

    def __init__(self, config: ModelConfig, crop_batch_size: int = 8):
        super().__init__()
        vision = config.vision_config
        self.grid = vision.grid
        self.order = config.embd_layer.hd_transform_order
        self.crop_batch_size = crop_batch_size
        width = 4 * config.img_processor.image_dim_out
        self.clip = ClipVisionTower(vision, config.clip_layers_used)
        self.glb_GN = mx.zeros((1, 1, width))
        self.sub_GN = mx.zeros((1, 1, 1, width))
        self.projection = Projector(width, config.hidden_size)

    def crop_features(
        self, pixel_values: mx.array, between_batches: Callable[[], None] | None = None
    ) -> mx.array:
        """CLIP patch features of every crop, run in bounded batches and evaluated as they go;
        ``between_batches()`` is called after each."""
        parts = []
        for start in range(0, pixel_values.shape[0], self.crop_batch_size):
            part = self.clip(pixel_values[start : start + self.crop_batch_size])
            mx.eval(part)
            parts.append(part)
            if between_batches is not None:
                between_batches()
        return mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def arrange(self, features: mx.array, rows: int, cols: int) -> mx.array:
        """One image's crop features (global first) laid out as the official HD transform does."""
        half = self.grid // 2
        merged = merge_2x2(features, self.grid)
        width = merged.shape[-1]
        sub_gn = self.sub_GN.reshape(1, 1, width).astype(merged.dtype)

        def with_row_separators(grid_rows: mx.array) -> mx.array:
            n = grid_rows.shape[0]
            sep = mx.broadcast_to(sub_gn, (n, 1, width))
            return mx.concatenate([grid_rows, sep], axis=1).reshape(-1, width)

        glb = with_row_separators(merged[0])
        sub = merged[1:].reshape(rows, cols, half, half, width).transpose(0, 2, 1, 3, 4)
        sub = with_row_separators(sub.reshape(rows * half, cols * half, width))
        glb_gn = self.glb_GN.reshape(1, width).astype(merged.dtype)
        parts = [sub, glb_gn, glb] if self.order == "sub_glb" else [glb, glb_gn, sub]
        return mx.concatenate(parts, axis=0)

    def __call__(
        self,
        pixel_values: mx.array,
        image_sizes: Sequence[Sequence[int]],
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, its projected embeddings [num_img_tokens, hidden].

        ``pixel_values`` holds the real crops of all images, [n, 336, 336, 3]: per image its global
        view, then its HD crops row-major; ``image_sizes`` the padded (height, width) of each.
        """
        grids = [(int(h) // CROP, int(w) // CROP) for h, w in image_sizes]
        counts = [rows * cols + 1 for rows, cols in grids]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} crops but image_sizes "
                f"{[list(map(int, s)) for s in image_sizes]} need {sum(counts)}"
            )
        features = self.crop_features(pixel_values, between_batches)
        arranged, start = [], 0
        for (rows, cols), count in zip(grids, counts, strict=True):
            arranged.append(self.arrange(features[start : start + count], rows, cols))
            start += count
        projected = self.projection(mx.concatenate(arranged, axis=0))
        bounds = [len(a) for a in arranged]
        return mx.split(projected, [sum(bounds[: i + 1]) for i in range(len(bounds) - 1)])
