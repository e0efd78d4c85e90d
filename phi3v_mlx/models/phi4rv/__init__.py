"""Phi-4-reasoning-vision-15B (``phi4-siglip``): SigLIP-2 NaFlex images, a Phi-4 decoder, and
its reasoning modes."""

from .config import ModelConfig
from .model import Model
from .processor import load_processor
from .reasoning import ReasoningStream, split_reasoning

__all__ = ["Model", "ModelConfig", "ReasoningStream", "load_processor", "split_reasoning"]
