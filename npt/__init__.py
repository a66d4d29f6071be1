"""Equivalence pre-training of Neuro-Plastic Transformer (NPT) adapters for Llama-family models."""

from .capture import capture_teacher
from .errors import NPTError
from .layer import NPTAdapter, NPTDecoderLayer
from .losses import LOSSES, register_loss
from .model import NPTModel
from .serialization import NPTConfig

__all__ = ["NPTAdapter", "NPTConfig", "NPTDecoderLayer", "NPTError", "NPTModel", "LOSSES", "capture_teacher", "register_loss"]
