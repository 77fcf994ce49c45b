"""Activation-aware scale search for weight-only quantisation (AWQ: Lin et al., arXiv 2306.00978, §3.2).

A few input channels of a projection carry much larger activations than the rest, and the rounding error
of their weights is multiplied by those activations. AWQ scales each input channel's weights up by
s = mean|x|^α before rounding (so the channels that matter lose relatively less precision) and divides
the activations by s, which leaves the float product unchanged:

    y = x W^T = (x diag(1/s)) (W diag(s))^T ≈ (x diag(1/s)) Q(W diag(s))^T

Per projection, α runs over a grid 0, 1/n, ..., 1 and the α with the smallest output error on the
calibration activations is kept. α = 0 is s = 1, plain round-to-nearest, so the chosen scale never does
worse than RTN on the calibration sample. As in AWQ, s is normalised by sqrt(max s · min s) so that it
is centred on 1. Not done: AWQ's second search (weight clipping), and running each layer on the outputs of
already-quantised layers; the activations here are the float model's, from one forward pass.

Glossary: ``n_in`` a projection's inputs, ``rows`` calibration tokens kept for the error, α ``alpha``.
Dtypes: activations are recorded and every error is computed in fp32, whatever the model dtype.

How the scale is applied at run time (an ``input_scale`` buffer of `QuantizedLinear`, 1/s) and why it is
not folded into the preceding op: `sambay.quant.format`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sambay.ops.quantized_matmul import dequantize_ref, quantize_rtn
from sambay.quant.layer import QuantSpec, projections, quantize_model


@dataclass
class Activations:
    """What calibration recorded at one projection's input."""

    mean_abs: Tensor  # (n_in,) fp32 mean |x| per input channel, over every calibration token
    sample: Tensor  # (rows, n_in) fp32, evenly spaced calibration tokens (for the output error)


@dataclass
class ScaleSearch:
    """The chosen scale of one projection and the relative output errors ||Δy||² / ||y||² it was chosen by."""

    scale: Tensor  # (n_in,) fp32 s: W diag(s) is quantised, x diag(1/s) at run time
    alpha: float  # the exponent chosen: s ∝ mean_abs^alpha
    rtn_error: float  # α = 0 (round-to-nearest)
    error: float  # the chosen α


def calibration_sequences(ids: list[int], n_tokens: int, seq_len: int) -> Tensor:
    """The first ``n_tokens`` of ``ids`` as rows of ``seq_len`` tokens (b, seq_len); a shorter text is one row.

    Raises:
        ValueError: no tokens.
    """
    ids = ids[:n_tokens]
    if not ids:
        raise ValueError("the calibration text has no tokens")
    n = len(ids) // seq_len
    if n == 0:
        return torch.tensor([ids])
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def collect_activations(model: nn.Module, sequences: Tensor, *, batch_size: int = 8,
                        max_rows: int = 1024) -> dict[str, Activations]:
    """Run the float ``model`` over ``sequences`` (b, t) and record every quantisable projection's input.

    Forward pre-hooks are registered for the pass and removed after it; the model is not changed.

    Args:
        model: a float SambaY.
        sequences: (b, t) token ids.
        batch_size: rows per forward.
        max_rows: about this many tokens are kept per projection for the output error (every k-th one).

    Returns:
        {projection path: Activations}.
    """
    stride = max(1, math.ceil(sequences.numel() / max_rows))
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    samples: dict[str, list[Tensor]] = {}

    def recorder(path: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, n_in)
            sums[path] = sums.get(path, 0) + x.abs().sum(0)
            counts[path] = counts.get(path, 0) + x.shape[0]
            samples.setdefault(path, []).append(x[::stride].cpu())
        return record

    hooks = [linear.register_forward_pre_hook(recorder(path)) for path, linear in projections(model)]
    device = next(model.parameters()).device
    try:
        for first in range(0, sequences.shape[0], batch_size):
            model(sequences[first : first + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {path: Activations((sums[path] / counts[path]).cpu(), torch.cat(samples[path])[:max_rows])
            for path in sums}


def _scale(mean_abs: Tensor, alpha: float) -> Tensor:
    # a channel that was never active would get s = 0; clamp it to a small fraction of the largest
    s = mean_abs.clamp_min(mean_abs.max().clamp_min(1e-12) * 1e-5).pow(alpha)  # (n_in,)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(weight: Tensor, activations: Activations, bits: int, group_size: int,
                 n_grid: int = 20) -> ScaleSearch:
    """The α on the grid 0, 1/n_grid, ..., 1 whose s = mean_abs^α gives the smallest output error.

    Args:
        weight: (n_out, n_in) the float weight.
        activations: the projection's calibration inputs.
        bits: 8 or 4.
        group_size: inputs per quantisation scale.
        n_grid: grid steps.

    Returns:
        The chosen `ScaleSearch` (α = 0, s = 1, when nothing beats round-to-nearest).
    """
    w = weight.detach().float().cpu()  # (n_out, n_in)
    x = activations.sample  # (rows, n_in)
    ref = x @ w.t()  # (rows, n_out)
    norm = ref.pow(2).sum().clamp_min(1e-30)
    best = None
    for i in range(n_grid + 1):
        alpha = i / n_grid
        s = _scale(activations.mean_abs, alpha)
        wq = dequantize_ref(*quantize_rtn(w * s, bits, group_size), bits, group_size) / s  # (n_out, n_in)
        error = ((x @ wq.t() - ref).pow(2).sum() / norm).item()
        if i == 0:
            rtn = error
        if best is None or error < best.error:
            best = ScaleSearch(scale=s, alpha=alpha, rtn_error=rtn, error=error)
    return best


def search_scales(model: nn.Module, activations: dict[str, Activations], spec: QuantSpec,
                  n_grid: int = 20) -> dict[str, ScaleSearch]:
    """`search_scale` for every quantisable projection of the float ``model``: {path: ScaleSearch}.

    Raises:
        ValueError: a projection that calibration never reached.
    """
    found = {}
    for path, linear in projections(model):
        if path not in activations:
            raise ValueError(f"calibration recorded no input for {path}")
        found[path] = search_scale(linear.weight, activations[path], spec.bits, spec.group_size, n_grid)
    return found


def quantize_model_awq(model: nn.Module, spec: QuantSpec, sequences: Tensor, *, batch_size: int = 8,
                       max_rows: int = 1024, n_grid: int = 20) -> dict[str, ScaleSearch]:
    """Calibrate on ``sequences`` (b, t), search each projection's scale, then quantise ``model`` in place.

    Args:
        model: a float SambaY.
        spec: bits and group size; ``input_scale`` must be set (the layout that stores 1/s).
        sequences: (b, t) calibration token ids.
        batch_size, max_rows: see `collect_activations`.
        n_grid: see `search_scale`.

    Returns:
        {projection path: ScaleSearch}, for reporting the errors.
    """
    if not spec.input_scale:
        raise ValueError("AWQ stores an input scale per projection: use QuantSpec(..., input_scale=True)")
    activations = collect_activations(model, sequences, batch_size=batch_size, max_rows=max_rows)
    found = search_scales(model, activations, spec, n_grid)
    quantize_model(model, spec, {path: result.scale for path, result in found.items()})
    return found
