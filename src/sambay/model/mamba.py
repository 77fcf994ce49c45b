"""Mamba-1 mixer (Gu & Dao, arXiv 2312.00752, Alg. 2 and Fig. 3) as laid out in the release (spec §3.7).

    [x | z] = in_proj(h)                      (b, t, 2 d_inner)
    u       = silu(causal_conv(x))            (b, t, d_inner)
    [δ | B | C] = x_proj(u)                   (b, t, dt_rank + 2 d_state)
    Δ_pre   = dt_proj(δ)                      the weight only: its bias is added inside the scan, in fp32
    y       = selective_scan(u, Δ_pre, A = -exp(A_log), B, C, D) ⊙ silu(z)
    out     = out_proj(y)

`MemoryMamba` is the last self-decoder Mamba of SambaY: the same parameters, but it also returns the
*ungated* readout y (the GMU memory), then gates with silu(z) outside the scan (spec §2.2, layer 16).
Prefill runs the chunked scan and stores the final conv and SSM states; a one-token decode step runs the
fused single-step updates. Dtypes: projections in the model dtype, conv and scan math in fp32,
A_log fp32 (as stored in the checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sambay.cache import MambaState
from sambay.config import SambaYConfig
from sambay.model.span import Span
from sambay.ops import Ops


class DeltaProjection(nn.Linear):
    """dt_proj: a Linear whose forward applies the weight only, since the scan adds the bias in fp32.

    Calling the module (rather than reading its weight) lets a wrapper applied from outside, such as a
    LoRA adapter (`sambay.lora`), see this projection like any other; the parameters keep their names.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class Mamba(nn.Module):
    """Selective-SSM mixer of a MAMBA layer."""

    def __init__(self, config: SambaYConfig, ops: Ops):
        super().__init__()
        d_inner, d_state, dt_rank = config.d_inner, config.d_state, config.dt_rank
        self.d_state, self.dt_rank = d_state, dt_rank
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, bias=config.conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = DeltaProjection(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d_inner, d_state, dtype=torch.float32))  # kept fp32
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=False)
        self.ops = ops

    def fp32_parameters(self) -> list[nn.Parameter]:
        """Parameters that stay fp32 whatever the model dtype (the checkpoint stores them as F32)."""
        return [self.A_log]

    def forward(self, h: Tensor, span: Span, state: MambaState | None) -> tuple[Tensor, None]:
        """h: (b, t, d_model) → ((b, t, d_model), None); updates ``state`` in place when given."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (b, t, d_inner) each
        return self.out_proj(self._ssm(x, z, span, state)), None

    def _ssm(self, x: Tensor, z: Tensor | None, span: Span, state: MambaState | None) -> Tensor:
        """Conv + selective scan; gated by silu(z) unless z is None. Returns (b, t, d_inner)."""
        weight = self.conv.weight.squeeze(1)  # (d_inner, d_conv)
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        if state is not None and span.is_decode:  # one token per row: the fused single-step updates
            u = self.ops.causal_conv1d_update(x[:, 0], state.conv, weight, self.conv.bias, state.rows)  # (b, d_inner)
            delta, B, C = self._project(u)
            y = self.ops.selective_state_update(
                state.ssm, u, delta, A, B, C, self.D, None if z is None else z[:, 0], self.dt_proj.bias, state.rows
            )
            return y.unsqueeze(1)
        conv_state = None if state is None else state.conv
        u, new_conv = self.ops.causal_conv1d(x, weight, self.conv.bias, conv_state, span.lengths)
        delta, B, C = self._project(u)
        y, new_ssm = self.ops.selective_scan(
            u, delta, A, B, C, self.D, z, self.dt_proj.bias, None if state is None else state.ssm, span.lengths
        )
        if state is not None:
            state.conv.copy_(new_conv)
            state.ssm.copy_(new_ssm)
        return y

    def _project(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u (..., d_inner) → Δ before bias (..., d_inner), B and C (..., d_state)."""
        low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return self.dt_proj(low), B, C  # the dt bias is added in fp32 by the scan


class MemoryMamba(Mamba):
    """The Mamba layer whose ungated readout becomes the memory of every GMU."""

    def forward(self, h: Tensor, span: Span, state: MambaState | None) -> tuple[Tensor, Tensor]:
        """h: (b, t, d_model) → (out (b, t, d_model), memory (b, t, d_inner) in the model dtype)."""
        x, z = self.in_proj(h).chunk(2, dim=-1)
        memory = self._ssm(x, None, span, state)  # y including the D skip, before the z gate
        return self.out_proj(self.ops.swiglu(z, memory)), memory
