"""Evaluating a mask on tiles: any mask_mod under vmap, per-tile counts, and a BlockMask's
blocks (their kinds, and its mask_mod on its partial blocks)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import check_memory, placed, resolve_device
from .masks import MaskMod, MaskModFn, Tiles, as_mask

__all__ = ["allowed_counts", "block_kinds", "evaluate_tiles", "partial_tiles", "tile_counts"]


def evaluate_tiles(
    mask: MaskModFn,
    b: Tensor,
    h: Tensor,
    q_start: Tensor,
    kv_start: Tensor,
    q_size: int,
    kv_size: int,
    q_len: int,
    kv_len: int,
) -> Tensor:
    """Evaluate ``mask`` on ``N`` tiles: ``BoolTensor[N, q_size, kv_size]``.

    Tile ``n`` covers queries ``q_start[n] + [0, q_size)`` and keys ``kv_start[n] + [0, kv_size)``
    of batch row ``b[n]``, head ``h[n]``. Positions past ``q_len``/``kv_len`` are False (the mask
    is never called on them). Uses vmap like ``create_mask``, so any mask_mod works.

    Raises:
        TypeError: if the mask returns anything but a bool tensor.
        ValueError: if a plain mask_mod fails under vmap (Python control flow on its arguments,
            ``.item()``, an index out of range): the message says how to write it.
    """
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    device = b.device
    q_off = torch.arange(q_size, device=device)
    kv_off = torch.arange(kv_size, device=device)

    def tile(bi: Tensor, hi: Tensor, qs: Tensor, ks: Tensor) -> Tensor:
        q = (qs + q_off).clamp(max=q_len - 1)
        kv = (ks + kv_off).clamp(max=kv_len - 1)
        row = torch.vmap(lambda qi, ki: mask(bi, hi, qi, ki), in_dims=(None, 0))
        return torch.vmap(row, in_dims=(0, None))(q, kv)

    # TransformGetItemToIndex lets masks index captured tensors with batched indices (torch's
    # create_mask does the same). Masks are built outside inference mode: the result may be
    # cached and must serve training too.
    try:
        if isinstance(mask, MaskMod) and mask.sealed:
            # flexmask's own masks are broadcasting tensor operations: one call on [N, Q, K]
            # indices, where vmap's dispatch costs milliseconds (a decode step's BlockMask).
            q = (q_start[:, None] + q_off).clamp(max=q_len - 1)[:, :, None]
            kv = (kv_start[:, None] + kv_off).clamp(max=kv_len - 1)[:, None, :]
            with torch.inference_mode(False), torch.no_grad():
                out = mask(b[:, None, None], h[:, None, None], q, kv)
        else:
            with TransformGetItemToIndex(), torch.inference_mode(False), torch.no_grad():
                out = torch.vmap(tile)(b, h, q_start, kv_start)
    except Exception as err:
        if isinstance(mask, MaskMod) and mask.sealed:
            raise  # flexmask's own masks raise ValueErrors that say what to fix
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"the mask_mod {_name(mask)} failed when evaluated the way torch evaluates "
            f"mask_mods, under vmap ({type(err).__name__}: {first}); write it with tensor "
            "operations only: &, |, ~ instead of and/or/not, torch.where instead of if, no "
            ".item() or int() on its arguments, and indices inside the tensors it reads."
        ) from err
    if not isinstance(out, Tensor) or out.dtype != torch.bool:
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(
            f"the mask_mod {_name(mask)} returned {got}; a mask_mod returns a bool tensor "
            "(True = may attend), e.g. `return q_idx >= kv_idx`, or `(x != 0)` for 0/1 values."
        )
    out = out.expand(b.shape[0], q_size, kv_size)  # a constant mask returns a broadcast scalar
    inside_q = (q_start[:, None] + q_off) < q_len
    inside_kv = (kv_start[:, None] + kv_off) < kv_len
    return out & inside_q[:, :, None] & inside_kv[:, None, :]


def _name(mask: object) -> str:
    return repr(mask) if isinstance(mask, MaskMod) else getattr(mask, "__name__", repr(mask))


def tile_counts(
    mask: MaskModFn,
    q_len: int,
    kv_len: int,
    size: int | tuple[int, int],
    *,
    b: int = 0,
    h: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Allowed pairs in each ``q_size x kv_size`` tile (``size``: an int, or the pair) of batch
    row ``b``, head ``h``: ``LongTensor[NQ, NK]`` (edge tiles cut at the lengths).

    Tiles the mask's structure decides (``MaskMod.tile_bounds``: all allowed, none allowed) cost
    nothing; only undecided tiles are evaluated, a few million elements at a time, so a long
    sparse mask never materialises ``q_len x kv_len``.
    """
    q_size, kv_size = (size, size) if isinstance(size, int) else size
    m = as_mask(mask)
    dev = resolve_device(m, device)
    m = placed(m, dev).bind(q_len, kv_len)
    nkv = -(-kv_len // kv_size)
    nq = -(-q_len // q_size)
    check_memory(nq * nkv * 8, f"counting a {q_len} x {kv_len} mask in {q_size} x {kv_size} tiles",
                 "use shorter lengths, or larger tiles (block_size)", dev)  # fmt: skip
    band = q_size * max(1, 2**18 // nkv)  # a few hundred thousand tiles at a time
    rows = []
    for q_from in range(0, q_len, band):
        tiles = Tiles(b, (q_size, kv_size), q_len, kv_len, dev, q_from, q_from + band)
        all_true, any_true = m.tile_bounds(tiles)
        counts = torch.where(all_true, tiles.area(), 0)
        qi, ki = (any_true & ~all_true).nonzero(as_tuple=True)
        step = max(1, 2**21 // (q_size * kv_size))
        for i in range(0, qi.numel(), step):
            q, k = qi[i : i + step], ki[i : i + step]
            bh = torch.full_like(q, b), torch.full_like(q, h)
            starts = q * q_size + q_from, k * kv_size
            values = evaluate_tiles(m, *bh, *starts, q_size, kv_size, q_len, kv_len)
            counts[q, k] = values.sum((1, 2))
        rows.append(counts)
    return torch.cat(rows)


def block_kinds(block_mask: BlockMask) -> Tensor:
    """``int8[B, H, QB, KVB]`` block classes of a BlockMask: 0 empty, 1 partial, 2 full."""
    nkvb = block_mask.kv_indices.shape[-1]
    kinds = _ordered_to_grid(block_mask.kv_num_blocks, block_mask.kv_indices, nkvb)
    if block_mask.full_kv_num_blocks is not None and block_mask.full_kv_indices is not None:
        full = _ordered_to_grid(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nkvb)
        kinds = torch.where(full, 2, kinds.to(torch.int8))
    return kinds.to(torch.int8)


def _ordered_to_grid(num: Tensor, indices: Tensor, nkvb: int) -> Tensor:
    # indices [B, H, QB, K]: the first num[b, h, qb] entries of each row name its blocks.
    valid = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
    grid = torch.zeros((*indices.shape[:-1], nkvb + 1), dtype=torch.bool, device=indices.device)
    safe = torch.where(valid, indices.long(), nkvb)  # invalid entries go to a spare column
    grid.scatter_(-1, safe, True)
    return grid[..., :nkvb]


def partial_tiles(
    block_mask: BlockMask, kinds: Tensor
) -> Iterator[tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]]:
    """The BlockMask's ``mask_mod`` on its partial blocks, a few million elements at a time.

    Yields ``((b, h, q_block, kv_block), tiles)`` with ``tiles: BoolTensor[N, q_bs, kv_bs]``.
    """
    q_len, kv_len = block_mask.seq_lengths
    qbs, kvbs = block_mask.BLOCK_SIZE
    bi, hi, qi, ki = (kinds == 1).nonzero(as_tuple=True)
    step = max(1, 2**24 // (qbs * kvbs))
    for i in range(0, bi.numel(), step):
        idx = bi[i : i + step], hi[i : i + step], qi[i : i + step], ki[i : i + step]
        b, h, qb, kb = idx
        yield idx, evaluate_tiles(block_mask.mask_mod, b, h, qb * qbs, kb * kvbs,
                                  qbs, kvbs, q_len, kv_len)  # fmt: skip


def allowed_counts(bm: BlockMask, kinds: Tensor) -> tuple[Tensor, Tensor]:
    """Allowed keys per query and allowed queries per key, ``[B, H, q_len]`` and ``[B, H,
    kv_len]``: full blocks counted, the mask evaluated on partial blocks only."""
    q_len, kv_len = bm.seq_lengths
    qbs, kvbs = bm.BLOCK_SIZE
    nh, nqb, nkvb = kinds.shape[1], kinds.shape[2], kinds.shape[3]
    ar_q, ar_k = torch.arange(qbs, device=kinds.device), torch.arange(kvbs, device=kinds.device)
    q_width = (q_len - torch.arange(nqb, device=kinds.device) * qbs).clamp(max=qbs)
    kv_width = (kv_len - torch.arange(nkvb, device=kinds.device) * kvbs).clamp(max=kvbs)
    full = kinds == 2
    rows = (full * kv_width).sum(-1).repeat_interleave(qbs, dim=-1)[..., :q_len].clone()
    keys = (full * q_width[:, None]).sum(-2).repeat_interleave(kvbs, dim=-1)[..., :kv_len].clone()
    for (bi, hi, qi, ki), tiles in partial_tiles(bm, kinds):
        q_pos = (qi[:, None] * qbs + ar_q).clamp(max=q_len - 1)  # past the end: counts 0
        k_pos = (ki[:, None] * kvbs + ar_k).clamp(max=kv_len - 1)
        bh = bi[:, None] * nh + hi[:, None]
        rows.view(-1).index_add_(0, (bh * q_len + q_pos).flatten(), tiles.sum(-1).flatten())
        keys.view(-1).index_add_(0, (bh * kv_len + k_pos).flatten(), tiles.sum(-2).flatten())
    return rows, keys
