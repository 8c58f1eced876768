"""Dense forms of a mask: boolean ``[B, H, Q, KV]`` masks and additive float masks for SDPA."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import check_count, check_lengths, check_memory, resolve_batch, resolve_device
from .masks import MaskMod, MaskModFn, Tiles, _Tokens, as_mask, capture, shifted

__all__ = [
    "block_mask_to_dense",
    "evaluate_tiles",
    "from_hf_attention_mask",
    "tile_counts",
    "to_additive",
    "to_dense",
    "to_hf_4d",
]


def to_dense(
    mask: MaskModFn,
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int | None = None,
    heads: int = 1,
    device: torch.device | str | None = None,
    q_offset: int | Tensor = 0,
) -> Tensor:
    """Evaluate ``mask`` on every ``(b, h, q_idx, kv_idx)``: a ``BoolTensor[batch, heads, q_len,
    kv_len]``, True = may attend.

    Args:
        mask: a flexmask mask or any mask_mod callable.
        q_len, kv_len: query and key lengths (``kv_len`` defaults to ``q_len``).
        batch: batch rows; defaults to the rows of the mask's per-batch tensors, else 1.
        heads: heads to evaluate (masks that ignore ``h`` give identical heads).
        device: where to evaluate; defaults to the mask's device, else CPU.
        q_offset: the queries' first position, ``shifted(mask, q_offset)`` (decoding after a
            cache: ``kv_len - q_len``).

    Raises:
        TypeError, ValueError: for bad arguments, a mask_mod that does not return a bool tensor,
            or a mask too large for the free memory (``q_len x kv_len`` bytes per batch row and
            head; use ``block_mask`` instead, which grows with the number of blocks).

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.causal() & fm.padding([2, 3]), 3).shape
        torch.Size([2, 1, 3, 3])
    """
    m = with_offset(as_mask(mask), q_offset)
    kv_len = check_lengths(q_len, kv_len)
    batch = resolve_batch(m, batch) or 1
    nh = check_count(heads, "heads", allow_none=False) or 1
    dev = resolve_device(m, device)
    check_memory(
        batch * nh * q_len * kv_len,
        f"to_dense(q_len={q_len}, kv_len={kv_len}) for {batch} batch row(s) x {nh} head(s)",
        "use flexmask.block_mask (memory grows with blocks, not pairs), or describe() for counts",
        dev,
    )
    bound = m.bind(q_len, kv_len)
    out = torch.empty(batch, nh, q_len, kv_len, dtype=torch.bool, device=dev)
    b = torch.arange(batch, device=dev).repeat_interleave(nh)
    h = torch.arange(nh, device=dev).repeat(batch)
    zero = torch.zeros_like(b)
    rows = max(1, 2**22 // (batch * nh * kv_len))  # a few million pairs at a time
    for q0 in range(0, q_len, rows):
        n = min(rows, q_len - q0)
        tiles = evaluate_tiles(bound, b, h, zero + q0, zero, n, kv_len, q_len, kv_len)
        out[:, :, q0 : q0 + n] = tiles.view(batch, nh, n, kv_len)
    return out


def with_offset(mask: MaskMod, q_offset: int | Tensor) -> MaskMod:
    """``mask`` shifted by ``q_offset`` (itself when the offset is the int 0)."""
    if isinstance(q_offset, int) and not isinstance(q_offset, bool) and q_offset == 0:
        return mask
    return shifted(mask, q_offset)


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
    if not isinstance(keys_only, bool):
        raise TypeError(
            f"from_hf_attention_mask(keys_only=...) must be True or False, got {keys_only!r}."
        )
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
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError(
            f"{call} holds values other than 0 and 1: {attention_mask.unique().tolist()}."
        )
    return _Tokens(capture(attention_mask.bool()), keys_only)


def to_hf_4d(
    mask: MaskModFn,
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    q_offset: int | Tensor = 0,
    boolean: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """``mask`` as the 4-D attention mask Transformers models take: ``[B, 1, q_len, kv_len]``.

    Additive by default: 0 where allowed, ``finfo(dtype).min`` where not (never ``-inf``), ready
    for ``model(..., attention_mask=...)`` with eager or SDPA attention; ``boolean=True`` gives
    True = may attend instead. A row that sees no key stays fully masked: Transformers' legacy
    ``_unmask_unattended`` let such rows attend everywhere; flexmask's attention returns zeros.

    Args:
        mask: a flexmask mask or any mask_mod callable, in absolute positions.
        q_len, kv_len: query and key lengths (``kv_len`` defaults to ``q_len``).
        batch: batch rows; defaults to the mask's per-batch rows, else 1.
        dtype: the float dtype of an additive mask (the model's dtype).
        q_offset: the queries' first position (``kv_len - q_len`` after a cache).
        boolean: return a bool mask instead of an additive one.
        device: defaults to the mask's device, else CPU.

    Example:
        >>> import torch, flexmask as fm
        >>> fm.to_hf_4d(fm.causal(), 1, 3, q_offset=2).tolist()
        [[[[0.0, 0.0, 0.0]]]]
        >>> fm.to_hf_4d(fm.causal(), 2, boolean=True).shape
        torch.Size([1, 1, 2, 2])
    """
    if not isinstance(boolean, bool):
        raise TypeError(f"to_hf_4d(boolean=...) must be True or False, got {boolean!r}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"to_hf_4d(dtype=...) needs a floating dtype, got {dtype!r}.")
    dense = to_dense(mask, q_len, kv_len, batch=batch, device=device, q_offset=q_offset)
    return dense if boolean else to_additive(dense, dtype)


def to_additive(dense: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn a boolean mask into an additive one: 0 where allowed, ``finfo(dtype).min`` where not.

    ``finfo.min`` rather than ``-inf`` keeps a fully masked row finite (softmax spreads it evenly
    instead of returning NaN); the attention modules in flexmask zero such rows themselves.

    Example:
        >>> import torch, flexmask as fm
        >>> fm.to_additive(torch.tensor([True, False]), torch.float16)
        tensor([     0., -65504.], dtype=torch.float16)
    """
    if not isinstance(dense, Tensor) or dense.dtype != torch.bool:
        got = dense.dtype if isinstance(dense, Tensor) else type(dense).__name__
        raise TypeError(
            f"to_additive(dense=...) needs a bool tensor (True = may attend), got {got}; "
            "make one with flexmask.to_dense(mask, q_len)."
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"to_additive(dtype=...) needs a floating dtype, got {dtype!r}.")
    out = torch.zeros(dense.shape, dtype=dtype, device=dense.device)
    return out.masked_fill_(~dense, torch.finfo(dtype).min)


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
    size: int,
    *,
    b: int = 0,
    h: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Allowed pairs in each ``size x size`` tile of batch row ``b``, head ``h``: ``LongTensor[NQ,
    NK]`` (edge tiles cut at the lengths).

    Tiles the mask's structure decides (``MaskMod.tile_bounds``: all allowed, none allowed) cost
    nothing; only undecided tiles are evaluated, a few million elements at a time, so a long
    sparse mask never materialises ``q_len x kv_len``.
    """
    m = as_mask(mask).bind(q_len, kv_len)
    dev = resolve_device(m, device)
    nkv = -(-kv_len // size)
    nq = -(-q_len // size)
    check_memory(nq * nkv * 8, f"counting a {q_len} x {kv_len} mask in {size} x {size} tiles",
                 "use shorter lengths, or larger tiles (block_size)", dev)  # fmt: skip
    band = size * max(1, 2**18 // nkv)  # a few hundred thousand tiles at a time
    rows = []
    for q_from in range(0, q_len, band):
        tiles = Tiles(b, size, q_len, kv_len, dev, q_from, q_from + band)
        all_true, any_true = m.tile_bounds(tiles)
        counts = torch.where(all_true, tiles.area(), 0)
        qi, ki = (any_true & ~all_true).nonzero(as_tuple=True)
        step = max(1, 2**21 // (size * size))
        for i in range(0, qi.numel(), step):
            q, k = qi[i : i + step], ki[i : i + step]
            bh = torch.full_like(q, b), torch.full_like(q, h)
            starts = q * size + q_from, k * size
            values = evaluate_tiles(m, *bh, *starts, size, size, q_len, kv_len)
            counts[q, k] = values.sum((1, 2))
        rows.append(counts)
    return torch.cat(rows)


def block_mask_to_dense(block_mask: BlockMask) -> Tensor:
    """The element mask a BlockMask stands for: ``BoolTensor[B, H, q_len, kv_len]``.

    Full blocks are all True, empty blocks all False, partial blocks take the BlockMask's
    ``mask_mod`` (evaluated only there), exactly what ``flex_attention`` computes.

    Raises:
        TypeError: if ``block_mask`` is not a BlockMask (``to_dense`` takes a mask).
        ValueError: if the dense mask would not fit in memory.
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask_to_dense(block_mask=...) needs a torch BlockMask, got "
            f"{type(block_mask).__name__}; for a mask, use flexmask.to_dense(mask, q_len)."
        )
    q_len, kv_len = block_mask.seq_lengths
    qbs, kvbs = block_mask.BLOCK_SIZE
    kinds = block_kinds(block_mask)  # [B, H, QB, KVB]: 0 empty, 1 partial, 2 full
    nb, nh, nqb, nkvb = kinds.shape
    check_memory(nb * nh * nqb * qbs * nkvb * kvbs, f"block_mask_to_dense of a {q_len} x {kv_len} "
                 "BlockMask", "use describe() for its counts", kinds.device)  # fmt: skip
    # Tile layout [B, H, QB, qbs, KVB, kvbs]: a block is one [qbs, kvbs] slice.
    tiles = (kinds == 2)[:, :, :, None, :, None].expand(nb, nh, nqb, qbs, nkvb, kvbs).clone()
    for (bi, hi, qi, ki), values in partial_tiles(block_mask, kinds):
        tiles[bi, hi, qi, :, ki, :] = values
    return tiles.reshape(nb, nh, nqb * qbs, nkvb * kvbs)[:, :, :q_len, :kv_len]


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
