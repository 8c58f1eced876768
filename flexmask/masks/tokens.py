"""Tokens by position: ``padding`` and ``key_padding`` (lengths per row), ``global_tokens``
(Longformer's) and ``from_hf_attention_mask`` (a Transformers 0/1 mask, any pattern)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import capture, check_flag, int_tensor, lengths_tensor
from .base import MaskMod
from .leaf import Leaf, at_position, declared, fmt_tensor
from .tiles import Tiles

__all__ = ["from_hf_attention_mask", "global_tokens", "key_padding", "padding"]


@declared
class _Padding(Leaf):
    lengths: Tensor  # [B] real tokens per row
    side: str
    start: Tensor | None = None  # left padding: first real position per row, set by bind()
    keys_only: bool = False  # key_padding: every query stays, only keys are masked

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if self.side == "right":
            n = self.lengths[b]
            keep = kv_idx < n
            return keep & (q_idx >= 0) if self.keys_only else keep & (q_idx < n)
        if self.start is None:
            raise ValueError(
                f"{self._name()}(side='left') counts from the end of the sequence, so it needs "
                "the sequence length: build it through flexmask.block_mask / to_dense / "
                "MultiheadFlexAttention, or call mask.bind(q_len, kv_len) first."
            )
        s = self.start[b]
        keep = kv_idx >= s
        return keep & (q_idx >= 0) if self.keys_only else keep & (q_idx >= s)

    def _name(self) -> str:
        return "key_padding" if self.keys_only else "padding"

    def _expr(self) -> str:
        side = "" if self.side == "right" else f", side={self.side!r}"
        return f"{self._name()}(lengths={fmt_tensor(self.lengths)}{side})"

    def _own_batch(self) -> int | None:
        return self.lengths.shape[0]

    def _counts_from_end(self) -> bool:
        return self.side == "left" and self.start is None

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        # Queries and keys are positions in one sequence frame, whose length is kv_len; keys
        # alone (key_padding) may belong to another sequence (cross-attention).
        limit = kv_len if self.side == "left" or self.keys_only else max(q_len, kv_len)
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        if longest > limit:
            raise ValueError(
                f"{self._name()}(lengths=...) has a length of {longest}, longer than the "
                f"sequence (q_len={q_len}, kv_len={kv_len}); lengths count real tokens, at most "
                "the sequence length."
            )
        if self.side == "right":
            return self
        with torch.inference_mode(False):  # kept in BlockMasks that may serve training
            return _Padding(self.lengths, "left", kv_len - self.lengths, self.keys_only)

    @property
    def exact_bounds(self) -> bool:
        return self.side == "right" or self.start is not None

    @property
    def is_box(self) -> bool:
        return self.exact_bounds and not self.keys_only

    def box(self, b: int) -> tuple[int, int]:
        if self.side == "right":
            return 0, int(self.lengths[b])
        return int(self.start[b]), 1 << 62  # type: ignore[index]

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t = tiles
        if self.side == "left" and self.start is None:
            return super().tile_bounds(tiles)  # unbound: __call__ says how to fix it
        if self.side == "right":
            n = int(self.lengths[t.b])
            k_all, k_any = t.k1 < n, t.k0 < n
            q_all, q_any = t.q1 < n, t.q0 < n
        else:
            s = int(self.start[t.b])  # type: ignore[index]
            k_all, k_any = t.k0 >= s, t.k1 >= s
            q_all, q_any = t.q0 >= s, t.q1 >= s
        if self.keys_only:
            q_all = q_any = t.q0 >= 0  # every query: only the shape [NQ, 1] matters
        return q_all & k_all, q_any & k_any


def padding(lengths: Tensor | Sequence[int], side: str = "right") -> MaskMod:
    """Hide padding: a pair may attend only when both the query and the key are real tokens.

    Token ``i`` of row ``b`` is real iff ``i < lengths[b]`` (``side="right"``) or
    ``i >= S - lengths[b]`` (``side="left"``, counted from the end of the ``S = kv_len`` keys).
    Pad query rows see nothing; attention returns zeros for them, never NaN. Combine with
    ``causal()`` for a decoder. For ``lengths=[3]``, 4 tokens, right padding::

        ■ ■ ■ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ⬚
        ⬚ ⬚ ⬚ ⬚

    Args:
        lengths: ``[B]`` integer tensor (or list) of real-token counts, one per batch row.
        side: ``"right"`` (pads after the tokens) or ``"left"`` (pads before, for generation).

    Raises:
        TypeError: if ``lengths`` is not an integer tensor or list of ints.
        ValueError: if ``lengths`` is not 1-D, is negative, or ``side`` is unknown; when
            building, if a length exceeds the sequence.

    Example:
        >>> import flexmask as fm
        >>> fm.padding([3, 1], side="left")
        padding(lengths=tensor([3, 1]), side='left')
        >>> fm.to_dense(fm.padding([2, 3], side="left"), 3, 3)[0, 0].int().tolist()
        [[0, 0, 0], [0, 1, 1], [0, 1, 1]]
    """
    return _Padding(*_lengths_and_side("padding", lengths, side))


def key_padding(lengths: Tensor | Sequence[int], side: str = "right") -> MaskMod:
    """Hide padded keys only: every query stays, and sees the real keys of its row.

    Key ``kv`` of row ``b`` is real iff ``kv < lengths[b]`` (``side="right"``) or
    ``kv >= kv_len - lengths[b]`` (``side="left"``). This is torch's ``key_padding_mask``,
    Transformers' ``padding_mask_function`` and flash-attn's ``key_padding_mask``, and what
    cross-attention over a padded encoder needs: the queries are another sequence. Pad queries
    see the real keys (``padding`` hides them too). For ``lengths=[3]``, 4 tokens::

        ■ ■ ■ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ⬚

    Args:
        lengths: ``[B]`` integer tensor (or list) of real keys, one per batch row.
        side: ``"right"`` (pads after the keys) or ``"left"`` (pads before).

    Raises:
        TypeError: if ``lengths`` is not an integer tensor or list of ints.
        ValueError: if ``lengths`` is not 1-D, is negative, or ``side`` is unknown; when
            building, if a length exceeds the keys.

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.key_padding([2]), 2, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0]]
    """
    return _Padding(*_lengths_and_side("key_padding", lengths, side), keys_only=True)


def _lengths_and_side(name: str, lengths: object, side: object) -> tuple[Tensor, str]:
    tensor = lengths_tensor(lengths, f"{name}(lengths=...)", "one length per batch row")
    if side not in ("right", "left"):
        raise ValueError(f"{name}(side=...) must be 'right' or 'left', got {side!r}.")
    return tensor, side


@declared
class _GlobalTokens(Leaf):
    indices: Tensor  # [N] or [B, N] positions, -1 for none
    flags: Tensor | None = None  # bool [L] or [B, L]: whether each position is global; by bind()

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if self.flags is None:  # unbound: compare with every index (a reduction)
            idx = self.indices if self.indices.dim() == 1 else self.indices[b]
            return (idx == q_idx[..., None]).any(-1) | (idx == kv_idx[..., None]).any(-1)
        # Bound: one lookup per position, pointwise, as FlexAttention's kernels need (they
        # cannot lower the reduction above).
        (q_global, q_in), (kv_global, kv_in) = (
            at_position(self.flags, b, i) for i in (q_idx, kv_idx)
        )
        return (q_global & q_in) | (kv_global & kv_in)

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        n = max(q_len, kv_len)
        if self.flags is not None and self.flags.shape[-1] == n:
            return self
        idx = self.indices
        rows = idx.reshape(-1, idx.shape[-1]) if idx.numel() else idx.reshape(1, 0)
        with torch.inference_mode(False):  # kept in BlockMasks that may serve training
            flags = torch.zeros(rows.shape[0], n + 1, dtype=torch.bool, device=idx.device)
            # -1 and positions past the sequence land in the extra last column, dropped after
            flags.scatter_(1, torch.where((rows >= 0) & (rows < n), rows, n), True)
            flags = flags[:, :n] if idx.dim() == 2 else flags[0, :n]
        return _GlobalTokens(self.indices, flags)

    def _expr(self) -> str:
        return f"global_tokens({fmt_tensor(self.indices)})"

    def _own_batch(self) -> int | None:
        return self.indices.shape[0] if self.indices.dim() == 2 else None

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        # Every pair of a tile is kept when all its queries or all its keys are global (the
        # indices are distinct), some pair when one of its queries or keys is.
        t = tiles
        idx = (self.indices if self.indices.dim() == 1 else self.indices[t.b]).to(t.q0.device)
        inside_q = ((idx >= t.q0[..., None]) & (idx <= t.q1[..., None])).sum(-1)  # [NQ, 1]
        inside_k = ((idx >= t.k0[..., None]) & (idx <= t.k1[..., None])).sum(-1)  # [1, NK]
        size_q, size_k = t.q1 - t.q0 + 1, t.k1 - t.k0 + 1
        every = ((inside_q == size_q) & (size_q > 0)) | ((inside_k == size_k) & (size_k > 0))
        return every, (inside_q > 0) | (inside_k > 0)


def global_tokens(indices: Tensor | Sequence[int]) -> MaskMod:
    """Global tokens (Longformer): they see every key, and every query sees them.

    Keeps a pair when ``q_idx`` or ``kv_idx`` is one of ``indices``. Combine with a local pattern:
    ``local_window(w, w) | global_tokens([0])`` is Longformer's (attention-gym's
    ``generate_global_sliding_window``); ``& causal()`` makes it a decoder's. For
    ``indices=[1]``, 4 tokens::

        ⬚ ■ ⬚ ⬚
        ■ ■ ■ ■
        ⬚ ■ ⬚ ⬚
        ⬚ ■ ⬚ ⬚

    Args:
        indices: ``[N]`` positions, the same for every row, or ``[B, N]``, one row per sequence,
            padded with -1 where a row has fewer. Distinct within a row.

    Raises:
        TypeError: if ``indices`` is not an integer tensor or list of ints.
        ValueError: if it is not 1-D or 2-D, holds a value below -1, or repeats a position
            within a row.

    Example:
        >>> import flexmask as fm
        >>> m = fm.local_window(1, 1) | fm.global_tokens([0])
        >>> fm.to_dense(m, 5)[0, 0].int().tolist()[-1]
        [1, 0, 0, 1, 1]
    """
    call = "global_tokens(indices=...)"
    tensor = int_tensor(indices, call, ranks=(1, 2))
    if tensor.numel() and int(tensor.min()) < -1:
        raise ValueError(f"{call} needs positions >= 0 (or -1 for none), got {int(tensor.min())}.")
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.numel() else tensor.reshape(0, 0)
    for row in rows:
        kept = row[row >= 0]
        if kept.unique().numel() != kept.numel():
            raise ValueError(
                f"{call} repeats a position within a row ({row.tolist()}); give each global "
                "token once."
            )
    return _GlobalTokens(tensor)


@declared
class _Tokens(Leaf):
    """Real tokens from a 0/1 ``[B, S]`` attention mask (any pattern): pairs of real tokens, or
    with ``keys_only`` real keys for any query (Transformers' reading of a 2-D mask, and the
    only one that fits cross-attention, where queries and keys are different sequences)."""

    real: Tensor  # bool [B, S]
    keys_only: bool = False

    def _per_position(self) -> bool:
        return True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Positions past the mask (a longer KV cache) are not tokens.
        kv_real, kv_in = at_position(self.real, b, kv_idx)
        if self.keys_only:
            return kv_real & kv_in
        q_real, q_in = at_position(self.real, b, q_idx)
        return kv_real & kv_in & q_real & q_in

    def _expr(self) -> str:
        keys = ", keys_only=True" if self.keys_only else ""
        return f"from_hf_attention_mask({fmt_tensor(self.real.long())}{keys})"

    def _own_batch(self) -> int | None:
        return self.real.shape[0]

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        n = self.real.shape[1]
        want, what = (kv_len, "key") if self.keys_only else (max(q_len, kv_len), "position")
        if n != want:
            raise ValueError(
                f"from_hf_attention_mask(...): the attention mask covers {n} positions but the "
                f"mask is built for q_len={q_len}, kv_len={kv_len}; it needs one entry per "
                f"{what} ({want}), the cached ones included."
            )
        return self

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        real = self.real[tiles.b].long()
        k_lo, k_hi = tiles.span(real, 1)
        if self.keys_only:
            return k_lo == 1, k_hi == 1
        q_lo, q_hi = tiles.span(real, 0)
        return (q_lo == 1) & (k_lo == 1), (q_hi == 1) & (k_hi == 1)


def from_hf_attention_mask(attention_mask: Tensor, *, keys_only: bool = False) -> MaskMod:
    """A Transformers 2-D attention mask (1 = token, 0 = pad): pads neither attend nor are seen.

    ``attention_mask`` is ``[B, S]`` with 1 for real tokens and 0 for padding, in any pattern
    (left or right padding, holes). Combine with ``causal()`` for a decoder. ``S`` counts every
    position, cached ones included; build for ``q_len`` new queries with ``q_offset=S - q_len``.
    For ``[[1, 0, 1, 1]]``::

        ■ ⬚ ■ ■
        ⬚ ⬚ ⬚ ⬚
        ■ ⬚ ■ ■
        ■ ⬚ ■ ■

    With ``keys_only=True`` only keys are masked: every query sees the real keys, as
    Transformers reads a 2-D mask, and as cross-attention needs (``S`` then counts keys; the
    queries are another sequence). For ``[[1, 0, 1, 1]]``, 2 queries::

        ■ ⬚ ■ ■
        ■ ⬚ ■ ■

    Raises:
        TypeError: if it is not a tensor of 0/1 integers or bools.
        ValueError: if it is not 2-D or holds values other than 0 and 1.

    Example:
        >>> import torch, flexmask as fm
        >>> m = fm.causal() & fm.from_hf_attention_mask(torch.tensor([[0, 1, 1]]))
        >>> fm.to_dense(m, 3)[0, 0].int().tolist()
        [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
        >>> keys = fm.from_hf_attention_mask(torch.tensor([[1, 1, 0]]), keys_only=True)
        >>> fm.to_dense(keys, 2, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0]]
    """
    call = "from_hf_attention_mask(attention_mask=...)"
    check_flag(keys_only, "from_hf_attention_mask(keys_only=...)")
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"{call} needs a [batch, seq_len] tensor of 0/1, got {type(attention_mask).__name__}."
        )
    if attention_mask.dim() != 2:
        raise ValueError(
            f"{call} needs a 2-D [batch, seq_len] tensor of 0/1, got shape "
            f"{tuple(attention_mask.shape)}; a 4-D mask is already expanded."
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"{call} needs integers or bools (1 = token), got {attention_mask.dtype}.")
    if attention_mask.is_meta or attention_mask.numel() == 0:
        raise ValueError(
            f"{call} needs values (at least one row and one position, not a meta tensor), got "
            f"shape {tuple(attention_mask.shape)} on {attention_mask.device}."
        )
    if attention_mask.dtype != torch.bool and bool(
        ((attention_mask != 0) & (attention_mask != 1)).any()
    ):
        raise ValueError(
            f"{call} holds values other than 0 and 1: {attention_mask.unique().tolist()}."
        )
    return _Tokens(capture(attention_mask.bool()), keys_only)
