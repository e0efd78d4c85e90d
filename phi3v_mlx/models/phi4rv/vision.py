"""The SigLIP-2 NaFlex vision tower (each image on its own patch grid, batched with key masks)
and the projector into the decoder's embedding space."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..siglip import SiglipEncoderLayer
from .config import ModelConfig, VisionConfig

# The reference takes ``hidden_states[-2]``: the output of the second-to-last encoder layer.
FEATURE_LAYER = -2


@lru_cache(maxsize=256)
def antialias_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch's ``interpolate(mode="bilinear", align_corners=False,
    antialias=True)`` along one axis: a triangle filter widened by the scale when shrinking
    (plain bilinear, edges clamped, when growing), each row normalised to sum 1."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        end = min(int(center + support + 0.5), in_size)
        taps = np.arange(first, end)
        w = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) * inv_scale))
        total = w.sum()
        weights[i, first:end] = w / total if total else w
    return weights


def resize_positions(table: mx.array, rows: int, cols: int) -> mx.array:
    """The square position grid ``table`` [side, side, dim] resized to [rows * cols, dim]
    (row-major) by antialiased bilinear interpolation, in float32."""
    side = table.shape[0]
    along_rows = mx.array(antialias_weights(side, rows), dtype=mx.float32)
    along_cols = mx.array(antialias_weights(side, cols), dtype=mx.float32)
    grid = table.astype(mx.float32)
    grid = mx.einsum("ry,yxd->rxd", along_rows, grid)
    grid = mx.einsum("cx,rxd->rcd", along_cols, grid)
    return grid.reshape(rows * cols, -1)


class Embeddings(nn.Module):
    """A linear patch embedding and the position grid resized to each image's patch grid."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.side = config.position_grid
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def __call__(self, patches: mx.array, grids: list[tuple[int, int]]) -> mx.array:
        """Embeddings [n, P, hidden] of ``patches`` [n, P, patch_dim]; image i's first
        rows x cols patches get its resized positions (padding rows get none)."""
        x = self.patch_embedding(patches)
        table = self.position_embedding.weight.reshape(self.side, self.side, -1)
        width = patches.shape[1]
        positions = []
        for rows, cols in grids:
            grid = resize_positions(table, rows, cols).astype(x.dtype)
            positions.append(mx.pad(grid, [(0, width - rows * cols), (0, 0)]))
        return x + mx.stack(positions)


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig, layers: int):
        super().__init__()
        self.layers = [SiglipEncoderLayer(config) for _ in range(layers)]


class VisionTower(nn.Module):
    """SigLIP-2's embeddings and the encoder layers up to the feature layer (the layers after
    it, the final norm and the pooling head never reach the model's output)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config, used_layers(config))

    def __call__(self, patches: mx.array, grids: list[tuple[int, int]]) -> mx.array:
        """Features [n, P, hidden] of a padded batch ``patches`` [n, P, patch_dim] whose image i
        fills its first rows x cols rows; padding rows are masked out as keys (their own rows
        are computed and meaningless)."""
        counts = mx.array([rows * cols for rows, cols in grids])
        mask = (mx.arange(patches.shape[1])[None] < counts[:, None])[:, None, None, :]
        x = self.embeddings(patches, grids)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x


def used_layers(config: VisionConfig) -> int:
    """Encoder layers that produce the features (``hidden_states[FEATURE_LAYER]``)."""
    return FEATURE_LAYER % (config.num_hidden_layers + 1)


class Projector(nn.Module):
    """``mlp{N}x_gelu`` (Linear, then N - 1 times exact GELU and Linear) or ``linear``, into the
    decoder's hidden size; numbered as the checkpoint's ``mm_projector`` (GELUs take the odd
    numbers)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dims = [config.mm_hidden_size] + [config.hidden_size] * config.projector_depth
        self.layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i:
                self.layers.append(nn.GELU())
            self.layers.append(nn.Linear(d_in, d_out))

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x
