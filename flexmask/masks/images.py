"""Images: ``neighborhood_2d``, NATTEN's neighborhood attention over image tokens flattened row by
row."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int
from .base import MaskMod
from .leaf import Leaf, declared
from .tiles import Tiles

__all__ = ["neighborhood_2d"]


@declared
class _Neighborhood2D(Leaf):
    height: int
    width: int
    kernel: int
    dilation: int

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        w = self.width
        rows = self._axis(q_idx // w, kv_idx // w, self.height)
        return rows & self._axis(q_idx % w, kv_idx % w, self.width)

    def _axis(self, q: Tensor, kv: Tensor, size: int) -> Tensor:
        """Along one axis: the key in the query's dilation group, inside the kernel centred on the
        query within that group, shifted to stay inside it."""
        d, half = self.dilation, self.kernel // 2
        center = self._center(q, size)
        k = kv // d
        # Comparisons, no integer abs (attention-gym notes a Hopper miscompile of it).
        return (kv % d == q % d) & (k >= center - half) & (k <= center + half)

    def _center(self, p: Tensor, size: int) -> Tensor:
        """The window's centre for position ``p``, in its dilation grid's own positions: ``p``'s
        own, moved inside the grid (``size`` positions on this axis) at the borders."""
        d, half = self.dilation, self.kernel // 2
        grid_size = (size - p % d + d - 1) // d
        return torch.minimum((p // d).clamp(min=half), grid_size - 1 - half)

    def _expr(self) -> str:
        dilation = f", dilation={self.dilation}" if self.dilation != 1 else ""
        return f"neighborhood_2d({self.height}, {self.width}, {self.kernel}{dilation})"

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        n = self.height * self.width
        if q_len != n or kv_len != n:
            raise ValueError(
                f"{self!r} covers an image of {self.height} x {self.width} = {n} tokens, but the "
                f"mask is built for q_len={q_len}, kv_len={kv_len}; give every image token once, "
                "as queries and as keys."
            )
        return self

    def _windows(self, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The first and last position of each position's window along an axis of ``size``."""
        p = torch.arange(size, device=device)
        d, half = self.dilation, self.kernel // 2
        center = self._center(p, size)
        return (center - half) * d + p % d, (center + half) * d + p % d

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        # A tile's queries (or keys) lie in rows [r0, r1]; within one row, in columns [c0, c1].
        # Some pair may be kept when the keys' rows and columns meet the span of the queries'
        # windows; every pair is when each query's window holds every key (no dilation).
        t, w, dev = tiles, self.width, tiles.q0.device
        row_lo, row_hi = self._windows(self.height, dev)
        col_lo, col_hi = self._windows(w, dev)
        # Spans over a range of queries, from the ends: the windows' ends never decrease with the
        # position without dilation, and these stay sound bounds with it.
        row_lo_min = row_lo.flip(0).cummin(0).values.flip(0)  # min over positions >= p
        row_hi_max = row_hi.cummax(0).values  # max over positions <= p
        col_lo_min = col_lo.flip(0).cummin(0).values.flip(0)
        col_hi_max = col_hi.cummax(0).values
        qr0, qr1, kr0, kr1 = t.q0 // w, t.q1 // w, t.k0 // w, t.k1 // w
        q_one_row, k_one_row = qr0 == qr1, kr0 == kr1
        qc0 = torch.where(q_one_row, t.q0 % w, 0)
        qc1 = torch.where(q_one_row, t.q1 % w, w - 1)
        kc0 = torch.where(k_one_row, t.k0 % w, 0)
        kc1 = torch.where(k_one_row, t.k1 % w, w - 1)
        rows_meet = (kr0 <= row_hi_max[qr1]) & (kr1 >= row_lo_min[qr0])
        cols_meet = (kc0 <= col_hi_max[qc1]) & (kc1 >= col_lo_min[qc0])
        some = rows_meet & cols_meet
        if self.dilation != 1:
            return torch.zeros_like(some), some
        every = (
            q_one_row & k_one_row
            & (row_lo[qr0] <= kr0) & (kr0 <= row_hi[qr0])
            & (col_lo[qc1] <= kc0) & (kc1 <= col_hi[qc0])
        )  # fmt: skip
        return every, some


def neighborhood_2d(height: int, width: int, kernel: int, dilation: int = 1) -> MaskMod:
    """Neighborhood attention over an image (NATTEN): each query sees the ``kernel x kernel``
    window centred on it, shifted at the borders to stay inside the image.

    Tokens are the image's pixels (or patches) flattened row by row: token ``i`` is row
    ``i // width``, column ``i % width``. Along each axis, a query at ``p`` sees the ``kernel``
    positions centred on ``clamp(p, kernel // 2, size - 1 - kernel // 2)``. With ``dilation``
    ``d``, the image splits into ``d x d`` interleaved grids (``p % d``); each query attends
    within its own grid, ``kernel`` grid positions wide: NATTEN's dilated neighborhoods, and
    attention-gym's ``generate_natten`` for ``d = 1``. For a 3 x 3 image, ``kernel=3`` sees
    everything; ``neighborhood_2d(1, 4, 3)`` (one row of 4)::

        ■ ■ ■ ⬚
        ■ ■ ■ ⬚
        ⬚ ■ ■ ■
        ⬚ ■ ■ ■

    Args:
        height: image rows (>= 1).
        width: image columns (>= 1).
        kernel: window side, odd (>= 1); ``kernel * dilation`` at most ``height`` and ``width``
            (except along an axis of size 1, where the window is that one position).
        dilation: step between the window's positions (>= 1).

    Raises:
        TypeError: if an argument is not an int.
        ValueError: for a size below 1, an even kernel, or a window larger than the image; when
            building, if ``q_len`` or ``kv_len`` is not ``height * width``.

    Example:
        >>> import flexmask as fm
        >>> m = fm.neighborhood_2d(4, 4, 3)
        >>> fm.to_dense(m, 16)[0, 0, 0].int().view(4, 4).tolist()  # the top-left pixel's window
        [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    """
    call = "neighborhood_2d"
    h = check_int(height, f"{call}(height=...)")
    w = check_int(width, f"{call}(width=...)")
    k = check_int(kernel, f"{call}(kernel=...)")
    d = check_int(dilation, f"{call}(dilation=...)")
    if k % 2 == 0:
        raise ValueError(
            f"{call}(kernel=...) must be odd (a window centred on the query), got {k}."
        )
    for name, size in (("height", h), ("width", w)):
        if size > 1 and k * d > size:
            raise ValueError(
                f"{call}: kernel * dilation = {k} * {d} = {k * d} is larger than the image's "
                f"{name} ({size}); use a smaller kernel or dilation."
            )
    return _Neighborhood2D(h, w, k, d)
