"""Selective scan and causal conv references against literal per-timestep oracles; step × T == scan × T."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sambay.ops import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)
from sambay.ops.selective_scan import CHUNK
from tests.tolerances import FP32, assert_close, assert_low_precision


def _inputs(b, t, d, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return dict(
        u=r(b, t, d), delta=r(b, t, d, scale=0.5), A=-torch.rand(d, n, generator=g) * 8 - 0.1,
        B=r(b, t, n), C=r(b, t, n), D=torch.randn(d, generator=g).to(dtype), z=r(b, t, d),
        delta_bias=(torch.randn(d, generator=g) - 4.0).to(dtype),  # softplus(randn - 4): realistic Δ
    )


def _scan_oracle(u, delta, A, B, C, D, z, delta_bias, h=None):
    """The recurrence written one step at a time, in float64."""
    b, t, d = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64) if h is None else h.double()
    ys = []
    for i in range(t):
        dt = F.softplus(delta[:, i].double() + delta_bias.double())
        h = torch.exp(dt[..., None] * A.double()) * h + (dt * u[:, i].double())[..., None] * B[:, i, None].double()
        y = (h * C[:, i, None].double()).sum(-1) + D.double() * u[:, i].double()
        ys.append(y if z is None else y * F.silu(z[:, i].double()))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize(
    "b,t,d,n", [(1, 1, 8, 16), (2, 37, 48, 16), (1, 2 * CHUNK + 5, 16 + 16, 32), (3, CHUNK, 5, 16)]
)
@pytest.mark.parametrize("gated", [True, False])
def test_chunked_scan_matches_sequential_oracle(b, t, d, n, gated):
    x = _inputs(b, t, d, n)
    x["z"] = x["z"] if gated else None
    h0 = torch.randn(b, d, n)
    y, h = selective_scan_ref(**x, initial_state=h0)
    y_ref, h_ref = _scan_oracle(**x, h=h0)
    assert_close(y, y_ref, **FP32, what="y")
    assert_close(h, h_ref, **FP32, what="final state")


def test_scan_with_lengths_freezes_state_after_each_row_end():
    x = _inputs(3, 20, 12, 16)
    lengths = torch.tensor([20, 7, 0])
    x["u"][1, 7:] = float("nan")  # padding must not leak, even as NaN
    _, h = selective_scan_ref(**x, lengths=lengths)
    for r, n in enumerate(lengths.tolist()):
        row = {k: (v[r : r + 1, :n] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
        h_ref = _scan_oracle(**row)[1] if n else torch.zeros(1, 12, 16)
        assert_close(h[r : r + 1], h_ref, **FP32, what=f"row {r}")


@pytest.mark.parametrize("t", [1, 9, 40])
def test_state_update_steps_equal_scan(t):
    x = _inputs(2, t, 24, 16)
    h0 = torch.randn(2, 24, 16)
    y_scan, h_scan = selective_scan_ref(**x, initial_state=h0)
    state = h0.clone()
    ys = [
        selective_state_update_ref(state, x["u"][:, i], x["delta"][:, i], x["A"], x["B"][:, i], x["C"][:, i], x["D"],
                                   x["z"][:, i], x["delta_bias"])
        for i in range(t)
    ]
    assert_close(torch.stack(ys, 1), y_scan, **FP32, what="y")
    assert_close(state, h_scan, **FP32, what="state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_fp32_math(dtype):
    x32 = _inputs(2, 50, 16, 16)
    x_lo = {k: (v.to(dtype) if k != "A" else v) for k, v in x32.items()}
    y_lo, h_lo = selective_scan_ref(**x_lo)
    assert y_lo.dtype == dtype and h_lo.dtype == torch.float32
    y32, _ = selective_scan_ref(**{k: v.to(dtype).float() if k != "A" else v for k, v in x32.items()})
    assert_low_precision(y_lo, y32.to(dtype), y32, what="scan output")


def _conv_oracle(x, weight, bias, state):
    full = torch.cat([state.transpose(1, 2), x], 1).double()  # (b, w - 1 + t, d)
    w = weight.shape[1]
    out = [
        (full[:, i : i + w] * weight.T.double()).sum(1) + (0 if bias is None else bias.double())
        for i in range(x.shape[1])
    ]
    return F.silu(torch.stack(out, 1))


@pytest.mark.parametrize("b,t,d,w", [(1, 1, 8, 4), (2, 13, 20, 4), (3, 2, 7, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv_matches_oracle_and_update_steps(b, t, d, w, with_bias):
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(b, t, d, generator=g), torch.randn(d, w, generator=g)
    bias = torch.randn(d, generator=g) if with_bias else None
    state = torch.randn(b, d, w - 1, generator=g)
    out, new_state = causal_conv1d_ref(x, weight, bias, state)
    assert_close(out, _conv_oracle(x, weight, bias, state), **FP32, what="conv")
    step_state = state.clone()
    steps = torch.stack([causal_conv1d_update_ref(x[:, i], step_state, weight, bias) for i in range(t)], 1)
    assert_close(steps, out, **FP32, what="update steps")
    assert_close(step_state, new_state, **FP32, what="state")


def test_causal_conv_state_with_lengths_ends_at_each_row():
    g = torch.Generator().manual_seed(4)
    x, weight, state = torch.randn(3, 6, 5, generator=g), torch.randn(5, 4, generator=g), torch.randn(3, 5, 3)
    _, new_state = causal_conv1d_ref(x, weight, None, state, lengths=torch.tensor([6, 2, 0]))
    assert torch.equal(new_state[0], x[0, 3:].T)
    assert torch.equal(new_state[1], torch.cat([state[1, :, 2:], x[1, :2].T], 1))
    assert torch.equal(new_state[2], state[2])

