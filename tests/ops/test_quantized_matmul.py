"""Weight-only quantisation ops: the RTN quantiser and packing against their stated bounds and layout (CPU),
and the Triton dequantising matmul against `quantized_matmul_ref` (GPU, or the Triton interpreter at tiny
sizes on the CPU, with blocks shrunk so that several K steps and N tiles are crossed)."""

from __future__ import annotations

import pytest
import torch

from sambay.ops.quantized_matmul import (
    QMAX,
    dequantize_ref,
    pack_int4,
    quantize_rtn,
    quantized_matmul_ref,
    unpack_int4,
)
from tests.tolerances import assert_close, assert_low_precision

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# the interpreter's tl.dot reads bf16 operands as raw bits (see test_triton_kernels): fp16 on the CPU
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]
# (rows m, n_out, n_in, group_size): decode (m = 1), odd m and n_out, a group smaller than BLOCK_K and one
# larger, n_in not a multiple of BLOCK_K, and a long prefill (dequantised, then cuBLAS)
SHAPES = [(1, 37, 96, 16), (3, 33, 64, 32), (19, 70, 96, 8), (1, 20, 40, 40), (41, 24, 64, 32)] if not ON_GPU else [
    (1, 3072 + 16, 2560, 128), (8, 2560, 10240, 128), (300, 4097, 2560, 64), (1, 5, 128, 128),
    (600, 2050, 2560, 128)]


def _weight(n_out, n_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_out, n_in, generator=g) / n_in**0.5  # a trained model's scale: rows of unit norm


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size):
    w = _weight(29, 64)
    w[3, :group_size] = 0.0  # an all-zero group: scale 0, q 0, no NaN
    q, s = quantize_rtn(w, bits, group_size)
    assert s.dtype == torch.float32 and s.shape == (29, 64 // group_size)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and q.shape == (29, 64 if bits == 8 else 32)
    err = (dequantize_ref(q, s, bits, group_size) - w).abs()
    step = s.repeat_interleave(group_size, dim=1)  # (n_out, n_in): each weight's scale
    assert bool((err <= step / 2 + 1e-7).all()), f"max err / step {(err / step.clamp_min(1e-12)).max():.3f}"
    assert s[3, 0] == 0 and bool((dequantize_ref(q, s, bits, group_size)[3, :group_size] == 0).all())
    # the group's largest |w| is represented exactly (up to fp32 rounding): the symmetric range is used fully
    qmax = q if bits == 8 else unpack_int4(q)
    assert int(qmax.abs().max()) == QMAX[bits]


def test_int4_packing_layout_is_pinned():
    """Input 2j in the low nibble, 2j + 1 in the high nibble, each q + 8 (the README's layout)."""
    q = torch.tensor([[-7, 7, 0, -1], [3, -3, 5, 2]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.tolist() == [[(7 + 8) << 4 | (-7 + 8), (-1 + 8) << 4 | 8], [5 << 4 | 11, 10 << 4 | 13]]
    assert torch.equal(unpack_int4(packed), q)
    full = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(full)), full)


def test_reference_matmul_is_dequantise_then_matmul():
    w = _weight(24, 32)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    q, s = quantize_rtn(w, 4, 16)
    y = quantized_matmul_ref(x, q, s, 4, 16)
    assert y.shape == (2, 5, 24)
    assert_close(y, x @ dequantize_ref(q, s, 4, 16).t(), atol=1e-5, rtol=1e-5, what="reference")


@pytest.mark.parametrize("bits,group_size,message", [
    (3, 16, "bits must be 8 or 4"), (4, 12, "does not divide"), (8, 7, "even number"),
])
def test_bad_arguments(bits, group_size, message):
    with pytest.raises(ValueError, match=message):
        quantize_rtn(_weight(4, 32), bits, group_size)


def _shrink_blocks(monkeypatch, tri):
    """Under the interpreter, small blocks so that tiny shapes cross several N tiles and K steps (32 inputs a
    step: an int4 step's two dots need 16 each), decode splits its inputs (split-K with the last program's
    fix-up) as the release's projections do on the H200, and 40 rows already take the dequantise path. The
    CUDA-core GEMV path takes one row whose group is a multiple of its 16-input step."""
    if ON_GPU:
        return
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_N_DECODE", "GEMV_BLOCK_K"):
        monkeypatch.setattr(tri, name, 16)
    monkeypatch.setattr(tri, "GEMV_TILES", {bits: (16, 4, 4) for bits in (4, 8, 16)})
    for name in ("BLOCK_K", "BLOCK_K_DECODE"):
        monkeypatch.setattr(tri, name, 32)
    monkeypatch.setattr(tri, "MIN_SPLIT_STEPS", 1)
    monkeypatch.setattr(tri, "DEQUANTIZE_ROWS", 40)


def test_decode_splits_the_inputs_when_the_tiles_are_too_few(monkeypatch):
    pytest.importorskip("triton")
    from sambay.ops.triton import quantized_matmul as tri

    _shrink_blocks(monkeypatch, tri)
    dev = torch.device(DEVICE)
    if ON_GPU:  # the release's out_proj of the MLP: 40 tiles of 64 outputs over 10,240 inputs
        assert tri._split(40, 10240, tri.BLOCK_K_DECODE, dev) >= 8
        enough = tri.MIN_PROGRAMS_PER_SM * tri._sm_count(dev)  # tiles enough to fill the GPU: no split
        assert tri._split(enough, 2560, tri.BLOCK_K_DECODE, dev) == 1
        assert tri._split(enough // 2, 2560, tri.BLOCK_K_DECODE, dev) == 2
    else:  # 4 "SMs" here: 3 tiles of 16 outputs, 64 inputs in steps of 32
        assert tri._split(3, 64, 32, dev) == 2
        assert tri._split(64, 64, 32, dev) == 1


@pytest.mark.parametrize("path", ["auto", "gemv", "dot"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,n_out,n_in,group_size", SHAPES)
def test_triton_matches_reference(monkeypatch, dtype, bits, m, n_out, n_in, group_size, path):
    """Every path against the reference: "auto" as dispatched, "gemv" forces the GEMV path in both formats,
    "dot" sends a GEMV-eligible row through the tl.dot decode kernel."""
    pytest.importorskip("triton")
    from sambay.ops.triton import quantized_matmul as tri

    _shrink_blocks(monkeypatch, tri)
    if path != "auto":
        if m > tri.GEMV_ROWS or group_size % tri.GEMV_BLOCK_K:
            pytest.skip("these rows never take the GEMV path")
        monkeypatch.setattr(tri, "GEMV_FORMATS", (4, 8) if path == "gemv" else ())
    q, s = quantize_rtn(_weight(n_out, n_in), bits, group_size)
    q, s = q.to(DEVICE), s.to(DEVICE)
    x = torch.randn(m, n_in, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = tri.quantized_matmul(x.to(dtype), q, s, bits, group_size)
    assert torch.equal(tri.quantized_matmul(x.to(dtype), q, s, bits, group_size), out), "split-K is deterministic"
    assert all(int(counts.abs().sum()) == 0 for _, counts in tri._workspaces.values()), "counters reset"
    ref32 = quantized_matmul_ref(x, q, s, bits, group_size)
    what = f"quantized_matmul {bits}-bit {dtype}"
    if dtype == torch.float32:
        assert_close(out, ref32, atol=1e-4, rtol=1e-4, what=what)
    else:
        assert out.dtype == dtype, what
        assert_low_precision(out, quantized_matmul_ref(x.to(dtype), q, s, bits, group_size), ref32, what=what)


def test_triton_keeps_leading_dims_and_rejects_a_wrong_layout():
    pytest.importorskip("triton")
    from sambay.ops.triton import quantized_matmul as tri

    q, s = quantize_rtn(_weight(16, 32), 4, 16)
    x = torch.randn(2, 3, 32).to(DEVICE)
    q, s = q.to(DEVICE), s.to(DEVICE)
    assert_close(tri.quantized_matmul(x, q, s, 4, 16), quantized_matmul_ref(x, q, s, 4, 16), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="qweight"):
        tri.quantized_matmul(x, q, s, 8, 16)  # packed int4 read as int8
    with pytest.raises(ValueError, match="scales"):
        tri.quantized_matmul(x, q, s.half(), 4, 16)


@pytest.mark.parametrize("m,group_steps,bits,gemv", [(1, 2, 4, True), (2, 2, 4, False), (1, 0.5, 4, False),
                                                     (1, 2, 8, False)])
def test_which_rows_take_the_gemv_path(monkeypatch, m, group_steps, bits, gemv):
    """One int4 row with a group that is a multiple of the GEMV step takes the CUDA-core path; others not (int8
    rows measured faster on tl.dot)."""
    pytest.importorskip("triton")
    from sambay.ops.triton import quantized_matmul as tri

    _shrink_blocks(monkeypatch, tri)
    launched = []
    kernel = tri._quantized_gemv

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tri, "_quantized_gemv", Spy())
    group_size = int(group_steps * tri.GEMV_BLOCK_K)  # a group of two GEMV steps, or of half a step
    n_in = 5 * group_size
    q, s = quantize_rtn(_weight(24, n_in), bits, group_size)
    x = torch.randn(m, n_in, generator=torch.Generator().manual_seed(3))
    out = tri.quantized_matmul(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), bits, group_size)
    assert bool(launched) is gemv
    assert_close(out, quantized_matmul_ref(x, q, s, bits, group_size).to(DEVICE), atol=1e-4, rtol=1e-4, what="out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_out,n_in", [(37, 96), (33, 80), (20, 40)] if not ON_GPU else
                         [(3072 + 16, 2560), (2560, 10240), (5, 130)])
def test_plain_gemv_matches_matmul(monkeypatch, dtype, n_out, n_in):
    """The GEMV path on a plain weight (no scales) against x @ W^T, split-K included."""
    pytest.importorskip("triton")
    from sambay.ops.triton import quantized_matmul as tri

    _shrink_blocks(monkeypatch, tri)
    w = _weight(n_out, n_in).to(DEVICE)
    x = torch.randn(1, n_in, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out = tri.gemv(x.to(dtype), w.to(dtype))
    ref32 = x @ w.t()
    if dtype == torch.float32:
        assert_close(out, ref32, atol=1e-4, rtol=1e-4, what="gemv")
    else:
        assert_low_precision(out, (x.to(dtype) @ w.to(dtype).t()), ref32, what=f"gemv {dtype}")
    with pytest.raises(ValueError, match="one row"):
        tri.gemv(torch.randn(2, n_in, device=DEVICE, dtype=dtype), w.to(dtype))
