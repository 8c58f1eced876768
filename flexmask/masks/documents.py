"""Documents: ``document`` (an id per token), ``packed`` (documents given by their lengths),
``from_position_ids`` (documents where the position ids restart) and ``from_cu_seqlens``
(flash-attn's varlen layout, queries and keys laid out apart)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_flag, check_memory, int_tensor
from .base import MaskMod
from .leaf import Leaf, at_position, declared, fmt_tensor
from .tiles import Tiles

__all__ = ["document", "from_cu_seqlens", "from_position_ids", "packed"]


@declared
class _Document(Leaf):
    doc_ids: Tensor  # [S] or [B, S]
    lengths: Tensor | None = None  # packed(lengths): what repr shows instead of the ids

    def _per_position(self) -> bool:
        return True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Positions past the ids (a longer KV cache) belong to no document.
        (q_doc, q_in), (kv_doc, kv_in) = (at_position(self.doc_ids, b, i) for i in (q_idx, kv_idx))
        return (q_doc == kv_doc) & q_in & kv_in

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
        lengths: ``[N]`` integer tensor (or list) of document lengths, each >= 0; or ``[B, N]``,
            each batch row its own documents (torchtune's packed datasets), padded with zeros.

    Raises:
        TypeError: if ``lengths`` is not an integer tensor or list of ints.
        ValueError: if it is not 1-D or 2-D, empty or negative, or its rows add up to different
            totals; when building, if the lengths do not add up to the sequence length.

    Example:
        >>> import flexmask as fm
        >>> fm.packed([2, 1])
        packed(lengths=tensor([2, 1]))
        >>> fm.to_dense(fm.packed([2, 1]), 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
        >>> fm.to_dense(fm.packed([[2, 1], [1, 2]]), 3)[1, 0].int().tolist()
        [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    """
    call = "packed(lengths=...)"
    tensor = int_tensor(lengths, call, ranks=(1, 2))
    if tensor.numel() == 0:
        raise ValueError(f"{call} needs at least one document length, got an empty tensor.")
    if int(tensor.min()) < 0:
        raise ValueError(f"{call} needs lengths >= 0, got {tensor.tolist()}.")
    rows = tensor.reshape(-1, tensor.shape[-1])
    totals = [sum(row) for row in rows.tolist()]  # Python ints: a sum past int64 cannot wrap
    if len(set(totals)) > 1:
        raise ValueError(
            f"{call} gives rows of {totals} tokens; every row of a [B, N] tensor must add up "
            "to the same sequence length (make the padding a document of its own)."
        )
    check_memory(len(totals) * totals[0] * 8,
                 f"packed(lengths=...) over {totals[0]} tokens (one document id each)",
                 "check the lengths: they count tokens", tensor.device)  # fmt: skip
    with torch.inference_mode(False):  # a mask's tensors are never inference tensors
        docs = torch.arange(rows.shape[1], device=tensor.device)
        ids = torch.stack([torch.repeat_interleave(docs, row) for row in rows])
    return _Document(ids if tensor.dim() == 2 else ids[0], tensor)


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


@declared
class _Varlen(Leaf):
    """A varlen layout (flash-attn's ``cu_seqlens``): sequences of queries and of keys, each
    query position's sequence and, when causal, the last key it sees."""

    cu_q: Tensor  # [N + 1] offsets of the query sequences
    cu_kv: Tensor  # [N + 1] offsets of the key sequences
    causal: bool
    q_seq: Tensor  # [Sq] sequence of each query position
    kv_seq: Tensor  # [Skv]
    last_key: Tensor  # [Sq] causal: the last key each query sees (bottom-right aligned)

    def _per_position(self) -> bool:
        return True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        (q_seq, q_in), (kv_seq, kv_in) = (
            at_position(self.q_seq, b, q_idx),
            at_position(self.kv_seq, b, kv_idx),
        )
        keep = (q_seq == kv_seq) & q_in & kv_in
        return keep & (kv_idx <= at_position(self.last_key, b, q_idx)[0]) if self.causal else keep

    def _expr(self) -> str:
        kv = "" if self.cu_kv is self.cu_q else f", {fmt_tensor(self.cu_kv)}"
        causal = ", causal=True" if self.causal else ""
        return f"from_cu_seqlens({fmt_tensor(self.cu_q)}{kv}{causal})"

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        nq, nk = self.q_seq.shape[0], self.kv_seq.shape[0]
        if (nq, nk) != (q_len, kv_len):
            raise ValueError(
                f"from_cu_seqlens(...) lays out {nq} query and {nk} key tokens but the mask is "
                f"built for q_len={q_len}, kv_len={kv_len}; the last offsets are the totals."
            )
        return self

    @property
    def exact_bounds(self) -> bool:
        return not self.causal  # causal: a tile may meet the sequence and the limit apart

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t = tiles
        q_lo, q_hi = t.span(self.q_seq, 0)
        k_lo, k_hi = t.span(self.kv_seq, 1)
        every = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        some = (q_lo <= k_hi) & (k_lo <= q_hi)  # sequence ranges that do not meet share none
        if self.causal:
            first_limit, last_limit = t.span(self.last_key, 0)
            every, some = every & (t.k1 <= first_limit), some & (t.k0 <= last_limit)
        return every, some


def from_cu_seqlens(
    cu_seqlens_q: Tensor | Sequence[int],
    cu_seqlens_kv: Tensor | Sequence[int] | None = None,
    *,
    causal: bool = False,
) -> MaskMod:
    """Same sequence of a varlen layout (flash-attn's ``cu_seqlens``, xformers'
    ``BlockDiagonalMask.from_seqlens``): queries and keys are concatenated sequences.

    Sequence ``i`` holds queries ``cu_seqlens_q[i] <= q_idx < cu_seqlens_q[i + 1]`` and keys
    ``cu_seqlens_kv[i] <= kv_idx < cu_seqlens_kv[i + 1]`` (the query offsets when None). With
    ``causal=True``, causality is aligned bottom-right within each sequence, as flash-attn does:
    the ``j``-th key of a sequence with ``Lq`` queries and ``Lk`` keys is seen from its query
    ``j - (Lk - Lq)`` on, so queries of a sequence with fewer keys than queries may see none
    (zeros). For ``cu_seqlens_q=[0, 1, 3]``, ``cu_seqlens_kv=[0, 2, 4]``, causal::

        ■ ■ ⬚ ⬚
        ⬚ ⬚ ■ ⬚
        ⬚ ⬚ ■ ■

    Args:
        cu_seqlens_q: ``[N + 1]`` offsets of the query sequences: 0 first, never decreasing,
            the total number of queries last.
        cu_seqlens_kv: ``[N + 1]`` offsets of the key sequences, or None for the query offsets.
        causal: causal within each sequence, aligned bottom-right.

    Raises:
        TypeError: if an offsets tensor is not integers, or ``causal`` is not a bool.
        ValueError: if offsets are not 1-D, do not start at 0, decrease, or the two layouts
            hold different numbers of sequences; when building, if the totals are not
            ``q_len`` and ``kv_len``.

    Example:
        >>> import flexmask as fm
        >>> m = fm.from_cu_seqlens([0, 2, 3], causal=True)
        >>> fm.to_dense(m, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    cu_q = _offsets(cu_seqlens_q, "from_cu_seqlens(cu_seqlens_q=...)")
    cu_kv = (
        cu_q
        if cu_seqlens_kv is None
        else _offsets(cu_seqlens_kv, "from_cu_seqlens(cu_seqlens_kv=...)")
    )
    if cu_kv.shape != cu_q.shape:
        raise ValueError(
            f"from_cu_seqlens(...) needs as many key sequences as query sequences, got "
            f"{cu_q.numel() - 1} and {cu_kv.numel() - 1}."
        )
    check_flag(causal, "from_cu_seqlens(causal=...)")
    with torch.inference_mode(False):  # a mask's tensors are never inference tensors
        seqs = torch.arange(cu_q.numel() - 1, device=cu_q.device)
        q_seq = torch.repeat_interleave(seqs, torch.diff(cu_q))
        kv_seq = torch.repeat_interleave(seqs, torch.diff(cu_kv))
        # Bottom-right: query q of sequence s sees keys up to q + (cu_kv[s + 1] - cu_q[s + 1]).
        last_key = torch.arange(q_seq.numel(), device=cu_q.device) + (cu_kv - cu_q)[1:][q_seq]
    return _Varlen(cu_q, cu_kv, causal, q_seq, kv_seq, last_key)


def _offsets(value: object, call: str) -> Tensor:
    offsets = int_tensor(value, call, ranks=(1,))
    if offsets.numel() < 2 or int(offsets[0]) != 0:
        raise ValueError(
            f"{call} needs offsets that start at 0 and end at the total, one more than the "
            f"sequences (flash-attn's cu_seqlens), got {offsets.tolist()}."
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{call} needs offsets that never decrease, got {offsets.tolist()}.")
    check_memory(int(offsets[-1]) * 24, f"{call} over {int(offsets[-1])} tokens",
                 "check the offsets: they count tokens", offsets.device)  # fmt: skip
    return offsets
