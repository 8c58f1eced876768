"""Dense forms of a mask: boolean ``[B, H, Q, KV]`` masks, additive float masks, Transformers'
4-D masks, and the element mask a BlockMask stands for."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import (
    check_count,
    check_flag,
    check_float_dtype,
    check_lengths,
    check_memory,
    placed,
    resolve_batch,
    resolve_device,
)
from .evaluation import block_kinds, evaluate_tiles, partial_tiles
from .masks import MaskMod, MaskModFn, as_mask, with_offset

__all__ = ["block_mask_to_dense", "to_additive", "to_dense", "to_hf_4d"]


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
    bound = placed(m, dev).bind(q_len, kv_len)
    if bound.sealed and batch * nh * q_len * kv_len <= _BROADCAST_PAIRS:
        return _broadcast(bound, batch, nh, q_len, kv_len, dev)
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


_BROADCAST_PAIRS = 1 << 16


def _broadcast(
    mask: MaskMod, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device
) -> Tensor:
    """A small mask in one call on broadcast indices. flexmask's own masks are written with
    broadcasting tensor operations; vmap (which takes any mask_mod) costs about a millisecond a
    call, the whole price of a decode step's mask. Built outside inference mode, as cached."""
    b, h, q, kv = (torch.arange(n, device=device) for n in (batch, heads, q_len, kv_len))
    with torch.inference_mode(False), torch.no_grad():
        out = mask(b[:, None, None, None], h[None, :, None, None], q[:, None], kv[None, :])
    return out.expand(batch, heads, q_len, kv_len).contiguous()


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
    check_flag(boolean, "to_hf_4d(boolean=...)")
    check_float_dtype(dtype, "to_hf_4d(dtype=...)")
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
    check_float_dtype(dtype, "to_additive(dtype=...)")
    out = torch.zeros(dense.shape, dtype=dtype, device=dense.device)
    return out.masked_fill_(~dense, torch.finfo(dtype).min)


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
