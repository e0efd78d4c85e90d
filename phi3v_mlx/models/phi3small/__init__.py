"""Phi-3-small (``phi3small``): block-sparse attention, muP, a tiktoken vocabulary."""

from .config import ModelConfig
from .model import Model

__all__ = ["Model", "ModelConfig"]
