"""What a mask picture shows, computed with torch alone: per-pixel allowed fractions, per-block
kinds, the ■/⬚ text drawing, and masked softmax weights for score maps.

Masks are reduced through per-tile counts of allowed pairs (``convert.tile_counts``): the mask's
structure decides most tiles outright and only the rest are evaluated, so a 131072-token mask is
pictured without ever holding a ``q_len x kv_len`` tensor. Up to ``MAX_PIXELS`` tokens per side
every token is one pixel; past that a pixel holds the fraction of allowed pairs in its tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .._checks import check_block_size, check_int, check_lengths
from ..dense import block_mask_to_dense
from ..evaluation import evaluate_tiles, tile_counts
from ..masks import MaskMod, MaskModFn, as_mask

__all__ = ["MaskPicture", "mask_picture", "score_weights", "to_ascii"]

MAX_PIXELS = 1024  # tokens per side drawn one per pixel; longer masks are drawn per tile
MAX_ASCII = 256  # tokens per side up to which to_ascii draws
MAX_SCORES = 4096  # queries/keys up to which score maps are drawn (they are dense float64)


def to_ascii(
    mask: MaskModFn, q_len: int, kv_len: int | None = None, *, batch: int = 0, head: int = 0
) -> str:
    """The ■/⬚ drawing of a mask used in the docstrings: one line per query, ■ = may attend.

    Example:
        >>> import flexmask as fm
        >>> print(fm.to_ascii(fm.sliding_window(2), 3))
        ■ ⬚ ⬚
        ■ ■ ⬚
        ⬚ ■ ■
    """
    m, kv_len = check_mask_args("to_ascii", mask, q_len, kv_len, batch, head)
    if max(q_len, kv_len) > MAX_ASCII:
        raise ValueError(
            f"to_ascii draws up to {MAX_ASCII} tokens per side, got q_len={q_len}, "
            f"kv_len={kv_len}; draw longer masks with flexmask.save_mask_png."
        )
    rows = _dense_row(m, q_len, kv_len, batch, head).tolist()
    return "\n".join(" ".join("■" if x else "⬚" for x in row) for row in rows)


def _dense_row(m: MaskMod, q_len: int, kv_len: int, b: int, h: int) -> Tensor:
    """``BoolTensor[q_len, kv_len]`` of batch row ``b``, head ``h`` (small masks only)."""
    bound = m.bind(q_len, kv_len)
    dev = m.device or torch.device("cpu")
    idx = torch.tensor([b], device=dev), torch.tensor([h], device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    return evaluate_tiles(bound, *idx, zero, zero, q_len, kv_len, q_len, kv_len)[0].cpu()


@dataclass(frozen=True)
class MaskPicture:
    """A mask reduced to what its picture shows (batch row ``b``, head ``h``)."""

    fraction: Tensor  # [rows, cols] float: allowed share of each pixel's tile (0/1 per token)
    pixel: int  # tokens per pixel side
    kinds: Tensor  # int8 [QB, KVB]: 0 empty, 1 partial, 2 full, as create_block_mask classifies
    block_size: int
    q_len: int
    kv_len: int
    allowed: int  # allowed (q, kv) pairs

    @property
    def element_density(self) -> float:
        return self.allowed / (self.q_len * self.kv_len)

    def caption(self) -> str:
        full, partial, empty = (int((self.kinds == k).sum()) for k in (2, 1, 0))
        visited = (full + partial) / self.kinds.numel()
        bs = self.block_size
        return (
            f"element density {self.element_density:.1%}   ·   {bs}x{bs} blocks: "
            f"{visited:.1%} visited ({full} full, {partial} partial, {empty} empty)"
        )


def mask_picture(
    mask: MaskModFn,
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int = 0,
    head: int = 0,
    block_size: int = 128,
    max_pixels: int = MAX_PIXELS,
) -> MaskPicture:
    """Per-pixel allowed fractions and per-block kinds of one (batch, head) of ``mask``."""
    m, kv_len = check_mask_args("mask_picture", mask, q_len, kv_len, batch, head)
    block_size = check_block_size(block_size)
    # Blocks and pixels both pool from the same exact counts on `unit x unit` tiles.
    want = math.ceil(max(q_len, kv_len) / max_pixels)  # tokens per pixel side, at least
    if want <= block_size:  # count on pixels that divide the block...
        unit = pixel = min(d for d in range(want, block_size + 1) if block_size % d == 0)
    else:  # ...or on blocks, pooled into pixels of whole blocks
        unit, pixel = block_size, block_size * math.ceil(want / block_size)
    counts = tile_counts(m, q_len, kv_len, unit, b=batch, h=head, device=m.device or "cpu").cpu()
    area = _area(q_len, kv_len, unit)
    block_counts = _pool(counts, block_size // unit)
    kinds = torch.where(block_counts == block_size**2, 2, (block_counts > 0).long())
    fraction = _pool(counts, pixel // unit) / _pool(area, pixel // unit)
    return MaskPicture(
        fraction=fraction.float(),
        pixel=pixel,
        kinds=kinds.to(torch.int8),
        block_size=block_size,
        q_len=q_len,
        kv_len=kv_len,
        allowed=int(counts.sum()),
    )


def _area(q_len: int, kv_len: int, unit: int) -> Tensor:
    rows = (q_len - torch.arange(0, q_len, unit)).clamp(max=unit)
    cols = (kv_len - torch.arange(0, kv_len, unit)).clamp(max=unit)
    return rows[:, None] * cols[None, :]


def _pool(x: Tensor, k: int) -> Tensor:
    """Sum over ``k x k`` groups of cells (zero-padded at the edges)."""
    if k == 1:
        return x
    nq, nk = -(-x.shape[0] // k), -(-x.shape[1] // k)
    padded = x.new_zeros(nq * k, nk * k)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.view(nq, k, nk, k).sum((1, 3))


def pixel_kinds(pic: MaskPicture) -> Tensor:
    """The block kind behind each pixel (a pixel over several blocks: partial if any is)."""
    rows, cols = pic.fraction.shape
    if pic.pixel <= pic.block_size:
        r = pic.block_size // pic.pixel
        return pic.kinds.repeat_interleave(r, 0).repeat_interleave(r, 1)[:rows, :cols]
    r = pic.pixel // pic.block_size
    partial, full = (_pool((pic.kinds == k).long(), r) > 0 for k in (1, 2))
    return torch.where(partial, 1, torch.where(full, 2, 0))


def check_mask_args(
    fn: str, mask: MaskModFn, q_len: int, kv_len: int | None, batch: int, head: int
) -> tuple[MaskMod, int]:
    """The mask as a ``MaskMod`` and ``kv_len``, after checking the arguments of ``fn``."""
    m = as_mask(mask, name=f"{fn}(mask)")
    kv = check_lengths(q_len, kv_len)
    anything = 1 << 62  # a mask without per-batch tensors is the same for every row and head
    check_index(batch, m.batch_size or anything, f"{fn}(batch=...)", "batch rows")
    check_index(head, anything, f"{fn}(head=...)", "heads")
    return m, kv


def check_index(value: object, n: int, name: str, what: str, shared: bool = False) -> int:
    """A row/head index in ``[0, n)``; with ``shared``, a size-1 dimension serves every index."""
    value = check_int(value, name, minimum=0, expected="an int >= 0")
    if shared and n == 1:
        return 0
    if value >= n:
        raise ValueError(f"{name} is {value}, out of range: there are {n} {what} (0..{n - 1}).")
    return value


def score_weights(
    q: Tensor,
    k: Tensor,
    mask: MaskModFn | BlockMask | None,
    b: int,
    h: int,
    scale: float | None,
    score_mod: Callable[..., Tensor] | None = None,
) -> tuple[Tensor, Tensor, str]:
    """Float64 softmax weights ``[Q, KV]`` of (b, h) after ``score_mod``, the allowed pairs, the
    mask's expression."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise (ValueError if isinstance(t, Tensor) else TypeError)(
                f"save_scores_png({name}=...) needs a [B, H, S, D] tensor, got {got}; "
                "MultiheadFlexAttention.project(x) returns q, k, v in that layout."
            )
    (nb, nh, q_len, d), (nbk, nhk, kv_len, dk) = q.shape, k.shape
    if nbk != nb or dk != d or nh % nhk:
        raise ValueError(
            f"save_scores_png: q {tuple(q.shape)} and k {tuple(k.shape)} do not match; they "
            "need the same batch and head_dim, and q's heads a multiple of k's (GQA)."
        )
    if max(q_len, kv_len) > MAX_SCORES:
        raise ValueError(
            f"save_scores_png draws up to {MAX_SCORES} queries and keys, got q_len={q_len}, "
            f"kv_len={kv_len}; slice them, e.g. q[:, :, :1024] and k[:, :, :1024]."
        )
    b = check_index(b, nb, "save_scores_png(batch=...)", "batch rows")
    h = check_index(h, nh, "save_scores_png(head=...)", "heads")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"save_scores_png(scale=...) must be a number, got {scale!r}.")
    expr = ""
    if mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
    elif isinstance(mask, BlockMask):
        if mask.seq_lengths != (q_len, kv_len):
            raise ValueError(
                f"save_scores_png(mask=...) is a BlockMask for {mask.seq_lengths} but q, k "
                f"have q_len={q_len}, kv_len={kv_len}; build it for the same lengths."
            )
        dense = block_mask_to_dense(mask)
        allowed = dense[b if dense.shape[0] > 1 else 0, h if dense.shape[1] > 1 else 0].cpu()
    else:
        m, _ = check_mask_args("save_scores_png", mask, q_len, kv_len, b, h)
        allowed, expr = _dense_row(m, q_len, kv_len, b, h), repr(m)
    scores = q[b, h].detach().double().cpu() @ k[b, h // (nh // nhk)].detach().double().cpu().T
    scores = scores * (d**-0.5 if scale is None else float(scale))
    if score_mod is not None:
        if not callable(score_mod):
            raise TypeError(
                "save_scores_png(score_mod=...) must be a callable (score, b, h, q_idx, kv_idx) "
                f"-> score, got {type(score_mod).__name__}."
            )
        scores = _modified(scores, score_mod, b, h)
        expr = f"{expr}, {score_mod!r}" if expr else repr(score_mod)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return weights.nan_to_num(0.0), allowed, expr  # a row that sees nothing: 0/0


def _modified(scores: Tensor, score_mod: Callable[..., Tensor], b: int, h: int) -> Tensor:
    """``score_mod`` on every score of one (b, h) ``[Q, KV]``, vmapped as flex evaluates it."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    fn = torch.vmap(score_mod, in_dims=(0, None, None, None, 0))
    fn = torch.vmap(fn, in_dims=(0, None, None, 0, None))
    q_idx, kv_idx = torch.arange(scores.shape[0]), torch.arange(scores.shape[1])
    with TransformGetItemToIndex():
        return fn(scores, torch.tensor(b), torch.tensor(h), q_idx, kv_idx).double()
