"""Documents: ``document`` (an id per token), ``packed`` (documents given by their lengths) and
``from_position_ids`` (documents where the position ids restart)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_memory, int_tensor, lengths_tensor
from .base import MaskMod
from .leaf import Leaf, declared, fmt_tensor
from .tiles import Tiles

__all__ = ["document", "from_position_ids", "packed"]


@declared
class _Document(Leaf):
    doc_ids: Tensor  # [S] or [B, S]
    lengths: Tensor | None = None  # packed(lengths): what repr shows instead of the ids

    def _per_position(self) -> bool:
        return True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ids = self.doc_ids
        n = ids.shape[-1]  # positions past the ids (a longer KV cache) belong to no document
        q, kv = q_idx.clamp(max=n - 1), kv_idx.clamp(max=n - 1)
        same = ids[q] == ids[kv] if ids.dim() == 1 else ids[b, q] == ids[b, kv]
        return same & (q_idx < n) & (kv_idx < n)

    def _expr(self) -> str:
        if self.lengths is not None:
            return f"packed(lengths={fmt_tensor(self.lengths)})"
        return f"document(doc_ids={fmt_tensor(self.doc_ids)})"

    def _own_batch(self) -> int | None:
        return self.doc_ids.shape[0] if self.doc_ids.dim() == 2 else None

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        n = self.doc_ids.shape[-1]
        if n != max(q_len, kv_len):
            packed = self.lengths is not None
            name, what = (
                ("packed", "document lengths sum") if packed else ("document", "doc_ids has")
            )
            raise ValueError(
                f"{name}(...): {what} {n} positions but the mask is built for "
                f"q_len={q_len}, kv_len={kv_len}; give one document id per token "
                f"({max(q_len, kv_len)} in all), with padding as a document of its own."
            )
        return self

    @property
    def exact_bounds(self) -> bool:
        # Sorted ids (packed documents): id ranges that overlap share an id; unsorted may not.
        ids = self.doc_ids
        return bool((ids[..., 1:] >= ids[..., :-1]).all())

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        ids = self.doc_ids if self.doc_ids.dim() == 1 else self.doc_ids[tiles.b]
        q_lo, q_hi = tiles.span(ids, 0)
        k_lo, k_hi = tiles.span(ids, 1)
        one_doc = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        return one_doc, (q_lo <= k_hi) & (k_lo <= q_hi)  # id ranges that do not meet share none


def document(doc_ids: Tensor | Sequence[int]) -> MaskMod:
    """Same document only: tokens attend within their own document (sequence packing).

    Keeps ``doc_ids[q_idx] == doc_ids[kv_idx]`` (``doc_ids[b, ...]`` for a ``[B, S]`` tensor).
    Combine with ``causal()`` for packed causal training. For ``doc_ids=[0, 0, 1, 1]``::

        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ⬚ ⬚ ■ ■
        ⬚ ⬚ ■ ■

    Args:
        doc_ids: ``[S]`` or ``[B, S]`` integer tensor, one document id per token.

    Raises:
        TypeError: if ``doc_ids`` is not an integer tensor.
        ValueError: if it is not 1-D or 2-D; when building, if its length is not the sequence's.

    Example:
        >>> import flexmask as fm
        >>> m = fm.document([0, 0, 1]) & fm.causal()
        >>> m
        document(doc_ids=tensor([0, 0, 1])) & causal()
        >>> fm.to_dense(m, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    call = "document(doc_ids=...)"
    ids = int_tensor(doc_ids, call, ranks=(1, 2))
    if ids.numel() == 0:
        raise ValueError(
            f"{call} needs one document id per token (and a row per sequence for [B, S]), got "
            f"shape {tuple(ids.shape)}."
        )
    return _Document(ids)


def packed(lengths: Tensor | Sequence[int]) -> MaskMod:
    """Same document only, with documents given by their lengths (packed sequences, cu_seqlens).

    ``packed([2, 2])`` is ``document([0, 0, 1, 1])``; the lengths must add up to the sequence.
    For ``lengths=[1, 3]``::

        ■ ⬚ ⬚ ⬚
        ⬚ ■ ■ ■
        ⬚ ■ ■ ■
        ⬚ ■ ■ ■

    Args:
        lengths: ``[N]`` integer tensor (or list) of document lengths, each >= 0.

    Raises:
        TypeError: if ``lengths`` is not an integer tensor or list of ints.
        ValueError: if it is not 1-D, empty or negative; when building, if the lengths do not
            add up to the sequence length.

    Example:
        >>> import flexmask as fm
        >>> fm.packed([2, 1])
        packed(lengths=tensor([2, 1]))
        >>> fm.to_dense(fm.packed([2, 1]), 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    tensor = lengths_tensor(lengths, "packed(lengths=...)", "at least one document length")
    total = sum(tensor.tolist())  # Python ints: a sum past int64 cannot wrap
    check_memory(total * 8, f"packed(lengths=...) over {total} tokens (one document id each)",
                 "check the lengths: they count tokens", tensor.device)  # fmt: skip
    with torch.inference_mode(False):  # a mask's tensors are never inference tensors
        ids = torch.repeat_interleave(torch.arange(tensor.numel(), device=tensor.device), tensor)
    return _Document(ids, tensor)


def from_position_ids(position_ids: Tensor | Sequence[int]) -> MaskMod:
    """Same document, where a document starts wherever the position id does not continue the
    previous one (``p[i] != p[i - 1] + 1``), as Transformers detects packed rows.

    ``position_ids`` is ``[S]`` or ``[B, S]``; the result is ``document`` of the ids this rule
    gives. For ``position_ids=[0, 1, 0, 1]``::

        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ⬚ ⬚ ■ ■
        ⬚ ⬚ ■ ■

    Not for a tree of candidates, whose position ids repeat and fall back: each node would be
    a document of its own (use ``tree``).

    Raises:
        TypeError: if ``position_ids`` is not integers.
        ValueError: if it is not 1-D or 2-D, or is empty.

    Example:
        >>> import flexmask as fm
        >>> fm.from_position_ids([0, 1, 2, 0, 1])
        document(doc_ids=tensor([0, 0, 0, 1, 1]))
    """
    ids = int_tensor(position_ids, "from_position_ids(position_ids=...)", ranks=(1, 2))
    if ids.numel() == 0:
        raise ValueError("from_position_ids(position_ids=...) needs at least one position.")
    restarts = torch.diff(ids, prepend=ids[..., :1] - 1, dim=-1) != 1
    return document(restarts.long().cumsum(-1))
