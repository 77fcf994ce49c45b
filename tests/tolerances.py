"""The single tolerance table of the test suite, and an assertion that reports where and how much.

fp32: fixed absolute/relative bounds. Low precision: the error of the candidate against the fp32
reference must be at most ``LOW_PRECISION_FACTOR`` times the error of the reference itself run in that
precision, plus a small atol (the rule of mamba's `test_layernorm_gated`).
"""

from __future__ import annotations

import torch
from torch import Tensor

FP32 = {"atol": 1e-5, "rtol": 1e-5}
FP32_MODEL = {"atol": 1e-4, "rtol": 1e-4}  # whole-model paths: more ops, reassociated sums
LOW_PRECISION_FACTOR = 2.0
# One unit in the last place at the output's largest magnitude: two correct fp32 results a hair apart
# can round to neighbouring low-precision values, so an exact-rounding reference cannot be matched closer.
LOW_PRECISION_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
GOLDEN_FP32_REL_TO_MAX = 1e-4  # golden logits: max |diff| <= 1e-4 * max |reference logit|


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, what: str = "") -> None:
    """torch.testing-style closeness with max-abs, mean-abs and the worst index in the message."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    if bool((diff <= bound).all()) and bool(torch.isfinite(a).all()):
        return
    worst = int((diff - bound).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    raise AssertionError(
        f"{what}: max |diff| {diff.max().item():.3e}, mean |diff| {diff.mean().item():.3e}, worst at {idx}: "
        f"{a[idx].item():.6g} vs {e[idx].item():.6g} (atol {atol}, rtol {rtol})"
    )


def max_err(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_low_precision(candidate: Tensor, reference_low: Tensor, reference_fp32: Tensor, what: str = "") -> None:
    """Candidate's error vs fp32 within LOW_PRECISION_FACTOR x the low-precision reference's own error + 1 ulp."""
    dtype = candidate.dtype if candidate.dtype in LOW_PRECISION_ULP else torch.bfloat16
    own = max_err(reference_low, reference_fp32)
    err = max_err(candidate, reference_fp32)
    limit = LOW_PRECISION_FACTOR * own + LOW_PRECISION_ULP[dtype] * reference_fp32.abs().max().item()
    assert err <= limit, f"{what}: error {err:.3e} > {LOW_PRECISION_FACTOR} x reference's own {own:.3e} + atol"


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| (the fixture README's measure of bf16 error)."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
