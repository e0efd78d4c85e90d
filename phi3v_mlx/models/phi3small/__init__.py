"""Phi-3-small (``phi3small``): block-sparse attention, muP, a tiktoken vocabulary."""

from .config import ModelConfig
from .model import Model
from .tokenizer import load_processor

__all__ = ["Model", "ModelConfig", "load_processor"]
