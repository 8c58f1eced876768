"""Masks in absolute positions: ``shifted`` (queries and keys seen from further on)."""

from __future__ import annotations

from torch import Tensor

from .._checks import check_int, int_tensor
from .algebra import as_mask
from .base import MaskMod, MaskModFn
from .leaf import Wrapper, declared, fmt_tensor
from .tiles import Tiles

__all__ = ["shifted", "with_offset"]


@declared
class _Shifted(Wrapper):
    """``inner`` evaluated ``q_offset`` query (and ``kv_offset`` key) positions further on."""

    inner: MaskMod
    q_offset: int | Tensor  # an int, or a 0-d or [B] tensor that may change without recompiling
    kv_offset: int = 0

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q = self.q_offset
        q = q[b] if isinstance(q, Tensor) and q.dim() == 1 else q  # one offset per batch row
        return self.inner(b, h, q_idx + q, kv_idx + self.kv_offset)

    def _own_batch(self) -> int | None:
        q = self.q_offset
        return q.shape[0] if isinstance(q, Tensor) and q.dim() == 1 else self.inner.batch_size

    def _expr(self) -> str:
        q = self.q_offset
        shown = fmt_tensor(q) if isinstance(q, Tensor) else str(q)
        kv = f", kv_offset={self.kv_offset}" if self.kv_offset else ""
        return f"shifted({self.inner!r}, q_offset={shown}{kv})"

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        # The inner mask sees absolute positions. A tensor offset may change after building, so
        # its queries are assumed to stay inside the keys (bottom-right alignment or before).
        frame_kv = kv_len + self.kv_offset
        frame_q = frame_kv if isinstance(self.q_offset, Tensor) else q_len + self.q_offset
        bound = self.inner.bind(frame_q, frame_kv)
        return self if bound is self.inner else _Shifted(bound, self.q_offset, self.kv_offset)

    @property
    def exact_bounds(self) -> bool:
        return self.inner.exact_bounds

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        q = self.q_offset
        offset = int(q[tiles.b]) if isinstance(q, Tensor) and q.dim() == 1 else int(q)
        return self.inner.tile_bounds(tiles.shifted(offset, self.kv_offset))


def shifted(mask: MaskModFn, q_offset: int | Tensor, kv_offset: int = 0) -> MaskMod:
    """``mask`` in absolute positions: query ``i`` is position ``q_offset + i`` (decode alignment).

    Keeps ``mask(b, h, q_idx + q_offset, kv_idx + kv_offset)``. With ``q_len`` new queries after
    a cache, ``q_offset = kv_len - q_len`` puts them at the end of the ``kv_len`` keys
    (bottom-right alignment). A tensor ``q_offset`` can change without recompiling; its queries
    must stay inside the keys. For ``causal()`` with ``q_offset=2``, 2 queries, 4 keys::

        ■ ■ ■ ⬚
        ■ ■ ■ ■

    Args:
        mask: a flexmask mask or any mask_mod callable, written in absolute positions.
        q_offset: position of the first query: an int >= 0, a 0-d integer tensor, or a
            ``[B]`` tensor, one per batch row (a decoding batch of different lengths).
        kv_offset: position of the first key (int >= 0; sliding-window caches drop old keys).

    Raises:
        TypeError: if an offset is not an int or an integer tensor.
        ValueError: if an offset is negative, or ``[B]`` offsets disagree with the mask's
            batch rows.

    Example:
        >>> import flexmask as fm
        >>> m = fm.shifted(fm.causal(), 2)
        >>> m
        shifted(causal(), q_offset=2)
        >>> fm.to_dense(m, 2, 4)[0, 0].int().tolist()
        [[1, 1, 1, 0], [1, 1, 1, 1]]
    """
    inner = as_mask(mask, name="shifted(mask)")
    kv = check_int(kv_offset, "shifted(kv_offset=...)", minimum=0)
    if isinstance(q_offset, int) and not isinstance(q_offset, bool):
        return _Shifted(inner, check_int(q_offset, "shifted(q_offset=...)", minimum=0), kv)
    q = int_tensor(q_offset, "shifted(q_offset=...)", ranks=(0, 1))
    if q.numel() == 0 or int(q.min()) < 0:
        raise ValueError(f"shifted(q_offset=...) needs values >= 0, got {q.tolist()}.")
    rows = inner.batch_size
    if q.dim() == 1 and rows is not None and rows != q.shape[0]:
        raise ValueError(
            f"shifted(q_offset=...) gives {q.shape[0]} offsets, one per batch row, but the mask "
            f"{inner!r} holds per-batch tensors of {rows} rows."
        )
    return _Shifted(inner, q, kv)


def with_offset(mask: MaskMod, q_offset: int | Tensor) -> MaskMod:
    """``mask`` shifted by ``q_offset`` (itself when the offset is the int 0)."""
    if isinstance(q_offset, int) and not isinstance(q_offset, bool) and q_offset == 0:
        return mask
    return shifted(mask, q_offset)
