"""The trainable Triton selective scan against autograd through the reference scan: outputs, final state and
every gradient (u, delta, A, B, C, D, z, delta_bias, initial state), with odd sizes, several checkpoint
chunks, padded rows, with and without gate and initial state. Under Triton's interpreter on the CPU (tiny
blocks), compiled on a GPU at realistic sizes.
"""

from __future__ import annotations

import pytest
import torch

from sambay.ops import selective_scan_ref
from tests.tolerances import assert_close, assert_low_precision

pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]

from sambay.ops.triton import selective_scan_train as tri  # noqa: E402  (after the interpreter switch)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
# b, t, d, n, lengths, gated, with h0: crossing channel blocks and checkpoint chunks (4 tokens and 4 channels
# under the interpreter), a padded row and an empty one, t = 1
CASES = [
    (2, 11, 10, 4, [11, 6], True, True),
    (3, 9, 7, 8, [9, 0, 4], False, False),
    (1, 1, 5, 4, None, True, False),
] if not ON_GPU else [
    (2, 300, 1000, 16, [300, 170], True, True),
    (1, 1, 64, 16, None, True, False),
    (3, 129, 333, 16, [129, 0, 64], False, True),
]


@pytest.fixture(autouse=True, params=["sequential", "chunked"])
def algorithm(request, monkeypatch):
    """Every test runs both algorithms (the module docstring's sequential and chunked walks)."""
    monkeypatch.setattr(tri, "ALGORITHM", request.param)
    if not ON_GPU:
        monkeypatch.setattr(tri, "BLOCK", 4)
        monkeypatch.setattr(tri, "CKPT", 4)
    return request.param


def _inputs(b, t, d, n, dtype, gated, with_h0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    A = -(torch.rand(d, n, generator=g) * 4 + 0.1).to(DEVICE)
    bias = (torch.randn(d, generator=g) - 2.0).to(DEVICE)
    return {"u": r(b, t, d), "delta": r(b, t, d, scale=0.5), "A": A, "B": r(b, t, n), "C": r(b, t, n),
            "D": r(d), "z": r(b, t, d) if gated else None, "delta_bias": bias,
            "initial_state": r(b, d, n) if with_h0 else None}


def _run(fn, inputs, dtype, lengths, gy, gh):
    """(y, final state, gradients by name) of fn on leaf copies of ``inputs`` (A and the state stay fp32)."""
    leaves = {k: None if v is None else v.to(dtype if k not in ("A", "initial_state") else torch.float32)
              .detach().requires_grad_() for k, v in inputs.items()}
    y, h = fn(*(leaves[k] for k in NAMES), lengths)
    loss = (y.float() * gy).sum()
    (loss if gh is None else loss + (h * gh).sum()).backward()  # None: the final state unused (training)
    return y, h, {k: v.grad for k, v in leaves.items() if v is not None}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_trainable_scan_matches_reference_autograd(dtype, case):
    b, t, d, n, lengths, gated, with_h0 = case
    inputs = _inputs(b, t, d, n, dtype, gated, with_h0)
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    g = torch.Generator().manual_seed(9)
    gy, gh = torch.randn(b, t, d, generator=g).to(DEVICE), torch.randn(b, d, n, generator=g).to(DEVICE)
    y, h, grads = _run(tri.selective_scan_trainable, inputs, dtype, lengths, gy, gh)
    y32, h32, grads32 = _run(selective_scan_ref, inputs, torch.float32, lengths, gy, gh)
    assert y.dtype == dtype and h.dtype == torch.float32
    if dtype == torch.float32:
        assert_close(y, y32, atol=1e-4, rtol=1e-4, what="y")
        assert_close(h, h32, atol=1e-4, rtol=1e-4, what="final state")
        for name, want in grads32.items():
            assert_close(grads[name], want, atol=1e-3, rtol=1e-3, what=f"d{name}")
        return
    y_lp, _, grads_lp = _run(selective_scan_ref, inputs, dtype, lengths, gy, gh)
    assert_low_precision(y, y_lp, y32, what="y")
    for name, want in grads32.items():
        assert grads[name].dtype == grads_lp[name].dtype, name
        assert_low_precision(grads[name], grads_lp[name], want, what=f"d{name}")


def test_padding_gets_no_gradient_and_the_scan_is_deterministic():
    inputs = _inputs(2, 9, 6, 4, torch.float32, True, False, seed=3)
    lengths = torch.tensor([9, 5], device=DEVICE)
    gy, gh = torch.ones(2, 9, 6, device=DEVICE), torch.zeros(2, 6, 4, device=DEVICE)
    _, _, first = _run(tri.selective_scan_trainable, inputs, torch.float32, lengths, gy, gh)
    _, _, second = _run(tri.selective_scan_trainable, inputs, torch.float32, lengths, gy, gh)
    assert float(first["u"][1, 5:].abs().max()) == 0.0 and float(first["delta"][1, 5:].abs().max()) == 0.0
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_shapes_are_refused_and_an_odd_d_state_runs_the_reference():
    inputs = _inputs(1, 5, 6, 4, torch.float32, False, False)
    args = [inputs[k] for k in NAMES]
    with pytest.raises(ValueError, match="D has shape"):
        tri.selective_scan_trainable(*args[:5], torch.ones(7, device=DEVICE), *args[6:])
    with pytest.raises(ValueError, match="lengths has shape"):
        tri.selective_scan_trainable(*args, torch.tensor([5, 5], device=DEVICE))
    odd = _inputs(1, 5, 6, 3, torch.float32, True, False)  # d_state 3: not a Triton block shape
    gy, gh = torch.randn(1, 5, 6, device=DEVICE), torch.randn(1, 6, 3, device=DEVICE)
    y, _, grads = _run(tri.selective_scan_trainable, odd, torch.float32, None, gy, gh)
    y_ref, _, grads_ref = _run(selective_scan_ref, odd, torch.float32, None, gy, gh)
    assert torch.equal(y, y_ref) and all(torch.equal(grads[k], grads_ref[k]) for k in grads)


def test_only_y_used_leaves_the_final_state_without_gradient():
    """Training uses y alone: the final state's gradient arrives as None (no zeros read) and changes nothing."""
    inputs = _inputs(2, 9, 6, 4, torch.float32, True, True, seed=4)
    gy = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, _, grads = _run(tri.selective_scan_trainable, inputs, torch.float32, None, gy, None)
    _, _, want = _run(selective_scan_ref, inputs, torch.float32, None, gy, None)
    for name in want:
        assert_close(grads[name], want[name], atol=1e-3, rtol=1e-3, what=f"d{name}")


def test_the_algorithm_asked_for_is_the_one_that_runs(algorithm, monkeypatch):
    """The fixture's algorithm really runs (so each test above covers both), and "auto" takes the chunked walk
    only while the sequential grid is small (rows x channel blocks below CHUNKED_BELOW_PROGRAMS_PER_SM per SM)."""
    calls = []
    real = tri._forward_chunked
    monkeypatch.setattr(tri, "_forward_chunked", lambda *a: calls.append(1) or real(*a))
    inputs = _inputs(2, 9, 6, 4, torch.float32, True, False, seed=2)
    gy = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _run(tri.selective_scan_trainable, inputs, torch.float32, None, gy, None)
    assert bool(calls) == (algorithm == "chunked")
    monkeypatch.setattr(tri, "ALGORITHM", "auto")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if ON_GPU else 4
    few = tri.CHUNKED_BELOW_PROGRAMS_PER_SM * sms * tri.BLOCK  # channels of exactly that many programs at one row
    assert tri.chunked(1, few - tri.BLOCK, torch.device(DEVICE)) and not tri.chunked(1, few, torch.device(DEVICE))
