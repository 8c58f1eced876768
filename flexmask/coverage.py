"""``Coverage``: the queries that see nothing and the keys nobody sees, which attention zeroes
so that NaN there stays out; and the dense masks the SDPA backend takes, with theirs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._lru import LRU
from .dense import to_dense
from .evaluation import allowed_counts, block_kinds
from .masks import MaskMod

__all__ = ["Coverage", "DenseMask", "as_dense_mask", "block_mask_key", "cached_dense", "coverage"]

_DENSE_MASKS = LRU("dense", 4)  # dense masks are q_len x kv_len bytes each: keep few
_COVERAGE = LRU("coverage", 16)


@dataclass(frozen=True)
class Coverage:
    """Which queries see some key, and which queries and keys to zero before attention: those
    the mask hides from everyone, among those a kernel computes (every one for dense SDPA, those
    in visited blocks for a BlockMask). Zeroing them changes nothing, except that NaN there
    (padding) can no longer reach real rows or gradients: ``0 * NaN`` is NaN in the matmuls.

    Each is ``[B, H, S]`` bool, with B and H of 1 or the mask's.
    """

    rows: Tensor  # the query sees some key
    hidden_q: Tensor  # a query that sees nothing, computed all the same
    hidden_k: Tensor  # a key that no query sees, computed all the same
    any_hidden_q: bool  # found once, so that each call skips what has nothing to zero
    any_hidden_k: bool
    every_row: bool  # every query sees some key: no output row to zero

    @classmethod
    def of(cls, rows: Tensor, hidden_q: Tensor, hidden_k: Tensor) -> Coverage:
        return cls(rows, hidden_q, hidden_k, bool(hidden_q.any()), bool(hidden_k.any()),
                   bool(rows.all()))  # fmt: skip

    @classmethod
    def of_dense(cls, dense: Tensor) -> Coverage:
        """Of a dense mask ``[B, H, Q, KV]``: SDPA computes every query and key."""
        rows = dense.any(-1)
        return cls.of(rows, ~rows, ~dense.any(-2))

    def hide(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B, H, S, D]``, ``k`` and ``v [B, H_kv, S_kv, D]`` with the hidden queries and keys
        zeroed (the inputs themselves when nothing needs it)."""
        if self.any_hidden_q:
            q = _zeroed(q, self.hidden_q)
        if self.any_hidden_k:
            hidden_k, (nb, nh, s) = self.hidden_k, self.hidden_k.shape
            if nh not in (1, k.shape[1]):  # per query head: a key head serves a group
                hidden_k = hidden_k.view(nb, k.shape[1], -1, s).all(2)
            k, v = _zeroed(k, hidden_k), _zeroed(v, hidden_k)
        return q, k, v


@dataclass(frozen=True)
class DenseMask:
    """A dense boolean mask ``[B, H, Q, KV]`` (True = may attend) with its coverage, and the mask
    SDPA runs with: rows that see nothing opened to every key (their queries are zeroed and
    their outputs zeroed after; an all-False row would be NaN)."""

    allowed: Tensor
    coverage: Coverage
    sdpa_mask: Tensor

    @classmethod
    def of(cls, allowed: Tensor) -> DenseMask:
        cover = Coverage.of_dense(allowed)
        return cls(allowed, cover, allowed if cover.every_row else allowed | ~cover.rows[..., None])


def as_dense_mask(mask: DenseMask | Tensor | None) -> DenseMask | None:
    """A ``DenseMask`` from a boolean tensor (True = may attend), or as it is."""
    if mask is None or isinstance(mask, DenseMask):
        return mask
    return DenseMask.of(mask)


def cached_dense(
    mask: MaskMod,
    q_len: int,
    kv_len: int,
    *,
    batch: int,
    heads: int,
    device: torch.device,
    cache: bool = True,
) -> DenseMask:
    """``to_dense`` for the SDPA backend, cached like BlockMasks (unless ``cache`` is False):
    every layer of a model reuses the mask the first layer built (callers must not modify it)."""
    mask_key = mask.cache_key() if cache else None
    key = None if mask_key is None else (mask_key, q_len, kv_len, batch, heads, str(device))
    hit = _DENSE_MASKS.get_recent(key)
    if isinstance(hit, DenseMask):
        return hit
    with torch.inference_mode(False):  # kept: may serve a training step later
        dense = DenseMask.of(to_dense(mask, q_len, kv_len, batch=batch, heads=heads, device=device))
    _DENSE_MASKS.put(key, dense)
    return dense


def coverage(bm: BlockMask) -> Coverage:
    """The ``Coverage`` of a BlockMask: full blocks counted, its ``mask_mod`` evaluated on partial
    blocks only; cached per BlockMask while its mask's key stands (``MaskMod.cache_key``)."""
    key = block_mask_key(bm)
    hit = _COVERAGE.get_recent(key)
    if isinstance(hit, tuple) and hit[0] is bm:
        return hit[1]
    q_len, kv_len = bm.seq_lengths
    qbs, kvbs = bm.BLOCK_SIZE
    with torch.inference_mode(False), torch.no_grad():
        kinds = block_kinds(bm)
        rows, keys = allowed_counts(bm, kinds)
        visited = kinds > 0  # only what a block-sparse kernel computes can carry NaN in
        q_computed = visited.any(-1).repeat_interleave(qbs, -1)[..., :q_len]
        k_computed = visited.any(-2).repeat_interleave(kvbs, -1)[..., :kv_len]
        result = Coverage.of(rows > 0, (rows == 0) & q_computed, (keys == 0) & k_computed)
    _COVERAGE.put(key, (bm, result))
    return result


def _zeroed(x: Tensor, flags: Tensor) -> Tensor:
    """``x [B, H, S, D]`` with the positions of ``flags [B or 1, H or 1, S]`` zeroed."""
    flags = flags.expand(x.shape[0], x.shape[1], -1)
    if x.device.type != "cpu":  # no host sync on accelerators: one pass at memory bandwidth
        return x.masked_fill(flags[..., None], 0.0)
    # One read of x costs less than finding and gathering the flagged rows (nonzero alone cost
    # more than the sum in a decode step over a 1k-slot cache). A NaN or an infinity makes the
    # sum NaN or infinite; a finite sum means every value is finite.
    if math.isfinite(float(x.detach().sum())):
        return x
    index = flags.nonzero(as_tuple=True)
    if not index[0].numel() or bool(x[index].isfinite().all()):
        return x  # finite values under a zero probability (or gradient) change nothing
    return x.index_put(index, x.new_zeros(()))


def block_mask_key(bm: BlockMask) -> tuple[object, ...] | None:
    """A cache key for results derived from a BlockMask (its identity and its mask's key; the
    cache must hold ``bm`` itself so that the identity stays unique), or None when its
    ``mask_mod`` is not a flexmask mask that can be keyed."""
    mask = bm.mask_mod
    mask_key = mask.cache_key() if isinstance(mask, MaskMod) else None
    return None if mask_key is None else (id(bm), mask_key)
