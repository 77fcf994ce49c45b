"""sambay: Phi-4-mini-flash-reasoning and the SambaY decoder-hybrid-decoder architecture in PyTorch.

Importing the package has no side effects and needs no GPU.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sambay.checkpoint import load_model, save_model
    from sambay.config import PRESETS, LayerKind, SambaYConfig
    from sambay.generate import Engine, SamplingParams
    from sambay.model.sambay import SambaY
    from sambay.tokenizer import load_tokenizer

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

# Everything is imported on first use: `import sambay` (the CLI's first step) stays cheap, so Ctrl-C during
# start-up reaches the CLI's handler instead of interrupting torch's import, and the generation stack's
# dependencies (jinja2, tokenizers, regex) load only when needed.
_LAZY = {
    "PRESETS": "sambay.config",
    "LayerKind": "sambay.config",
    "SambaYConfig": "sambay.config",
    "SambaY": "sambay.model.sambay",
    "load_model": "sambay.checkpoint",
    "save_model": "sambay.checkpoint",
    "Engine": "sambay.generate",
    "SamplingParams": "sambay.generate",
    "load_tokenizer": "sambay.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sambay' has no attribute {name!r}")
