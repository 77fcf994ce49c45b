"""The training loss from the final hidden states: per-token NLL without the whole logits tensor.

Why: a reasoning trace is 10-30K tokens and the release's vocabulary 200,064 ids, so one sequence's logits
are 4-12 GB in bf16, the fp32 copy cross-entropy wants twice that, and its saved softmax as much again:
at 16K tokens the loss alone would hold about 40 GB. `head_nll` computes the LM head and the cross-entropy
piece by piece (pieces of at most DENSE_LOGITS_LIMIT logits), and under autograd checkpoints each piece:
the backward recomputes one piece's logits at a time, so the peak is one piece (0.5 GB fp32), at the cost
of running the LM head's matmul once more. Short sequences (below the limit) take the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DENSE_LOGITS_LIMIT = 1 << 27  # logits (tokens x vocabulary) computed at once: 512 MB in fp32


def _piece_nll(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """(n, d) hidden states → (n,) fp32 NLL of ``targets`` (ignore index -100, as `F.cross_entropy`)."""
    return F.cross_entropy(F.linear(h, weight).float(), targets, reduction="none")


def head_nll(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Per-token NLL of ``targets`` under the LM head: h (..., d_model) final hidden states, weight
    (vocab_size, d_model), targets (...) ids → (...) fp32. Equal to cross-entropy over ``F.linear(h, weight)``."""
    flat, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    n, vocab = flat.shape[0], weight.shape[0]
    if n * vocab <= DENSE_LOGITS_LIMIT:
        return _piece_nll(flat, weight, flat_targets).view(targets.shape)
    step = max(1, DENSE_LOGITS_LIMIT // vocab)
    grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    pieces = []
    for i in range(0, n, step):
        args = (flat[i:i + step], weight, flat_targets[i:i + step])
        pieces.append(checkpoint(_piece_nll, *args, use_reentrant=False) if grad else _piece_nll(*args))
    return torch.cat(pieces).view(targets.shape)


__all__ = ["DENSE_LOGITS_LIMIT", "head_nll"]
