"""Phi-4-multimodal (``phi4_multimodal``, and the Hub's remote-code ``phi4mm``): SigLIP images,
conformer audio and the Phi-4-mini decoder with its vision and speech adapters."""

from .adapters import read_folders as extra_weights
from .config import ModelConfig
from .model import Model, allow_merged_adapters
from .processor import load_processor

__all__ = ["Model", "ModelConfig", "allow_merged_adapters", "extra_weights", "load_processor"]
