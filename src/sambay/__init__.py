"""sambay: Phi-4-mini-flash-reasoning and the SambaY decoder-hybrid-decoder architecture in PyTorch.

Importing the package has no side effects and needs no GPU.
"""

from sambay.checkpoint import load_model, save_model
from sambay.config import PRESETS, LayerKind, SambaYConfig
from sambay.model.sambay import SambaY

__all__ = ["PRESETS", "LayerKind", "SambaY", "SambaYConfig", "load_model", "save_model"]
__version__ = "0.1.0"
