"""The only import surface the model uses for compute ops; the backend is chosen once, when a model is built.

Every op has a pure-PyTorch reference (``*_ref``, fp32 math, also the CPU path). A backend is a table
of functions with the reference signatures; `resolve_backend` returns one and logs the choice.
``"reference"`` always exists. ``"auto"`` picks the fastest available backend for the device and says
so; a named backend that is not available is an error, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sambay.ops.attention import attention_ref, diff_attention_ref, visibility
from sambay.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from sambay.ops.layer_norm import add_layer_norm_ref
from sambay.ops.quantized_matmul import quantized_matmul_ref
from sambay.ops.selective_scan import selective_scan_ref, selective_state_update_ref
from sambay.ops.swiglu import swiglu_ref

__all__ = [
    "BACKENDS",
    "Ops",
    "add_layer_norm_ref",
    "attention_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "diff_attention_ref",
    "for_compile",
    "for_training",
    "quantized_matmul_ref",
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
    add_layer_norm: Callable
    quantized_matmul: Callable


REFERENCE = Ops(
    name="reference",
    selective_scan=selective_scan_ref,
    selective_state_update=selective_state_update_ref,
    causal_conv1d=causal_conv1d_ref,
    causal_conv1d_update=causal_conv1d_update_ref,
    diff_attention=diff_attention_ref,
    attention=attention_ref,
    swiglu=swiglu_ref,
    add_layer_norm=add_layer_norm_ref,
    quantized_matmul=quantized_matmul_ref,
)

BACKENDS = ("auto", "reference", "triton")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_ops() -> Ops:
    """The Triton table; raises RuntimeError when Triton or a device to run it on is missing."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
    if not (torch.cuda.is_available() or _interpreting()):
        raise RuntimeError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for slow CPU tests)")
    from sambay.ops.triton import attention, causal_conv1d, layer_norm, quantized_matmul, selective_scan, swiglu

    return Ops(
        name="triton",
        selective_scan=selective_scan.selective_scan,
        selective_state_update=selective_scan.selective_state_update,
        causal_conv1d=causal_conv1d.causal_conv1d,
        causal_conv1d_update=causal_conv1d.causal_conv1d_update,
        diff_attention=attention.diff_attention,
        attention=attention.attention,
        swiglu=swiglu.swiglu,
        add_layer_norm=layer_norm.add_layer_norm,
        quantized_matmul=quantized_matmul.quantized_matmul,
    )


def _by_device(fast: Callable, ref: Callable) -> Callable:
    """Run ``fast`` on CUDA tensors and ``ref`` elsewhere: "auto" follows the model to its device."""

    def op(first, *args, **kwargs):
        return (fast if first.is_cuda else ref)(first, *args, **kwargs)

    op.__name__ = getattr(fast, "__name__", "op")
    return op


def _attention_by_device(fast: Callable, ref: Callable) -> Callable:
    """As `_by_device`, and the reference for head sizes the Triton kernels do not handle."""

    def op(q, *args, **kwargs):
        usable = q.is_cuda and q.shape[-1] in (16, 32, 64, 128)
        return (fast if usable else ref)(q, *args, **kwargs)

    return op


def resolve_backend(name: str = "auto") -> Ops:
    """Return the op table for ``name``; the choice is logged once per model build.

    - "reference": the pure-PyTorch references, on any device.
    - "triton": the Triton kernels; an error if Triton or a CUDA device is missing.
    - "auto": Triton kernels for CUDA tensors when Triton is installed and a GPU is present, the
      references otherwise (CPU tensors, or unsupported head sizes); the resolution is reported.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    if name == "reference":
        log.info("ops backend: reference (requested)")
        return REFERENCE
    if name == "triton":
        ops = _triton_ops()
        log.info("ops backend: triton (requested)")
        return ops
    try:
        fast = _triton_ops()
    except RuntimeError as e:
        log.info("ops backend: reference (auto: %s)", e)
        return REFERENCE
    log.info("ops backend: auto (triton kernels on CUDA tensors, references on CPU tensors)")
    return Ops(
        name="auto",
        selective_scan=_by_device(fast.selective_scan, REFERENCE.selective_scan),
        selective_state_update=_by_device(fast.selective_state_update, REFERENCE.selective_state_update),
        causal_conv1d=_by_device(fast.causal_conv1d, REFERENCE.causal_conv1d),
        causal_conv1d_update=_by_device(fast.causal_conv1d_update, REFERENCE.causal_conv1d_update),
        diff_attention=_attention_by_device(fast.diff_attention, REFERENCE.diff_attention),
        attention=_attention_by_device(fast.attention, REFERENCE.attention),
        swiglu=_by_device(fast.swiglu, REFERENCE.swiglu),
        add_layer_norm=_by_device(fast.add_layer_norm, REFERENCE.add_layer_norm),
        quantized_matmul=_by_device(fast.quantized_matmul, REFERENCE.quantized_matmul),
    )


# Ops inductor writes as well as we do: short elementwise chains that it fuses with the bias adds, splits
# and casts around them. Their references are traced; every other op is a custom kernel, hidden from it.
TRACED_OPS = ("add_layer_norm", "swiglu")


def _hidden(fn: Callable) -> Callable:
    """``fn`` hidden from Dynamo: a compiled region breaks its graph at the call and runs ``fn`` as it is."""
    return torch.compiler.disable(fn, recursive=True)


def for_compile(ops: Ops) -> Ops:
    """The op table to trace with `torch.compile` (the compiled decode step, `GraphedDecoder(compile=True)`).

    Each custom kernel (scan, conv, attention, quantised matmul) is wrapped in `torch.compiler.disable`:
    Dynamo does not trace into it, so its launcher's host-side code (grids, stride checks) never becomes
    a guard, and the graph breaks there; the pieces between kernels are compiled, and inductor fuses their
    small ops (the bias adds, splits, λ, casts and residual adds a step launches one kernel each for
    otherwise). `add_layer_norm` and `swiglu` become their pure-PyTorch references, which inductor fuses
    into those same kernels instead of launching ours. Numerics: the references compute in fp32, as our
    kernels do, so the compiled step matches the eager one within bf16 rounding.
    """
    wrapped = {f.name: (getattr(REFERENCE, f.name) if f.name in TRACED_OPS
                        else _hidden(getattr(ops, f.name)))
               for f in dataclasses.fields(Ops) if f.name != "name"}
    return Ops(name=f"{ops.name}+compile", **wrapped)


def for_training(scan: str = "auto", attention: str = "auto") -> Ops:
    """The op table a training run uses: every op's reference (they have autograd), with two fast paths for
    CUDA tensors.

    ``scan``: the trainable Triton selective scan (`sambay.ops.triton.selective_scan_train`: 24-34x faster
    than autograd through the reference on the H200, and no (b, t, d, n) intermediate kept) when "triton",
    or "auto" with Triton and a GPU present; "reference": the reference scan everywhere.
    ``attention``: differential and plain attention on FlexAttention (`sambay.ops.flex_attention`: a fused
    kernel with a backward, where the reference materialises every score) when "flex", or "auto" with a GPU
    present; "reference": the reference everywhere. The other Triton kernels are inference-only, so they
    never run in training."""
    for name, value in (("scan", scan), ("attention", attention)):
        allowed = ("auto", "reference", "triton" if name == "scan" else "flex")
        if value not in allowed:
            raise ValueError(f"unknown training {name} kernel {value!r}; choose from {', '.join(map(repr, allowed))}")
    ops, names = REFERENCE, []
    if scan != "reference":
        try:
            _triton_ops()  # the same checks: Triton installed, and a GPU or the interpreter
        except RuntimeError as e:
            if scan == "triton":
                raise RuntimeError(f"the Triton training scan: {e}") from None
        else:
            from sambay.ops.triton.selective_scan_train import selective_scan_trainable

            # hidden from Dynamo (`--compile` compiles each block): the graph breaks at the scan, as for
            # for_compile's kernels
            trainable = _hidden(selective_scan_trainable)
            fast = trainable if _interpreting() else _by_device(trainable, selective_scan_ref)
            ops, names = dataclasses.replace(ops, selective_scan=fast), ["triton-scan"]
    if attention == "flex" or (attention == "auto" and torch.cuda.is_available()):
        try:
            from sambay.ops.flex_attention import attention_flex, diff_attention_flex
        except ImportError as e:  # a PyTorch without torch.nn.attention.flex_attention
            if attention == "flex":
                raise RuntimeError(f"FlexAttention training attention: {e}") from None
        else:  # hidden from Dynamo: the kernel is compiled on its own (`sambay.ops.flex_attention`)
            ops = dataclasses.replace(ops, diff_attention=_by_device(_hidden(diff_attention_flex), diff_attention_ref),
                                      attention=_by_device(_hidden(attention_flex), attention_ref))
            names.append("flex-attention")
    return ops if not names else dataclasses.replace(ops, name="train-" + "+".join(names))
