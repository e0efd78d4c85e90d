"""Microsoft's Phi multimodal family in MLX."""

from .batch import BatchEngine, Request, batch_generate, stream_batch_generate
from .generate import GenerationChunk, GenerationResult, generate, stream_generate
from .loader import load
from .models.base import DecoderModel
from .processor import Processor
from .session import ChatSession

__all__ = [
    "BatchEngine",
    "ChatSession",
    "GenerationChunk",
    "GenerationResult",
    "DecoderModel",
    "Processor",
    "Request",
    "batch_generate",
    "generate",
    "load",
    "stream_batch_generate",
    "stream_generate",
]
__version__ = "0.1.0"
