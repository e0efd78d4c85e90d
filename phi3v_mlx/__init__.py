"""Phi-3-Vision and Phi-3.5-Vision in MLX."""

from .config import ModelConfig
from .loader import load
from .model import Model
from .processor import Processor

__all__ = ["Model", "ModelConfig", "Processor", "load"]
__version__ = "0.1.0"
