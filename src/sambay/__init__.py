"""sambay: Phi-4-mini-flash-reasoning and the SambaY decoder-hybrid-decoder architecture in PyTorch.

Importing the package has no side effects and needs no GPU.
"""

from sambay.checkpoint import load_model, save_model
from sambay.config import PRESETS, LayerKind, SambaYConfig
from sambay.model.sambay import SambaY

__all__ = [
    "PRESETS",
    "Engine",
    "LayerKind",
    "SambaY",
    "SambaYConfig",
    "SamplingParams",
    "load_model",
    "load_tokenizer",
    "save_model",
]
__version__ = "0.1.0"

_LAZY = {  # imported on first use: the tokenizer and generation stack pull in jinja2, tokenizers, regex
    "Engine": "sambay.generate",
    "SamplingParams": "sambay.generate",
    "load_tokenizer": "sambay.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sambay' has no attribute {name!r}")
