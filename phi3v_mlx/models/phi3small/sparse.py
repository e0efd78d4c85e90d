"""Phi-3-small's block-sparse attention: which keys a query sees, and attention over only those.

Positions are cut into blocks of ``block`` tokens counted from position 0. A query in block
``bq`` sees a key at or before it in block ``bk`` when ``bq - bk < local`` (the local window)
or when ``bk`` is one of its head's vertical blocks (``bk % stride == residue[head]``). This is
the pattern the official Triton kernel visits, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# Queries attended in one piece: bounds the mask and the gathered keys of a long prompt.
QUERY_CHUNK = 512
# Up to this many queries (decode steps) read every key under a token mask: cheaper than
# gathering the visited blocks when the mask is only a few rows.
MASKED_ROWS = 8


@dataclass(frozen=True)
class SparsePattern:
    """The block-sparse layout of one layer's query heads."""

    block: int
    local: int
    stride: int
    residues: tuple[int, ...]  # per query head: its vertical blocks are those with this residue

    @classmethod
    def from_config(cls, config) -> SparsePattern:
        """The pattern of a Phi-3-small config: head h's vertical blocks are offset by
        ``h * max(1, stride // heads)`` (no offset with ``blocksparse_homo_head_pattern``)."""
        heads, stride = config.num_attention_heads, config.blocksparse_vert_stride
        step = 0 if config.blocksparse_homo_head_pattern else max(1, stride // heads)
        return cls(
            block=config.blocksparse_block_size,
            local=config.blocksparse_num_local_blocks,
            stride=stride,
            residues=tuple(-(h * step + 1) % stride for h in range(heads)),
        )

    @property
    def heads(self) -> int:
        return len(self.residues)

    def allowed(self, query_positions: mx.array, key_positions: mx.array) -> mx.array:
        """Boolean [heads, queries, keys]: whether each head's query attends each key."""
        q = query_positions[:, None]
        k = key_positions[None, :]
        local = (k <= q) & ((q // self.block) - (k // self.block) < self.local)
        residues = mx.array(self.residues)[:, None, None]
        vertical = (k <= q)[None] & ((k // self.block) % self.stride == residues)
        return local[None] | vertical

    def vertical_blocks(self, blocks: int) -> tuple[mx.array, mx.array]:
        """For the first ``blocks`` blocks: per head, the indices [heads, n] of its vertical
        blocks among them (padded with 0) and whether each index is real."""
        count = -(-blocks // self.stride)
        index = mx.array(self.residues)[:, None] + self.stride * mx.arange(count)[None]
        real = index < blocks
        return mx.where(real, index, 0), real


def block_sparse_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offset: int,
    scale: float,
    pattern: SparsePattern,
) -> mx.array:
    """Attention [B, heads, L, head_dim] of queries [B, heads, L, D] at positions ``offset``..
    over the keys and values [B, kv_heads, offset + L, D] of positions 0.. under ``pattern``."""
    length = queries.shape[2]
    if offset + length <= pattern.local * pattern.block:
        # Every key lies in every query's local window: plain causal attention.
        mask = "causal" if length > 1 else None
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    if length <= MASKED_ROWS:
        mask = pattern.allowed(mx.arange(offset, offset + length), mx.arange(offset + length))
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    parts = []
    for start in range(0, length, QUERY_CHUNK):
        end = min(length, start + QUERY_CHUNK)
        parts.append(
            _attend(
                queries[:, :, start:end],
                keys[:, :, : offset + end],
                values[:, :, : offset + end],
                offset + start,
                scale,
                pattern,
            )
        )
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def _attend(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offset: int,
    scale: float,
    pattern: SparsePattern,
) -> mx.array:
    """One chunk of queries: keys of the blocks no query of the chunk sees as local are read only
    where they are a head's vertical blocks (gathered per head); the rest under a token mask."""
    heads, length = queries.shape[1], queries.shape[2]
    kv_heads, total = keys.shape[1], keys.shape[2]
    far = max(0, offset // pattern.block - (pattern.local - 1))
    start = far * pattern.block
    mask = pattern.allowed(mx.arange(offset, offset + length), mx.arange(start, total))
    near_keys, near_values = keys[:, :, start:], values[:, :, start:]
    if not far:
        return mx.fast.scaled_dot_product_attention(
            queries, near_keys, near_values, scale=scale, mask=mask
        )
    repeats = heads // kv_heads
    index, real = pattern.vertical_blocks(far)
    tokens = index[:, :, None] * pattern.block + mx.arange(pattern.block)
    kv = (mx.arange(heads) // repeats)[:, None]
    far_tokens = tokens.reshape(heads, -1)
    far_mask = mx.repeat(real, pattern.block, axis=1)[:, None, :]
    far_mask = mx.broadcast_to(far_mask, (heads, length, far_mask.shape[-1]))
    return mx.fast.scaled_dot_product_attention(
        queries,
        mx.concatenate([keys[:, kv, far_tokens], mx.repeat(near_keys, repeats, axis=1)], axis=2),
        mx.concatenate(
            [values[:, kv, far_tokens], mx.repeat(near_values, repeats, axis=1)], axis=2
        ),
        scale=scale,
        mask=mx.concatenate([far_mask, mask], axis=-1),
    )
