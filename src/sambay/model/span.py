"""Where the tokens of one forward call sit: per-row start positions, valid lengths and absolute positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sambay.cache import ring_positions


@dataclass(frozen=True)
class Span:
    """Positions of the new tokens of a (possibly ragged, right-padded) batch.

    Row r holds ``lengths[r]`` valid tokens at absolute positions ``start[r] .. start[r] + lengths[r] - 1``;
    the remaining columns are padding whose outputs are never read and never reach any cache.
    """

    start: Tensor  # (b,) int64 tokens already in the cache before this call
    lengths: Tensor | None  # (b,) int64 valid new tokens; None: every row uses all t columns
    q_pos: Tensor  # (b, t) int64 absolute position of each new token
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # per-call values shared by layers

    @staticmethod
    def make(start: Tensor, t: int, lengths: Tensor | None) -> Span:
        q_pos = start.view(-1, 1) + torch.arange(t, device=start.device).view(1, -1)  # (b, t)
        return Span(start=start, lengths=lengths, q_pos=q_pos)

    @property
    def is_decode(self) -> bool:
        """One token per row, every row valid: the static-shape, sync-free decode path applies."""
        return self.lengths is None and self.q_pos.shape[1] == 1

    def decode_ring(self, size: int) -> tuple[Tensor, Tensor]:
        """After this decode step's write: positions held by a ring of ``size`` slots, (b, size), and the
        number of slots in use, (b,). Computed once per call and shared by every sliding-window layer."""
        if size not in self._memo:
            end = self.start + 1
            self._memo[size] = (ring_positions(end, size), torch.clamp(end, max=size))
        return self._memo[size]

    @property
    def end(self) -> Tensor:
        """(b,) position after each row's last valid token."""
        return self.start + (self.q_pos.shape[1] if self.lengths is None else self.lengths)

    def last(self) -> tuple[Tensor, Span]:
        """Column index of each row's last valid token, (b,), and the span of those tokens alone."""
        t = self.q_pos.shape[1]
        idx = torch.full_like(self.start, t - 1) if self.lengths is None else (self.lengths - 1).clamp(min=0)
        return idx, Span(start=self.start + idx, lengths=None, q_pos=self.q_pos.gather(1, idx.view(-1, 1)))
