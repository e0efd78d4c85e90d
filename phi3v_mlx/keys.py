"""What identifies work that can be reused across turns and requests: an image by its pixels,
a prompt position by its token id or the image whose slot it is, and how far two prompts
agree."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

ImageKey = tuple[str, int]  # (pixel digest, num_crops)


def image_digest(image: Any) -> str:
    """A digest of an RGB PIL image's size and pixels."""
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def position_keys(ids: Sequence[int], image_keys: Sequence[ImageKey]) -> list[Any]:
    """Per prompt position, its token id, or for an image slot (id ``-(k + 1)``) image k's key:
    the same text about another image differs from its first slot on."""
    return [t if t >= 0 else image_keys[-t - 1] for t in ids]


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
