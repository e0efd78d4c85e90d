"""Phi-3-Vision and Phi-3.5-Vision (``phi3_v``)."""

from .config import ModelConfig
from .model import Model
from .processor import load_processor

__all__ = ["Model", "ModelConfig", "load_processor"]
