"""`head_nll` (the training loss from hidden states) against cross-entropy over the whole logits: the same
values and gradients on the plain and the piecewise path, ignored targets, and no logits-sized tensor kept
for the backward; `SambaY.forward(targets=...)` against its own logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sambay.model import loss
from sambay.model.loss import head_nll
from tests.conftest import random_model, small_config
from tests.tolerances import FP32, assert_close


def _case(n=37, d=12, vocab=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, d, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (2, n), generator=g)
    targets[0, 3] = -100  # ignored, as F.cross_entropy ignores it
    return h, w, targets


def _grads(fn, h, w, targets):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn(h, w, targets)
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    return out.detach(), h.grad, w.grad


def _dense(h, w, targets):
    return F.cross_entropy(F.linear(h, w).flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


@pytest.mark.parametrize("limit", [1 << 27, 53 * 10, 53 * 7 + 1, 1])  # plain; pieces of 10, 7 and 1 tokens
def test_head_nll_equals_cross_entropy_over_all_logits(monkeypatch, limit):
    monkeypatch.setattr(loss, "DENSE_LOGITS_LIMIT", limit)
    h, w, targets = _case()
    got, want = _grads(head_nll, h, w, targets), _grads(_dense, h, w, targets)
    assert got[0][0, 3] == 0
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, **FP32)


def test_the_piecewise_path_keeps_no_logits_for_the_backward(monkeypatch):
    monkeypatch.setattr(loss, "DENSE_LOGITS_LIMIT", 53 * 8)
    h, w, targets = _case(n=64)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = head_nll(h, w, targets)
    assert max(saved) < 2 * 64 * 53  # the whole (128, 53) logits would be 6,784 elements; a piece is 424
    out.sum().backward()  # the pieces' logits are recomputed one at a time
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        _dense(h, w, targets)
    assert max(saved) >= 2 * 64 * 53  # the check above can fail: the dense path does keep them


def test_model_forward_with_targets_equals_its_logits_nll():
    model = random_model(small_config())
    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(tokens, -1, dims=1)
    nll = model(tokens, targets=targets)
    logits = model(tokens)
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    assert nll.dtype == torch.float32 and nll.shape == targets.shape
    assert_close(nll, want, **FP32)
    with pytest.raises(ValueError, match="targets"):
        model(tokens, targets=targets[:, :5])
    with pytest.raises(ValueError, match="targets"):
        model(tokens, model.new_cache(batch_size=2, max_length=32), targets=targets)
