"""Triton depthwise causal conv (+ SiLU) for prefill and for the one-token decode update.

Same signatures and semantics as `sambay.ops.causal_conv1d`. Prefill: each program computes a
(BLOCK_T tokens × BLOCK_D channels) tile, reading the w - 1 inputs before its first token from the
previous tile's rows or, at the start of the chunk, from the carried conv state; channels are the
contiguous axis of x (b, t, d), so every load is coalesced. The new conv state (the last w - 1 valid
inputs of each row) is gathered with a few small torch ops.

Row (batch) program ids are widened to int64 before they scale a stride: a 32K-token cache of 64 rows
holds more than 2^31 elements, and int32 offsets would wrap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 32
BLOCK_D = 128


@triton.jit
def _conv_fwd(
    x_ptr, w_ptr, bias_ptr, state_ptr, out_ptr,  # pointers
    T, D,  # dimensions
    s_xb, s_xt, s_sb, s_sd, s_ob, s_ot,  # strides (channels contiguous in x and out)
    W: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,  # meta-parameters
):
    pid_b, pid_t, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        src = offs_t - (W - 1) + k  # input time index; negative = from the carried state
        from_x = (src >= 0) & (src < T)
        xv = tl.load(x_ptr + pid_b * s_xb + src[:, None] * s_xt + offs_d[None, :],
                     mask=from_x[:, None] & mask_d[None, :], other=0.0)
        col = src + (W - 1)  # state column for src in [-(W - 1), -1]
        from_s = (src < 0) & (col >= 0)
        sv = tl.load(state_ptr + pid_b * s_sb + offs_d[None, :] * s_sd + col[:, None],
                     mask=from_s[:, None] & mask_d[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += (xv.to(tl.float32) + sv.to(tl.float32)) * wk[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * s_ob + offs_t[:, None] * s_ot + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_t < T)[:, None] & mask_d[None, :])


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton causal conv; see `causal_conv1d_ref` for arguments, shapes and returns."""
    b, t, d = x.shape
    w = weight.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError(f"causal_conv1d: x must be contiguous in channels, got strides {x.stride()}")
    state = x.new_zeros(b, d, w - 1) if conv_state is None else conv_state.to(x.dtype)
    out = torch.empty(b, t, d, dtype=x.dtype, device=x.device)
    weight = weight.contiguous()
    _conv_fwd[(b, triton.cdiv(t, BLOCK_T), triton.cdiv(d, BLOCK_D))](
        x, weight, bias if bias is not None else weight, state, out,
        t, d,
        x.stride(0), x.stride(1), state.stride(0), state.stride(1), out.stride(0), out.stride(1),
        W=w, HAS_BIAS=bias is not None, BT=BLOCK_T, BD=BLOCK_D, num_warps=4,
    )
    ends = torch.full((b,), t, device=x.device, dtype=torch.long) if lengths is None else lengths.long()
    src = ends.view(b, 1) - (w - 1) + torch.arange(w - 1, device=x.device).view(1, -1)  # (b, w - 1)
    from_x = x.gather(1, src.clamp(min=0).unsqueeze(-1).expand(b, w - 1, d)).transpose(1, 2)  # (b, d, w - 1)
    from_state = state.gather(2, (src + w - 1).clamp(0, w - 2).unsqueeze(1).expand(b, d, w - 1))
    new_state = torch.where((src >= 0).unsqueeze(1), from_x, from_state)
    return out, new_state.contiguous()


@triton.jit
def _conv_update(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, idx_ptr,  # pointers
    D,  # dimensions
    s_x, s_o,  # row strides
    W: tl.constexpr, HAS_BIAS: tl.constexpr, BD: tl.constexpr, HAS_INDEX: tl.constexpr,  # meta-parameters
):
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask = offs_d < D
    x = tl.load(x_ptr + pid_b * s_x + offs_d, mask=mask, other=0.0)
    acc = tl.load(w_ptr + offs_d * W + (W - 1), mask=mask, other=0.0).to(tl.float32) * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    state_row = tl.load(idx_ptr + pid_b).to(tl.int64) if HAS_INDEX else pid_b
    row = state_ptr + (state_row * D + offs_d) * (W - 1)
    prev = tl.load(row, mask=mask, other=0.0)
    for k in tl.static_range(W - 1):
        acc += prev.to(tl.float32) * tl.load(w_ptr + offs_d * W + k, mask=mask, other=0.0).to(tl.float32)
        if k < W - 2:
            nxt = tl.load(row + k + 1, mask=mask, other=0.0)
            tl.store(row + k, nxt, mask=mask)
            prev = nxt
    tl.store(row + (W - 2), x.to(state_ptr.dtype.element_ty), mask=mask)
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * s_o + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask)


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, state_index: Tensor | None = None
) -> Tensor:
    """Triton decode step of the conv; see `causal_conv1d_update_ref`. Shifts ``conv_state`` in place."""
    b, d = x.shape
    w = weight.shape[-1]
    rows = b if state_index is None else conv_state.shape[0]
    if not conv_state.is_contiguous() or conv_state.shape != (rows, d, w - 1):
        raise ValueError("causal_conv1d_update: conv_state must be a contiguous (b, d, w - 1) tensor")
    if state_index is not None and (state_index.shape != (b,) or state_index.is_floating_point()):
        raise ValueError(f"causal_conv1d_update: state_index must be a ({b},) integer tensor")
    out = torch.empty_like(x)
    weight = weight.contiguous()
    _conv_update[(b, triton.cdiv(d, BLOCK_D))](
        x, conv_state, weight, bias if bias is not None else weight, out,
        x if state_index is None else state_index.contiguous(),
        d, x.stride(0), out.stride(0),
        W=w, HAS_BIAS=bias is not None, BD=BLOCK_D, HAS_INDEX=state_index is not None, num_warps=4,
    )
    return out
