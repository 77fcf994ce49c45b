"""Depthwise causal 1-D convolution, the short conv in front of the Mamba-1 selective scan.

Reference (pure PyTorch, fp32 math) for prefill and for the one-token decode update. Mamba (Gu & Dao,
arXiv 2312.00752, §3.4 and Fig. 3) runs this conv over the expanded channels before the SSM:
    out[t, c] = silu(bias[c] + Σ_{k=0}^{w-1} weight[c, k] · x[t - w + 1 + k, c])
with x at negative t taken from the carried conv state (zeros for a fresh sequence).

Conv state layout: (b, d, w - 1), the last w - 1 *inputs* (pre-conv x), oldest first. The released HF
cache keeps w columns; the extra one is never read (spec §4.1), so we keep the usual w - 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv with SiLU over a chunk of tokens, continuing from a carried state.

    Args:
        x: (b, t, d) inputs, any float dtype.
        weight: (d, w) per-channel taps, oldest first.
        bias: (d,) or None.
        conv_state: (b, d, w - 1) inputs that precede ``x`` (None: zeros, a fresh sequence).
        lengths: (b,) int, number of valid tokens of each row (None: all ``t``). Tokens past a row's
            length are padding: they never reach that row's new state.

    Returns:
        out: (b, t, d) in ``x.dtype`` (fp32 accumulate, one rounding).
        new_state: (b, d, w - 1) the last w - 1 valid inputs of each row, in ``x.dtype``.
    """
    b, t, d = x.shape
    w = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(b, d, w - 1)
    padded = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (b, d, w - 1 + t)
    out = F.conv1d(padded.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=d)
    out = F.silu(out).transpose(1, 2).to(x.dtype)  # (b, t, d)
    if lengths is None:
        new_state = padded[:, :, t:]
    else:  # row r's state ends at its own last valid token: columns lengths[r] .. lengths[r] + w - 2
        cols = lengths.to(torch.long).view(b, 1, 1) + torch.arange(w - 1, device=x.device).view(1, 1, -1)
        new_state = padded.gather(2, cols.expand(b, d, w - 1))
    return out, new_state.contiguous()


def causal_conv1d_update_ref(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, state_index: Tensor | None = None
) -> Tensor:
    """One decode step of the causal conv; shifts ``conv_state`` in place.

    Args:
        x: (b, d) the new input.
        conv_state: (b, d, w - 1) updated in place to end with ``x``; with ``state_index``, (rows, d, w - 1)
            of which batch row i owns row ``state_index[i]``.
        weight: (d, w); bias: (d,) or None.
        state_index: (b,) int row of ``conv_state`` for each batch row, or None (row i is row i).

    Returns:
        (b, d) silu(conv) output in ``x.dtype``.
    """
    before = conv_state if state_index is None else conv_state[state_index.long()]
    window = torch.cat([before.float(), x.float().unsqueeze(-1)], dim=-1)  # (b, d, w)
    out = (window * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    if state_index is None:
        conv_state.copy_(window[:, :, 1:].to(conv_state.dtype))
    else:
        conv_state[state_index.long()] = window[:, :, 1:].to(conv_state.dtype)
    return F.silu(out).to(x.dtype)
