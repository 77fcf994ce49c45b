"""The only import surface the model uses for compute ops; the backend is chosen once, when a model is built.

Every op has a pure-PyTorch reference (``*_ref``, fp32 math, also the CPU path). A backend is a table
of functions with the reference signatures; `resolve_backend` returns one and logs the choice.
``"reference"`` always exists. ``"auto"`` picks the fastest available backend for the device and says
so; a named backend that is not available is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sambay.ops.attention import attention_ref, diff_attention_ref, visibility
from sambay.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from sambay.ops.selective_scan import selective_scan_ref, selective_state_update_ref
from sambay.ops.swiglu import swiglu_ref

__all__ = [
    "BACKENDS",
    "Ops",
    "attention_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "diff_attention_ref",
    "resolve_backend",
    "selective_scan_ref",
    "selective_state_update_ref",
    "swiglu_ref",
    "visibility",
]

log = logging.getLogger("sambay.ops")


@dataclass(frozen=True)
class Ops:
    """One backend: a function per op, each with the signature of its reference."""

    name: str
    selective_scan: Callable
    selective_state_update: Callable
    causal_conv1d: Callable
    causal_conv1d_update: Callable
    diff_attention: Callable
    attention: Callable
    swiglu: Callable


REFERENCE = Ops(
    name="reference",
    selective_scan=selective_scan_ref,
    selective_state_update=selective_state_update_ref,
    causal_conv1d=causal_conv1d_ref,
    causal_conv1d_update=causal_conv1d_update_ref,
    diff_attention=diff_attention_ref,
    attention=attention_ref,
    swiglu=swiglu_ref,
)

BACKENDS = ("auto", "reference")


def resolve_backend(name: str = "auto") -> Ops:
    """Return the op table for ``name`` ("auto" or "reference"); logged once per model build."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    if name == "auto":
        log.info("ops backend: reference (auto; no faster backend is available in this build)")
    else:
        log.info("ops backend: reference (requested)")
    return REFERENCE
