"""The masks of positions alone: ``full``, ``causal``, ``sliding_window``, ``local_window``,
``dilated_window``, ``sink_tokens``, ``prefix_lm``, ``chunked``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_int, int_tensor, lengths_tensor
from .base import MaskMod
from .leaf import Leaf, declared, fmt_tensor, row_of
from .tiles import Tiles

__all__ = [
    "causal",
    "chunked",
    "dilated_window",
    "full",
    "local_window",
    "prefix_lm",
    "sink_tokens",
    "sliding_window",
]


@declared
class _Full(Leaf):
    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx >= 0

    def _expr(self) -> str:
        return "full()"

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        true = torch.ones_like(tiles.q0 + tiles.k0, dtype=torch.bool)
        return true, true


_FULL = _Full()  # masks are immutable: one of each, so `m == full()` is usually `is`


def full() -> MaskMod:
    """Every query sees every key (bidirectional attention).

    Keeps every ``(q_idx, kv_idx)``. For 4 tokens::

        ■ ■ ■ ■
        ■ ■ ■ ■
        ■ ■ ■ ■
        ■ ■ ■ ■

    Example:
        >>> import flexmask as fm
        >>> fm.full()
        full()
        >>> fm.to_dense(fm.full(), 2, 3).all().item()
        True
    """
    return _FULL


@declared
class _Causal(Leaf):
    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    def _expr(self) -> str:
        return "causal()"

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        return tiles.k1 <= tiles.q0, tiles.k0 <= tiles.q1


_CAUSAL = _Causal()


def causal() -> MaskMod:
    """Each query sees itself and the keys before it, top-left aligned (as FlexAttention).

    Keeps ``kv_idx <= q_idx``. For 4 tokens::

        ■ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ■

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.causal(), 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return _CAUSAL


@declared
class _SlidingWindow(Leaf):
    window: int

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (q_idx - kv_idx < self.window)

    def _expr(self) -> str:
        return f"sliding_window({self.window})"

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t, w = tiles, self.window
        return (t.k1 <= t.q0) & (t.q1 - t.k0 < w), (t.k0 <= t.q1) & (t.q0 - t.k1 < w)


def sliding_window(window: int) -> MaskMod:
    """Causal attention to the last ``window`` keys, the query's own position included.

    Keeps ``kv_idx <= q_idx and q_idx - kv_idx < window`` (Transformers' convention; attention-gym's
    ``generate_sliding_window(w)`` keeps ``w + 1`` keys). For ``window=3``, 5 tokens::

        ■ ⬚ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚ ⬚
        ■ ■ ■ ⬚ ⬚
        ⬚ ■ ■ ■ ⬚
        ⬚ ⬚ ■ ■ ■

    Args:
        window: number of keys each query sees, itself included (>= 1).

    Raises:
        TypeError: if ``window`` is not an int.
        ValueError: if ``window < 1``.

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.sliding_window(2), 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    return _SlidingWindow(check_int(window, "sliding_window(window=...)"))


@declared
class _LocalWindow(Leaf):
    left: int
    right: int

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)

    def _expr(self) -> str:
        return f"local_window({self.left}, {self.right})"

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t, lo, hi = tiles, -self.left, self.right  # kv - q must lie in [lo, hi]
        return (t.k0 - t.q1 >= lo) & (t.k1 - t.q0 <= hi), (t.k1 - t.q0 >= lo) & (t.k0 - t.q1 <= hi)


def local_window(left: int, right: int) -> MaskMod:
    """Each query sees the ``left`` keys before it, itself and the ``right`` keys after it.

    Keeps ``q_idx - left <= kv_idx <= q_idx + right``: flash-attn's ``window_size=(left, right)``,
    xformers' local attention, Transformers' bidirectional sliding window
    (``local_window(w, w)``). ``local_window(w - 1, 0)`` is ``sliding_window(w)``. For
    ``local_window(1, 2)``, 5 tokens::

        ■ ■ ■ ⬚ ⬚
        ■ ■ ■ ■ ⬚
        ⬚ ■ ■ ■ ■
        ⬚ ⬚ ■ ■ ■
        ⬚ ⬚ ⬚ ■ ■

    Args:
        left: keys before the query it sees (>= 0).
        right: keys after the query it sees (>= 0).

    Raises:
        TypeError: if ``left`` or ``right`` is not an int.
        ValueError: if either is negative.

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.local_window(1, 1), 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    """
    return _LocalWindow(
        check_int(left, "local_window(left=...)", minimum=0),
        check_int(right, "local_window(right=...)", minimum=0),
    )


@declared
class _DilatedWindow(Leaf):
    window: int
    dilation: int

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Comparisons, no integer abs (attention-gym notes a Hopper miscompile of it); with a
        # positive divisor, torch's % is zero for an offset exactly when it is for its negation.
        offset = kv_idx - q_idx
        w = self.window
        return (offset >= -w) & (offset <= w) & (offset % self.dilation == 0)

    def _expr(self) -> str:
        return f"dilated_window({self.window}, {self.dilation})"

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        # A tile of consecutive queries and keys holds every offset kv - q in [lo, hi]: some pair
        # is kept when a multiple of the dilation lies in that range within the window, every
        # pair when the whole range is in the window and every offset is a multiple.
        t, w, d = tiles, self.window, self.dilation
        lo, hi = t.k0 - t.q1, t.k1 - t.q0
        in_lo, in_hi = lo.clamp(min=-w), hi.clamp(max=w)
        some = (in_lo <= in_hi) & (torch.div(in_hi, d, rounding_mode="floor") * d >= in_lo)
        every = (lo >= -w) & (hi <= w) & ((d == 1) | ((lo == hi) & (lo % d == 0)))
        return every, some


def dilated_window(window: int, dilation: int) -> MaskMod:
    """Keys at most ``window`` positions away on either side, at every ``dilation``-th offset.

    Keeps ``|q_idx - kv_idx| <= window and |q_idx - kv_idx| % dilation == 0``: attention-gym's
    ``generate_dilated_sliding_window(window, dilation)``. It is two-sided; ``& causal()`` keeps
    the past. ``dilated_window(w, 1)`` is ``local_window(w, w)``. For ``dilated_window(2, 2)``,
    5 tokens::

        ■ ⬚ ■ ⬚ ⬚
        ⬚ ■ ⬚ ■ ⬚
        ■ ⬚ ■ ⬚ ■
        ⬚ ■ ⬚ ■ ⬚
        ⬚ ⬚ ■ ⬚ ■

    Args:
        window: the farthest key on either side (>= 0).
        dilation: the step between kept offsets (>= 1).

    Raises:
        TypeError: if ``window`` or ``dilation`` is not an int.
        ValueError: if ``window < 0`` or ``dilation < 1``.

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.dilated_window(2, 2) & fm.causal(), 4)[0, 0].int().tolist()
        [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]]
    """
    return _DilatedWindow(
        check_int(window, "dilated_window(window=...)", minimum=0),
        check_int(dilation, "dilated_window(dilation=...)", minimum=1),
    )


@declared
class _SinkTokens(Leaf):
    n: int

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < self.n) & (q_idx >= 0)

    def _expr(self) -> str:
        return f"sink_tokens({self.n})"

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t = tiles
        return (t.k1 < self.n) & (t.q0 >= 0), (t.k0 < self.n) & (t.q1 >= 0)


def sink_tokens(n: int) -> MaskMod:
    """The first ``n`` keys, seen by every query (attention sinks, StreamingLLM).

    Keeps ``kv_idx < n``. Combine as the model needs: StreamingLLM keeps a window and the sinks,
    causally, ``(sliding_window(w) | sink_tokens(4)) & causal()`` (flash-attn's
    ``sink_token_length``). For ``n=2``, 4 tokens::

        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚

    Args:
        n: number of sink tokens (>= 0).

    Raises:
        TypeError: if ``n`` is not an int.
        ValueError: if ``n < 0``.

    Example:
        >>> import flexmask as fm
        >>> m = (fm.sliding_window(2) | fm.sink_tokens(1)) & fm.causal()
        >>> fm.to_dense(m, 4)[0, 0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    """
    return _SinkTokens(check_int(n, "sink_tokens(n=...)", minimum=0))


@declared
class _PrefixLM(Leaf):
    prefix_len: int | Tensor  # an int, or a 0-d / [B] integer tensor

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        p = self.prefix_len
        prefix = row_of(p, b) if isinstance(p, Tensor) else p
        return (kv_idx < prefix) | (kv_idx <= q_idx)

    def _expr(self) -> str:
        p = self.prefix_len
        return f"prefix_lm({fmt_tensor(p) if isinstance(p, Tensor) else p})"

    def _own_batch(self) -> int | None:
        p = self.prefix_len
        return p.shape[0] if isinstance(p, Tensor) and p.dim() == 1 else None

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t, p = tiles, self.prefix_len
        prefix = int(row_of(p, torch.tensor(t.b))) if isinstance(p, Tensor) else p
        return (t.k1 < prefix) | (t.k1 <= t.q0), (t.k0 < prefix) | (t.k0 <= t.q1)


def prefix_lm(prefix_len: int | Tensor | Sequence[int]) -> MaskMod:
    """Bidirectional over the first ``prefix_len`` keys, causal after them (prefix-LM, T5/PaLI).

    Keeps ``kv_idx < prefix_len or kv_idx <= q_idx``. ``prefix_len`` may be an int, a 0-d tensor,
    or a ``[B]`` tensor with one prefix length per batch row. For ``prefix_len=2``, 4 tokens::

        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ■

    Args:
        prefix_len: length of the bidirectional prefix (>= 0), int or integer tensor.

    Raises:
        TypeError: if ``prefix_len`` is not an int or integer tensor.
        ValueError: if it is negative or a tensor of rank > 1.

    Example:
        >>> import flexmask as fm
        >>> fm.prefix_lm([1, 3])
        prefix_lm(tensor([1, 3]))
        >>> fm.to_dense(fm.prefix_lm(2), 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    call = "prefix_lm(prefix_len=...)"
    if isinstance(prefix_len, int) and not isinstance(prefix_len, bool):
        return _PrefixLM(check_int(prefix_len, call, minimum=0))
    tensor = int_tensor(prefix_len, call, ranks=(0, 1))
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{call} needs prefix lengths >= 0, got {tensor.tolist()}.")
    return _PrefixLM(tensor)


@declared
class _Chunked(Leaf):
    chunk: int
    start: Tensor | None = None  # [B]: where row b's chunks start counting (after left padding)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if self.start is None:
            return q_idx // self.chunk == kv_idx // self.chunk
        s = self.start[b]
        return (q_idx - s) // self.chunk == (kv_idx - s) // self.chunk

    def _expr(self) -> str:
        start = "" if self.start is None else f", start={fmt_tensor(self.start)}"
        return f"chunked({self.chunk}{start})"

    def _own_batch(self) -> int | None:
        return None if self.start is None else self.start.shape[0]

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        s = 0 if self.start is None else int(self.start[tiles.b])
        t, c = tiles.shifted(-s, -s), self.chunk  # positions counted from the row's start
        one_chunk = (t.q0 // c == t.q1 // c) & (t.k0 // c == t.k1 // c) & (t.q0 // c == t.k0 // c)
        return one_chunk, (t.q0 // c <= t.k1 // c) & (t.k0 // c <= t.q1 // c)


def chunked(chunk: int, start: Tensor | Sequence[int] | None = None) -> MaskMod:
    """Same chunk only: the sequence is cut into chunks of ``chunk`` tokens (Llama 4 local layers).

    Keeps ``q_idx // chunk == kv_idx // chunk``; combine with ``causal()`` for chunked causal
    attention. With ``start`` (``[B]``, e.g. each row's left padding), row ``b`` counts its
    chunks from ``start[b]``: ``(q_idx - start[b]) // chunk == (kv_idx - start[b]) // chunk``,
    as Transformers' chunked attention does after left padding. For ``chunk=2``, 5 tokens::

        ■ ■ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚ ⬚
        ⬚ ⬚ ■ ■ ⬚
        ⬚ ⬚ ■ ■ ⬚
        ⬚ ⬚ ⬚ ⬚ ■

    Args:
        chunk: chunk size in tokens (>= 1).
        start: per batch row, the position its first chunk begins at (>= 0); default 0.

    Raises:
        TypeError: if ``chunk`` is not an int, or ``start`` not integers.
        ValueError: if ``chunk < 1``, or ``start`` is not 1-D or is negative.

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.chunked(2) & fm.causal(), 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
        >>> fm.to_dense(fm.chunked(2, start=[1]), 3)[0, 0].int().tolist()
        [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    """
    size = check_int(chunk, "chunked(chunk=...)")
    if start is None:
        return _Chunked(size)
    return _Chunked(size, lengths_tensor(start, "chunked(start=...)", "one start per batch row"))
