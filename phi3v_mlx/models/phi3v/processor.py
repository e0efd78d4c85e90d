"""Phi-3-Vision's processor: the shared prompt handling with its HD image preparation."""

from __future__ import annotations

from pathlib import Path

from ...processor import Processor, make_processor
from .config import ModelConfig
from .images import ImageProcessor


def load_processor(path: Path, config: ModelConfig) -> Processor:
    """The processor of a Phi-3(.5)-Vision checkpoint folder."""
    images = ImageProcessor.from_folder(path, config.max_position_embeddings)
    return make_processor(path, config, images)
