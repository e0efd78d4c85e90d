"""The cache of one sequence: its per-layer KV caches and the rope state of the positions they
hold (shared by every architecture; a decoder without rope switching just counts positions)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache


class RopeState:
    """Which rotary factors the cached keys of one sequence use, and what switching them needs.

    The official code rotates every position of a forward with the long factors once the sequence
    is longer than ``original_max_position_embeddings`` and with the short ones otherwise. When a
    cached sequence moves across that threshold its keys are recomputed with the other factor set,
    from the input embeddings of its first ``limit`` positions kept here (a switch never needs
    more). ``expected`` announces the full length of a prompt whose prefill is chunked, so that
    every chunk already uses the factors of the whole prompt. ``adapter`` names the modality
    adapter every position was computed with (Phi-4-multimodal's; None for the base weights):
    it lives here because the rope state moves with its row into and out of a batch.
    """

    def __init__(self, limit: int):
        self.adapter: str | None = None
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
    def adapter(self) -> str | None:
        """The modality adapter the held positions were computed with (None: the base)."""
        return self.rope.adapter

    @adapter.setter
    def adapter(self, key: str | None) -> None:
        self.rope.adapter = key

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
