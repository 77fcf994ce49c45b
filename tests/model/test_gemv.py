"""`sambay.model.gemv`: batch-1 decode projections on the GEMV kernel give the logits of `nn.Linear`, and only
one-row, no-grad, half-precision calls take it (here under Triton's interpreter; on a GPU, compiled)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sambay.model.gemv import GemvLinear, use_gemv
from tests.conftest import forward, random_model, small_config
from tests.tolerances import assert_low_precision

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def test_decode_on_the_gemv_kernel_gives_the_linear_logits(monkeypatch):
    calls = []
    from sambay.ops.triton import quantized_matmul

    kernel = quantized_matmul.gemv
    monkeypatch.setattr(quantized_matmul, "gemv", lambda *a: calls.append(a[0].shape) or kernel(*a))
    reference = random_model(small_config()).to(DEVICE)
    plain = random_model(small_config()).to(device=DEVICE, dtype=DTYPE)
    fast = random_model(small_config()).to(device=DEVICE, dtype=DTYPE)
    n = use_gemv(fast)
    assert n == sum(type(m) is GemvLinear for m in fast.modules()) > 0
    assert fast.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = {}
    with torch.no_grad():
        for name, model in (("reference", reference), ("plain", plain), ("fast", fast)):
            cache = model.new_cache(batch_size=1, max_length=16)
            forward(model, ids[:, :6], cache)
            calls.clear()
            logits[name] = torch.cat([forward(model, ids[:, t : t + 1], cache) for t in range(6, 9)], 1)
    assert len(calls) == 3 * n  # every projection of every decode step went through the kernel
    assert_low_precision(logits["fast"], logits["plain"], logits["reference"], what="gemv decode logits")


def test_only_one_row_without_grad_takes_the_kernel(monkeypatch):
    from sambay.ops.triton import quantized_matmul

    monkeypatch.setattr(quantized_matmul, "gemv", lambda *a: pytest.fail("the kernel was used"))
    linear, full = nn.Linear(16, 8).to(device=DEVICE, dtype=DTYPE), nn.Linear(16, 8).to(DEVICE)
    use_gemv(nn.Sequential(linear, full))
    with torch.no_grad():
        linear(torch.randn(2, 16, device=DEVICE, dtype=DTYPE))  # two rows
        full(torch.randn(1, 16, device=DEVICE))  # fp32
    linear(torch.randn(1, 16, device=DEVICE, dtype=DTYPE, requires_grad=True))  # autograd
