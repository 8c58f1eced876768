"""``Tiles``: a grid of tiles over the (query, key) plane, which ``tile_bounds`` reasons about."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

__all__ = ["Tiles"]


class Tiles:
    """A grid of ``q_size x k_size`` tiles over ``q_len x kv_len`` for batch row ``b`` (the last
    row and column of tiles are cut at the lengths), or the band of it with queries in
    ``[q_from, q_to)`` (``q_from`` a multiple of ``q_size``). ``size`` is an int for square tiles
    or ``(q_size, k_size)``. ``q0``/``q1`` (``[NQ, 1]``) and ``k0``/``k1`` (``[1, NK]``) are each
    tile's first and last position, inclusive."""

    def __init__(
        self,
        b: int,
        size: int | tuple[int, int],
        q_len: int,
        kv_len: int,
        device: torch.device | None = None,
        q_from: int = 0,
        q_to: int | None = None,
    ) -> None:
        q_size, k_size = (size, size) if isinstance(size, int) else size
        self.b, self.q_size, self.k_size = b, q_size, k_size
        self.q_len, self.kv_len = q_len, kv_len
        self.q_from, self.q_to = q_from, min(q_len, q_to or q_len)
        self.k_from = 0
        q0 = torch.arange(q_from, self.q_to, q_size, device=device)
        k0 = torch.arange(0, kv_len, k_size, device=device)
        self.q0, self.q1 = q0[:, None], (q0 + q_size).clamp(max=q_len)[:, None] - 1
        self.k0, self.k1 = k0[None, :], (k0 + k_size).clamp(max=kv_len)[None, :] - 1

    def clipped(self, lo: int, hi: int) -> Tiles:
        """The tiles cut to positions ``[lo, hi)`` for queries and keys; empty tiles get a first
        position after their last. Only for bounds that read the corners, not ``span``."""
        out = copy.copy(self)
        out.q0, out.q1 = self.q0.clamp(min=lo), self.q1.clamp(max=hi - 1)
        out.k0, out.k1 = self.k0.clamp(min=lo), self.k1.clamp(max=hi - 1)
        return out

    def shifted(self, dq: int, dk: int) -> Tiles:
        """The same tiles seen ``dq`` query and ``dk`` key positions further on."""
        out = copy.copy(self)
        out.q0, out.q1, out.k0, out.k1 = self.q0 + dq, self.q1 + dq, self.k0 + dk, self.k1 + dk
        out.q_from, out.q_to, out.q_len = self.q_from + dq, self.q_to + dq, self.q_len + dq
        out.k_from, out.kv_len = self.k_from + dk, self.kv_len + dk
        return out

    def area(self) -> Tensor:
        """Pairs in each tile, ``[NQ, NK]``."""
        return (self.q1 - self.q0 + 1) * (self.k1 - self.k0 + 1)

    def span(self, values: Tensor, axis: int) -> tuple[Tensor, Tensor]:
        """Per-tile min and max of a per-position tensor along queries (0) or keys (1)."""
        v = values[self.q_from : self.q_to] if axis == 0 else values[self.k_from : self.kv_len]
        size = self.q_size if axis == 0 else self.k_size
        pad = (-v.shape[0]) % size  # repeat the last value: it changes neither min nor max
        v = torch.cat([v, v[-1:].expand(pad)]).view(-1, size)
        lo, hi = v.amin(1), v.amax(1)
        return (lo[:, None], hi[:, None]) if axis == 0 else (lo[None, :], hi[None, :])
