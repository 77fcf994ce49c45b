"""The add + LayerNorm reference against torch's LayerNorm applied the way the release applies it."""

from __future__ import annotations

import torch

from tests.tolerances import assert_close


def test_add_layer_norm_reference_rounds_the_residual_like_the_release():
    from sambay.ops import add_layer_norm_ref

    x = torch.randn(2, 7, 32) * 5
    delta = torch.randn(2, 7, 32).to(torch.bfloat16)
    norm = torch.nn.LayerNorm(32).to(torch.bfloat16)
    x_new, h = add_layer_norm_ref(x, delta, norm.weight, norm.bias, norm.eps)
    assert torch.equal(x_new, x + delta.float())
    assert_close(h.float(), norm(x_new.to(torch.bfloat16)).float(), atol=1e-2, rtol=1e-2, what="bf16 norm")
