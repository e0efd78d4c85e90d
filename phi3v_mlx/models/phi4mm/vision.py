"""Phi-4-multimodal's image path: the SigLIP tower over 448-px crops (padded patches masked, NaViT
position buckets), 2x2 average pooling, the HD arrangement with its separators, and the
projection to the decoder's width."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..siglip import SiglipEncoderLayer
from .config import ModelConfig, VisionConfig


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Position ids [n, g*g] of crops with patch masks [n, g, g]: a fully valid crop reads
    0..g*g-1; a partly valid one spreads its nh valid rows and nw valid columns over the g
    buckets of each side (fractions in float32, as the reference computes them); masked
    patches read 0."""
    n, g, _ = mask.shape
    boundaries = np.arange(1, g, dtype=np.float32) / np.float32(g)
    top = np.float32(1.0 - 1e-6)

    def buckets(valid: np.ndarray) -> np.ndarray:
        step = np.float32(1.0) / np.maximum(valid, 1).astype(np.float32)
        fractions = np.minimum(np.arange(g, dtype=np.float32)[None] * step[:, None], top)
        return np.searchsorted(boundaries, fractions, side="right")

    rows = buckets(mask[:, :, 0].sum(1))
    cols = buckets(mask[:, 0, :].sum(1))
    ids = (rows[:, :, None] * g + cols[:, None, :]).reshape(n, -1)
    return np.where(mask.reshape(n, -1) > 0, ids, 0)


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, p, stride=p)
        self.position_embedding = nn.Embedding(config.grid**2, config.hidden_size)

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        return patches + self.position_embedding(positions)


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [SiglipEncoderLayer(config) for _ in range(config.layers_used)]


class SiglipTower(nn.Module):
    """The SigLIP encoder up to the layer whose output feeds the projection (no pooling head,
    no final norm: the reference computes them but never uses them)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)

    def __call__(self, pixels: mx.array, mask: np.ndarray) -> mx.array:
        """Patch features [n, g*g, hidden] of crops [n, s, s, 3] with patch masks [n, g, g]."""
        h = self.embeddings(pixels, mx.array(position_ids(mask)))
        keys = mask.reshape(mask.shape[0], 1, 1, -1) > 0
        attend = None
        if not keys.all():
            # The reference adds the dtype's lowest value to padded keys' scores (not -inf).
            attend = mx.where(mx.array(keys), 0.0, mx.finfo(h.dtype).min).astype(h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, attend)
        return h


class ImageEmbedding(nn.Module):
    """Crops from the processor to the embeddings that fill each image's prompt slots."""

    def __init__(self, config: ModelConfig, crop_batch_size: int = 8):
        super().__init__()
        vision = config.vision_config
        self.grid = vision.grid
        self.crop = vision.crop_size
        self.crop_batch_size = crop_batch_size
        dims = vision.hidden_size
        self.img_processor = SiglipTower(vision)
        self.global_img_feature_extensor = mx.zeros((1, 1, dims))
        self.sub_img_feature_extensor = mx.zeros((1, 1, 1, dims))
        self.img_projection_up = nn.Linear(dims, config.hidden_size)
        self.img_projection_down = nn.Linear(config.hidden_size, config.hidden_size)

    def crop_features(
        self,
        pixels: mx.array,
        masks: np.ndarray,
        between_batches: Callable[[], None] | None = None,
    ) -> mx.array:
        """Pooled SigLIP features [n, g/2, g/2, hidden] of crops, run in bounded batches and
        evaluated as they go; ``between_batches()`` is called after each."""
        parts = []
        half = self.grid // 2
        for start in range(0, pixels.shape[0], self.crop_batch_size):
            stop = start + self.crop_batch_size
            h = self.img_processor(pixels[start:stop], masks[start:stop])
            n, _, dims = h.shape
            pooled = h.reshape(n, half, 2, half, 2, dims).mean(axis=(2, 4))
            mx.eval(pooled)
            parts.append(pooled)
            if between_batches is not None:
                between_batches()
        return mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def arrange(self, pooled: mx.array, mask: np.ndarray, rows: int, cols: int) -> mx.array:
        """One image's pooled crops (global first) as the reference lays them out: the HD grid's
        useful rows each followed by the sub separator, the global separator, then the global
        view's rows each followed by the sub separator."""
        half = self.grid // 2
        dims = pooled.shape[-1]
        sub_gn = self.sub_img_feature_extensor.reshape(1, 1, dims).astype(pooled.dtype)

        def with_row_separators(grid_rows: mx.array) -> mx.array:
            n = grid_rows.shape[0]
            sep = mx.broadcast_to(sub_gn, (n, 1, dims))
            return mx.concatenate([grid_rows, sep], axis=1).reshape(-1, dims)

        sub = pooled[1 : 1 + rows * cols].reshape(rows, cols, half, half, dims)
        sub = sub.transpose(0, 2, 1, 3, 4).reshape(rows * half, cols * half, dims)
        kept = mask[1 : 1 + rows * cols, ::2, ::2].reshape(rows, cols, half, half)
        kept = kept.transpose(0, 2, 1, 3).reshape(rows * half, cols * half)
        sub = sub[: int(kept[:, 0].sum()), : int(kept[0, :].sum())]
        glb_gn = self.global_img_feature_extensor.reshape(1, dims).astype(pooled.dtype)
        return mx.concatenate(
            [with_row_separators(sub), glb_gn, with_row_separators(pooled[0])], axis=0
        )

    def embed_crops(
        self,
        crops: mx.array,
        grids: list[tuple[int, int]],
        masks: np.ndarray | None = None,
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, its projected embeddings [num_img_tokens, hidden], from the crops of all
        images [sum of 1 + rows * cols, s, s, 3] (each image's global view, then its tiles
        row-major), each image's grid (rows, cols) and the crops' patch masks [.., g, g] (None:
        every patch valid)."""
        counts = [1 + rows * cols for rows, cols in grids]
        if sum(counts) != crops.shape[0]:
            raise ValueError(f"{crops.shape[0]} crops given but the image grids need {sum(counts)}")
        if masks is None:
            masks = np.ones((crops.shape[0], self.grid, self.grid), np.int64)
        pooled = self.crop_features(crops, masks, between_batches)
        arranged, start = [], 0
        for (rows, cols), count in zip(grids, counts, strict=True):
            part = slice(start, start + count)
            arranged.append(self.arrange(pooled[part], masks[part], rows, cols))
            start += count
        x = mx.concatenate(arranged, axis=0)
        projected = self.img_projection_down(nn.gelu(self.img_projection_up(x)))
        bounds = np.cumsum([len(a) for a in arranged])[:-1].tolist()
        return mx.split(projected, bounds) if bounds else [projected]

    def __call__(
        self,
        pixel_values: mx.array,
        image_sizes: np.ndarray,
        image_attention_mask: np.ndarray | None = None,
        between_batches: Callable[[], None] | None = None,
    ) -> list[mx.array]:
        """Per image, its projected embeddings [num_img_tokens, hidden], from the processor's
        padded batch: ``pixel_values`` [n, crops, s, s, 3] (one image: [crops, s, s, 3] too),
        ``image_sizes`` [n, 2] the (height, width) of each HD canvas, ``image_attention_mask``
        [n, crops, g, g] the patch masks (None: every patch valid); only each image's real
        1 + rows * cols crops are run."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[None]
        sizes = np.asarray(image_sizes).reshape(-1, 2)
        n, crops = pixel_values.shape[:2]
        if len(sizes) != n:
            raise ValueError(f"pixel_values holds {n} image(s) but image_sizes {len(sizes)}")
        grids = [(int(h) // self.crop, int(w) // self.crop) for h, w in sizes.tolist()]
        real = [1 + rows * cols for rows, cols in grids]
        if max(real) > crops:
            raise ValueError(
                f"image_sizes {sizes.tolist()} need {max(real)} crops but pixel_values holds "
                f"{crops} per image"
            )
        chosen = np.concatenate([i * crops + np.arange(k) for i, k in enumerate(real)])
        flat = pixel_values.reshape(n * crops, *pixel_values.shape[2:])[mx.array(chosen)]
        masks = None
        if image_attention_mask is not None:
            g = self.grid
            masks = np.asarray(image_attention_mask).reshape(n * crops, g, g)[chosen]
        return self.embed_crops(flat, grids, masks, between_batches)
