"""``KVCache``: keys and values preallocated for decoding, and the mask of one step over them.

Each batch row has its own length, so prompts of different lengths need no left padding: row
``b``'s next tokens go to positions ``lengths[b], lengths[b] + 1, ...``. A call's queries sit at
those absolute positions, and the mask is evaluated there (``KVCache.step``), with the keys past
each row's length masked out. The step mask captures the lengths as tensors, so every decode
step of one shape reuses one compiled BlockMask builder and one compiled flex kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import as_device, check_float_dtype, check_int, check_memory
from .masks import MaskMod, MaskModFn, Wrapper, as_mask, declared

__all__ = ["KVCache"]


class KVCache(nn.Module):
    """Keys and values of one attention layer, preallocated to ``max_len`` positions per row.

    Shapes: ``k``, ``v``: ``[batch, num_kv_heads, max_len, head_dim]``; ``lengths``:
    ``LongTensor[batch]``, the positions written in each row. They are buffers of this
    ``nn.Module``: ``cache.to(device)``, ``cache.half()`` and ``state_dict()`` work, and a cache
    held by a model moves with it.

    Example:
        >>> import torch, flexmask as fm
        >>> attn = fm.MultiheadFlexAttention(32, 4, num_kv_heads=2, backend="sdpa")
        >>> cache = fm.KVCache(2, 16, 2, 8)
        >>> x = torch.randn(2, 5, 32)
        >>> y = attn(x, mask=fm.causal(), cache=cache, lengths=torch.tensor([5, 3]))
        >>> cache.lengths.tolist()  # row 1 had 3 real tokens: its next token goes to position 3
        [5, 3]
        >>> y = attn(torch.randn(2, 1, 32), mask=fm.causal(), cache=cache)
        >>> cache.lengths.tolist()
        [6, 4]
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("batch", batch), ("max_len", max_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):  # fmt: skip
            check_int(value, f"KVCache({name}=...)", expected="a positive int")
        check_float_dtype(dtype, "KVCache(dtype=...)")
        super().__init__()
        dev = torch.device("cpu") if device is None else as_device(device, "KVCache(device=...)")
        shape = (batch, num_kv_heads, max_len, head_dim)
        nbytes = 2 * batch * num_kv_heads * max_len * head_dim * dtype.itemsize
        check_memory(nbytes, f"KVCache{shape} for keys and values", "make max_len shorter", dev)
        self.k: Tensor
        self.v: Tensor
        self.lengths: Tensor
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=dev))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=dev))
        self.register_buffer("lengths", torch.zeros(batch, dtype=torch.long, device=dev))

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def extra_repr(self) -> str:
        b, h, n, d = self.k.shape
        return (f"batch={b}, max_len={n}, num_kv_heads={h}, head_dim={d}, dtype={self.k.dtype}, "
                f"lengths={self.lengths.tolist()}")  # fmt: skip

    def reset(self) -> None:
        """Forget every position (the memory stays allocated)."""
        self.lengths.zero_()

    def select(self, positions: Tensor | None = None, *, rows: Tensor | None = None) -> None:
        """Keep only some positions, or reorder rows.

        Args:
            positions: ``[N]`` positions kept in every row, or ``[B, N]`` per row, moved to the
                front in that order; each row's length becomes ``N`` (after verifying a tree of
                candidates: the context and the accepted path).
            rows: ``[B']`` rows to keep, in their new order (beam search).
        """
        # Everything is checked before anything changes: a refused call leaves the cache as it was.
        idx = None if rows is None else self._index(rows, "rows", self.batch, ranks=(1,))
        lengths = self.lengths if idx is None else self.lengths[idx]
        pos = None
        if positions is not None:
            pos = self._index(positions, "positions", self.max_len, ranks=(1, 2))
            pos = pos.expand(lengths.shape[0], -1) if pos.dim() == 1 else pos
            if pos.shape[0] != lengths.shape[0]:
                raise ValueError(
                    f"KVCache.select(positions=...) has {pos.shape[0]} rows but the cache has "
                    f"{lengths.shape[0]}; give [N] positions for every row or "
                    f"[{lengths.shape[0]}, N]."
                )
            if bool((pos >= lengths[:, None]).any()):
                raise ValueError(
                    f"KVCache.select(positions=...) names positions that were never written "
                    f"(row lengths {lengths.tolist()})."
                )
        if idx is not None:
            self.k, self.v, self.lengths = self.k[idx], self.v[idx], lengths
        if pos is None:
            return
        n = pos.shape[1]
        gather = pos[:, None, :, None].expand(-1, self.num_kv_heads, -1, self.head_dim)
        self.k[:, :, :n] = self.k.gather(2, gather)
        self.v[:, :, :n] = self.v.gather(2, gather)
        self.lengths.fill_(n)

    def step_mask(self, mask: MaskModFn, q_len: int = 1) -> MaskMod:
        """The mask the next call of ``q_len`` tokens per row evaluates, over ``q_len x max_len``:
        ``mask`` at the rows' next positions, keys past each row's new length masked. For
        drawing or ``check``-ing a decode step before running it.

        Example:
            >>> import flexmask as fm
            >>> cache = fm.KVCache(1, 6, 1, 4)
            >>> cache.lengths.fill_(3)  # doctest: +ELLIPSIS
            tensor([3])
            >>> print(fm.to_ascii(cache.step_mask(fm.sliding_window(2)), 1, 6))
            ⬚ ⬚ ■ ■ ⬚ ⬚
        """
        counts = torch.full_like(self.lengths, _count(q_len))
        return self.step(as_mask(mask, name="step_mask(mask)"), counts)

    def step(self, mask: MaskMod, counts: Tensor) -> MaskMod:
        """The mask of the next call, whose rows bring ``counts [B]`` real tokens (the module's
        own path; ``step_mask`` checks its arguments first).

        Raises:
            ValueError: if ``mask`` holds per-batch tensors for another batch size, or counts
                from the end of the sequence (``padding(side="left")``: a cache has no end).
        """
        rows = mask.batch_size
        if rows is not None and rows != self.batch:
            raise ValueError(
                f"the mask {mask!r} holds per-batch tensors of {rows} rows but the KV cache "
                f"has {self.batch}; give one entry per cached sequence."
            )
        if mask.counts_from_end:
            raise ValueError(
                f"the mask {mask!r} holds padding(side='left'), which counts from the end "
                "of the sequence; a KV cache grows, so it has no end to count from. Pass "
                "forward(..., lengths=..., padding_side='left') for left-padded prompts instead."
            )
        return _Step(mask, self.lengths.clone(), counts)

    def check_room(self, s: int) -> None:
        """Raise before writing when ``s`` more positions per row would pass ``max_len``."""
        if bool((self.lengths + s > self.max_len).any()):
            raise ValueError(
                f"KVCache is full: writing {s} positions after lengths {self.lengths.tolist()} "
                f"would pass max_len={self.max_len}; make a longer cache or reset() it."
            )

    def append(self, k: Tensor, v: Tensor, counts: Tensor) -> Tensor:
        """Write ``k``, ``v`` (``[B, H_kv, S, D]``) at each row's length; rows advance by
        ``counts`` (``[B]``, real tokens of this call; the rest are padding, overwritten later).
        Returns the lengths before the write: the position of each row's first new token."""
        self.check_room(k.shape[2])
        start = self.lengths.clone()
        self._write(self._slots(start, k.shape[2]), k, v, counts)
        return start

    @contextlib.contextmanager
    def appended(self, k: Tensor, v: Tensor, counts: Tensor) -> Iterator[Tensor]:
        """``append`` for the body of a ``with`` block, undone exactly if the block raises: the
        keys, values and lengths are then what they were before. Yields ``append``'s result."""
        self.check_room(k.shape[2])
        start = self.lengths.clone()
        pos = self._slots(start, k.shape[2])
        old_k, old_v = self.k.gather(2, pos), self.v.gather(2, pos)
        try:
            self._write(pos, k, v, counts)
            yield start
        except BaseException:
            self.k.scatter_(2, pos, old_k)
            self.v.scatter_(2, pos, old_v)
            self.lengths.copy_(start)
            raise

    def _write(self, pos: Tensor, k: Tensor, v: Tensor, counts: Tensor) -> None:
        self.k.scatter_(2, pos, k.to(self.k.dtype))
        self.v.scatter_(2, pos, v.to(self.v.dtype))
        self.lengths += counts

    def _slots(self, start: Tensor, s: int) -> Tensor:
        """Scatter/gather indices of ``s`` positions per row from ``start``: ``[B, H, s, D]``."""
        pos = (start[:, None] + torch.arange(s, device=start.device))[:, None, :, None]
        return pos.expand(-1, self.num_kv_heads, -1, self.head_dim)

    def check_compatible(self, batch: int, num_kv_heads: int, head_dim: int, like: Tensor) -> None:
        """Raise when this cache cannot serve a module's call (before anything is written)."""
        want = (batch, num_kv_heads, head_dim, like.dtype, like.device)
        got = (self.batch, self.num_kv_heads, self.head_dim, self.k.dtype, self.k.device)
        if want[:3] != got[:3] or want[3] != got[3] or want[4].type != got[4].type:
            raise ValueError(
                f"forward(cache=...) holds batch={got[0]}, num_kv_heads={got[1]}, "
                f"head_dim={got[2]}, dtype={got[3]}, device={got[4]} but this call needs "
                f"batch={want[0]}, num_kv_heads={want[1]}, head_dim={want[2]}, dtype={want[3]}, "
                f"device={want[4]}; make it with KVCache({want[0]}, max_len, {want[1]}, "
                f"{want[2]}, dtype={want[3]}, device=...)."
            )

    def _index(self, value: Any, name: str, bound: int, ranks: tuple[int, ...]) -> Tensor:
        call = f"KVCache.select({name}=...)"
        shapes = " or ".join(f"{r}-D" for r in ranks)
        if (
            not isinstance(value, Tensor)
            or value.dtype.is_floating_point
            or value.dtype.is_complex
            or value.dtype == torch.bool
        ):
            hint = " (for a bool mask of rows, pass rows.nonzero().flatten())"
            raise TypeError(
                f"{call} needs a {shapes} integer tensor of indices, got {value!r}"
                f"{hint if isinstance(value, Tensor) and value.dtype == torch.bool else ''}."
            )
        if value.dim() not in ranks:
            raise ValueError(f"{call} needs a {shapes} tensor, got shape {tuple(value.shape)}.")
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= bound):
            raise ValueError(f"{call} must lie in 0..{bound - 1}, got {value.tolist()}.")
        return value.to(self.k.device).long()


def _count(q_len: object) -> int:
    return check_int(q_len, "KVCache.step_mask(q_len=...)", expected="a positive int")


@declared
class _Step(Wrapper):
    """One call's mask over the cache: query ``i`` of row ``b`` is position ``start[b] + i``
    (real iff ``i < count[b]``), keys are positions ``0..max_len-1``, valid below
    ``start[b] + count[b]``; ``inner`` is the user's mask in absolute positions. The inner mask
    is not bound: masks holding per-position tensors treat positions past them as empty."""

    inner: MaskMod
    start: Tensor  # [B]
    count: Tensor  # [B]

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        s, n = self.start[b], self.count[b]
        keep = self.inner(b, h, q_idx + s, kv_idx)
        return keep & (q_idx < n) & (kv_idx < s + n)

    def _expr(self) -> str:
        return f"{self.inner!r} on a KV cache (lengths {(self.start + self.count).tolist()})"

    def _own_batch(self) -> int | None:
        return self.start.shape[0]
