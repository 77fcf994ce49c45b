"""SambaY model modules (see `sambay.model.sambay` for the architecture overview)."""

from sambay.model.sambay import SambaY

__all__ = ["SambaY"]
