"""``block_mask``: the FlexAttention BlockMask of a mask, from its tile bounds where it can
(no compile, no ``q_len x kv_len`` tensor), else from torch's builder; cached under sound keys."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from ._checks import (
    check_block_sizes,
    check_count,
    check_lengths,
    check_memory,
    placed,
    resolve_batch,
    resolve_device,
)
from ._lru import LRU
from .evaluation import evaluate_tiles, tile_counts
from .masks import MaskMod, MaskModFn, Tiles, as_mask, full, with_offset

__all__ = ["block_mask", "block_mask_for"]

_BLOCK_MASKS = LRU("block_masks", 64)
RECOMPILE_LIMIT = 256  # graphs per compiled function: one per mask structure
METHODS = ("auto", "tiles", "create_block_mask")
# Peak bytes of building, measured with benchmarks/memory.py (rounded up): per block for tiles,
# per (q, kv) pair for torch's builder, compiled and eager.
_BYTES_PER_BLOCK, _BYTES_PER_PAIR_COMPILED, _BYTES_PER_PAIR_EAGER = 64, 4, 12


@functools.cache
def _compiled_create_block_mask() -> Callable[..., BlockMask]:
    # Built on first use, never at import: torch.compile costs seconds per new shape or mask.
    return torch.compile(create_block_mask)


def block_mask(
    mask: MaskModFn,
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int | None = None,
    heads: int | None = None,
    block_size: int | tuple[int, int] = 128,
    device: torch.device | str | None = None,
    compile: bool = True,
    cache: bool = True,
    q_offset: int | Tensor = 0,
    method: str = "auto",
) -> BlockMask:
    """Build the FlexAttention ``BlockMask`` of ``mask`` for a ``q_len x kv_len`` problem.

    Args:
        mask: a flexmask mask or any mask_mod callable.
        q_len, kv_len: query and key lengths (``kv_len`` defaults to ``q_len``).
        batch: batch rows; None builds one row shared by the whole batch, unless the mask holds
            per-batch tensors (``padding``, a ``[B]`` prefix), whose row count is then used.
        heads: heads; None builds one shared by all heads (right for every flexmask factory).
        block_size: tile size, a positive multiple of 16; or ``(q_block, kv_block)``, as torch's
            ``BLOCK_SIZE``.
        device: defaults to the mask's device, else torch's current accelerator, else CPU.
        compile: evaluate the mask with ``torch.compile(create_block_mask)`` (built once per
            process; seconds for the first call of each shape, then milliseconds). False runs
            ``create_block_mask`` eagerly, which materialises the ``q_len x kv_len`` mask; so do
            problems shorter than one block (a decode step), where that is cheap.
        cache: reuse the BlockMask of an equal earlier call (a hit is exactly what a fresh build
            gives). Scalar masks (``causal() & sliding_window(256)``) are keyed by value, masks
            holding tensors by identity and by the tensors' version counters (refilling one in
            place is a new key). Masks holding a plain callable are never cached: flexmask
            cannot see what the callable reads (a buffer refilled every step), so it evaluates
            them afresh, as ``create_block_mask`` does.
        q_offset: the queries' first position, ``shifted(mask, q_offset)`` (decoding after a
            cache: ``kv_len - q_len``).
        method: how blocks are classified. ``"tiles"``: from the mask's structure
            (``MaskMod.tile_bounds``), evaluating the mask only on the blocks its structure
            leaves undecided (the diagonal of a causal mask, document boundaries): no compile,
            no ``q_len x kv_len`` tensor; for masks made of flexmask factories.
            ``"create_block_mask"``: torch's builder (compiled when ``compile``). ``"auto"``:
            tiles unless the mask holds a plain callable. Both give the same BlockMask.

    Returns:
        A ``BlockMask`` whose ``mask_mod`` is the (bound) flexmask mask.

    Raises:
        TypeError, ValueError: for bad arguments, a mask_mod that fails or returns no bool
            tensor, or a build that would not fit in the free memory.

    Example:
        >>> import flexmask as fm
        >>> bm = fm.block_mask(fm.causal(), 512, block_size=128, device="cpu", compile=False)
        >>> bm.shape, int(bm.kv_num_blocks.sum()), int(bm.full_kv_num_blocks.sum())
        ((1, 1, 512, 512), 4, 6)
    """
    m = with_offset(as_mask(mask), q_offset)
    kv_len = check_lengths(q_len, kv_len)
    bsz = resolve_batch(m, batch, default=None)
    heads = check_count(heads, "heads")
    block_size = check_block_sizes(block_size)
    dev = resolve_device(m, device)
    if method not in METHODS:
        raise ValueError(f"block_mask(method=...) must be one of {METHODS}, got {method!r}.")
    if method == "tiles" and m.uses_heads:
        raise ValueError(
            f"block_mask(method='tiles') needs a mask made of flexmask factories, but {m!r} holds "
            "a plain callable, whose structure is unknown; use method='create_block_mask'."
        )

    mask_key = m.cache_key() if cache else None
    key = None if mask_key is None else (mask_key, q_len, kv_len, bsz, heads, block_size, str(dev),
                                         method)  # fmt: skip
    hit = _BLOCK_MASKS.get_recent(key)
    if isinstance(hit, BlockMask):  # an equal mask was bound and checked when it was built
        return hit
    bound = placed(m, dev).bind(q_len, kv_len)  # validates tensor sizes against the lengths
    tiled = method == "tiles" or (method == "auto" and not m.uses_heads)
    # Shorter than a block, the eager build is cheap (at most block_size x kv_len) and torch
    # 2.13's CPU inductor miscompiles the compiled builder there (a C++ type error).
    compiled = not tiled and compile and q_len >= block_size[0] and kv_len >= block_size[1]
    _check_build_memory(q_len, kv_len, bsz, heads, block_size, dev, tiled, compiled)
    if not tiled:  # a plain callable: its first element says whether it can be built at all
        evaluate_tiles(bound, *(torch.zeros(1, dtype=torch.long, device=dev),) * 4, 1, 1, 1, 1)

    # Built outside inference mode, so that the result (cached, or kept by the caller) may
    # serve a training step later: autograd refuses inference tensors.
    with torch.inference_mode(False), torch.no_grad():
        if tiled:
            result = _tiled_block_mask(bound, bsz, heads, q_len, kv_len, block_size, dev)
        elif compiled:
            # Hand compiled code a plain closure: torch guards a callable *object* by identity,
            # so every new mask would recompile; a closure is guarded by its code and captured
            # tensors.
            def mask_fn(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return bound(b, h, q_idx, kv_idx)

            # Each mask *structure* is one graph; a model may use more than dynamo's default 8.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                build = _compiled_create_block_mask()
                result = build(mask_fn, bsz, heads, q_len, kv_len, dev, block_size)
            result.mask_mod = bound
        else:
            result = create_block_mask(bound, bsz, heads, q_len, kv_len, dev, block_size)

    _BLOCK_MASKS.put(key, result)
    return result


def _check_build_memory(
    q_len: int,
    kv_len: int,
    batch: int | None,
    heads: int | None,
    block_size: tuple[int, int],
    device: torch.device,
    tiled: bool,
    compiled: bool,
) -> None:
    rows = (batch or 1) * (heads or 1)
    blocks = rows * -(-q_len // block_size[0]) * -(-kv_len // block_size[1])
    if tiled:
        nbytes = blocks * _BYTES_PER_BLOCK
    else:
        pairs = rows * q_len * kv_len
        nbytes = pairs * (_BYTES_PER_PAIR_COMPILED if compiled else _BYTES_PER_PAIR_EAGER)
    size = "x".join(map(str, block_size))
    what = f"block_mask(q_len={q_len}, kv_len={kv_len}) with {blocks} blocks of {size}"
    check_memory(nbytes, what, "use a larger block_size or shorter lengths", device)


def block_mask_for(
    mask: MaskModFn | None,
    q: Tensor,
    s_kv: int,
    *,
    block_size: int | tuple[int, int] = 128,
    cache: bool = True,
) -> BlockMask:
    """The BlockMask of ``mask`` for queries ``q [B, H, S, D]`` and ``s_kv`` keys (cached unless
    ``cache`` is False): one row per batch entry or head only where the mask depends on it; None
    means every key."""
    m = full() if mask is None else as_mask(mask)
    return block_mask(
        m, q.shape[2], s_kv,
        batch=q.shape[0] if m.uses_batch else None,
        heads=q.shape[1] if m.uses_heads else None,
        block_size=block_size, device=q.device, cache=cache,
    )  # fmt: skip


def _tiled_block_mask(
    mask: MaskMod,
    batch: int | None,
    heads: int | None,
    q_len: int,
    kv_len: int,
    block_size: tuple[int, int],
    device: torch.device,
) -> BlockMask:
    """The BlockMask ``create_block_mask`` would build: blocks classified by the mask's tile
    bounds, and by exact counts on the blocks those leave undecided (none when they are exact)."""
    fulls, partials = [], []
    for b in range(batch or 1):
        if mask.exact_bounds:
            tiles = Tiles(b, block_size, q_len, kv_len, device)
            all_true, any_true = mask.tile_bounds(tiles)
            full = all_true & (tiles.area() == block_size[0] * block_size[1])
            partial = any_true & ~full
        else:
            counts = tile_counts(mask, q_len, kv_len, block_size, b=b, device=device)
            full = counts == block_size[0] * block_size[1]  # a cut tail block is never full
            partial = (counts > 0) & ~full
        fulls.append(full)
        partials.append(partial)
    full, partial = torch.stack(fulls)[:, None], torch.stack(partials)[:, None]  # [B, 1, QB, KVB]
    if heads is not None:  # the mask ignores h: every head the same
        full, partial = full.expand(-1, heads, -1, -1), partial.expand(-1, heads, -1, -1)
    return from_grids(full, partial, mask, (q_len, kv_len), block_size)


def from_grids(
    full: Tensor,
    partial: Tensor,
    mask_mod: MaskModFn,
    seq_lengths: tuple[int, int],
    block_size: tuple[int, int],
) -> BlockMask:
    """The BlockMask of bool block grids ``[B, H, QB, KVB]``: ``full`` blocks need no mask,
    ``partial`` ones are evaluated with ``mask_mod``."""
    num, idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    result = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                      mask_mod=mask_mod, seq_lengths=seq_lengths,
                                      compute_q_blocks=False)  # fmt: skip
    # The query-side tables (for the backward pass) from the same grids, transposed: torch's
    # from_kv_blocks rebuilds the grids under vmap, which cost ~10 ms of Python per decode step
    # on an H200, several times the attention itself.
    result.q_num_blocks, result.q_indices = _ordered(partial.transpose(-2, -1))
    result.full_q_num_blocks, result.full_q_indices = _ordered(full.transpose(-2, -1))
    return result


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Counts and indices of a ``[B, H, QB, KVB]`` bool grid, as torch orders them."""
    dense = blocks.to(torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32), indices.to(torch.int32).contiguous()
