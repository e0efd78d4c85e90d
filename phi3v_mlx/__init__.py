"""Phi-3-Vision and Phi-3.5-Vision in MLX."""

from .batch import BatchEngine, Request, batch_generate, stream_batch_generate
from .config import ModelConfig
from .generate import GenerationChunk, GenerationResult, generate, stream_generate
from .loader import load
from .model import Model
from .processor import Processor
from .session import ChatSession

__all__ = [
    "BatchEngine",
    "ChatSession",
    "GenerationChunk",
    "GenerationResult",
    "Model",
    "ModelConfig",
    "Processor",
    "Request",
    "batch_generate",
    "generate",
    "load",
    "stream_batch_generate",
    "stream_generate",
]
__version__ = "0.1.0"
