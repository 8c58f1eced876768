"""BlockMask building with a bounded cache, and the ``describe`` / ``check`` diagnostics."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from ._checks import (
    check_block_size,
    check_count,
    check_lengths,
    check_memory,
    format_bytes,
    resolve_batch,
    resolve_device,
)
from .convert import (
    block_kinds,
    evaluate_tiles,
    partial_tiles,
    tile_counts,
    to_dense,
    with_offset,
)
from .masks import MaskMod, MaskModFn, Tiles, as_mask, full

__all__ = ["MaskStats", "block_mask", "cache_info", "check", "clear_cache", "describe"]


class _LRU(OrderedDict[tuple[object, ...], object]):
    """A bounded mapping that forgets the least recently used entry; ``clear_cache`` empties
    every one."""

    instances: ClassVar[list[_LRU]] = []

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        _LRU.instances.append(self)

    def get_recent(self, key: tuple[object, ...]) -> object | None:
        if key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def put(self, key: tuple[object, ...], value: object) -> None:
        self[key] = value
        while len(self) > self.maxsize:
            self.popitem(last=False)


_BLOCK_MASKS = _LRU(64)
_DENSE_MASKS = _LRU(4)  # dense masks are q_len x kv_len bytes each: keep few
_COVERAGE = _LRU(16)
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
    block_size: int = 128,
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
        block_size: tile size, a positive multiple of 16.
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
    block_size = check_block_size(block_size)
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
    hit = None if key is None else _BLOCK_MASKS.get_recent(key)
    if isinstance(hit, BlockMask):  # an equal mask was bound and checked when it was built
        return hit
    bound = m.bind(q_len, kv_len)  # validates tensor sizes against the lengths
    tiled = method == "tiles" or (method == "auto" and not m.uses_heads)
    # Shorter than a block, the eager build is cheap (at most block_size x kv_len) and torch
    # 2.13's CPU inductor miscompiles the compiled builder there (a C++ type error).
    compiled = not tiled and compile and min(q_len, kv_len) >= block_size
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

    if key is not None:
        _BLOCK_MASKS.put(key, result)
    return result


def _check_build_memory(
    q_len: int,
    kv_len: int,
    batch: int | None,
    heads: int | None,
    block_size: int,
    device: torch.device,
    tiled: bool,
    compiled: bool,
) -> None:
    rows = (batch or 1) * (heads or 1)
    blocks = rows * -(-q_len // block_size) * -(-kv_len // block_size)
    if tiled:
        nbytes = blocks * _BYTES_PER_BLOCK
    else:
        pairs = rows * q_len * kv_len
        nbytes = pairs * (_BYTES_PER_PAIR_COMPILED if compiled else _BYTES_PER_PAIR_EAGER)
    what = f"block_mask(q_len={q_len}, kv_len={kv_len}) with {blocks} blocks of {block_size}"
    check_memory(nbytes, what, "use a larger block_size or shorter lengths", device)


def block_mask_for(
    mask: MaskModFn | None, q: Tensor, s_kv: int, *, block_size: int = 128
) -> BlockMask:
    """The (cached) BlockMask of ``mask`` for queries ``q [B, H, S, D]`` and ``s_kv`` keys: one
    row per batch entry or head only where the mask depends on it; None means every key."""
    m = full() if mask is None else as_mask(mask)
    return block_mask(
        m, q.shape[2], s_kv,
        batch=q.shape[0] if m.uses_batch else None,
        heads=q.shape[1] if m.uses_heads else None,
        block_size=block_size, device=q.device,
    )  # fmt: skip


def _tiled_block_mask(
    mask: MaskMod,
    batch: int | None,
    heads: int | None,
    q_len: int,
    kv_len: int,
    block_size: int,
    device: torch.device,
) -> BlockMask:
    """The BlockMask ``create_block_mask`` would build: blocks classified by the mask's tile
    bounds, and by exact counts on the blocks those leave undecided (none when they are exact)."""
    fulls, partials = [], []
    for b in range(batch or 1):
        if mask.exact_bounds:
            tiles = Tiles(b, block_size, q_len, kv_len, device)
            all_true, any_true = mask.tile_bounds(tiles)
            full = all_true & (tiles.area() == block_size * block_size)
            partial = any_true & ~full
        else:
            counts = tile_counts(mask, q_len, kv_len, block_size, b=b, device=device)
            full = counts == block_size * block_size  # a cut tail block is never full
            partial = (counts > 0) & ~full
        fulls.append(full)
        partials.append(partial)
    full, partial = torch.stack(fulls)[:, None], torch.stack(partials)[:, None]  # [B, 1, QB, KVB]
    if heads is not None:  # the mask ignores h: every head the same
        full, partial = full.expand(-1, heads, -1, -1), partial.expand(-1, heads, -1, -1)
    num, idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask, seq_lengths=(q_len, kv_len))  # fmt: skip


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Counts and indices of a ``[B, H, QB, KVB]`` bool grid, as torch orders them."""
    dense = blocks.to(torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32), indices.to(torch.int32).contiguous()


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
    complete: bool  # nothing to zero

    @classmethod
    def of(cls, rows: Tensor, hidden_q: Tensor, hidden_k: Tensor) -> Coverage:
        return cls(rows, hidden_q, hidden_k, not (bool(hidden_q.any()) or bool(hidden_k.any())))

    @classmethod
    def of_dense(cls, dense: Tensor) -> Coverage:
        """Of a dense mask ``[B, H, Q, KV]``: SDPA computes every query and key."""
        rows = dense.any(-1)
        return cls.of(rows, ~rows, ~dense.any(-2))

    def hide(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B, H, S, D]``, ``k`` and ``v [B, H_kv, S_kv, D]`` with the hidden queries and keys
        zeroed (the inputs themselves when nothing needs it)."""
        if self.complete:
            return q, k, v
        hidden_k = self.hidden_k
        if hidden_k.shape[1] not in (1, k.shape[1]):  # per query head: a key head serves a group
            hidden_k = hidden_k.view(hidden_k.shape[0], k.shape[1], -1, hidden_k.shape[-1]).all(2)
        return _zeroed(q, self.hidden_q), _zeroed(k, hidden_k), _zeroed(v, hidden_k)


@dataclass(frozen=True)
class DenseMask:
    """A dense boolean mask ``[B, H, Q, KV]`` (True = may attend) with its coverage."""

    allowed: Tensor
    coverage: Coverage


def cached_dense(
    mask: MaskMod, q_len: int, kv_len: int, *, batch: int, heads: int, device: torch.device
) -> DenseMask:
    """``to_dense`` for the SDPA backend, cached like BlockMasks: every layer of a model reuses
    the mask the first layer built (callers must not modify the result)."""
    mask_key = mask.cache_key()
    key = None if mask_key is None else (mask_key, q_len, kv_len, batch, heads, str(device))
    hit = None if key is None else _DENSE_MASKS.get_recent(key)
    if isinstance(hit, DenseMask):
        return hit
    with torch.inference_mode(False):  # kept: may serve a training step later
        allowed = to_dense(mask, q_len, kv_len, batch=batch, heads=heads, device=device)
        dense = DenseMask(allowed, Coverage.of_dense(allowed))
    if key is not None:
        _DENSE_MASKS.put(key, dense)
    return dense


def coverage(bm: BlockMask) -> Coverage:
    """The ``Coverage`` of a BlockMask: full blocks counted, its ``mask_mod`` evaluated on partial
    blocks only; cached per BlockMask while its mask's key stands (``MaskMod.cache_key``)."""
    key = block_mask_key(bm)
    hit = None if key is None else _COVERAGE.get_recent(key)
    if isinstance(hit, tuple) and hit[0] is bm:
        return hit[1]
    q_len, kv_len = bm.seq_lengths
    qbs, kvbs = bm.BLOCK_SIZE
    with torch.inference_mode(False), torch.no_grad():
        kinds = block_kinds(bm)
        rows, keys = _counts(bm, kinds)
        visited = kinds > 0  # only what a block-sparse kernel computes can carry NaN in
        q_computed = visited.any(-1).repeat_interleave(qbs, -1)[..., :q_len]
        k_computed = visited.any(-2).repeat_interleave(kvbs, -1)[..., :kv_len]
        result = Coverage.of(rows > 0, (rows == 0) & q_computed, (keys == 0) & k_computed)
    if key is not None:
        _COVERAGE.put(key, (bm, result))
    return result


def _zeroed(x: Tensor, flags: Tensor) -> Tensor:
    """``x [B, H, S, D]`` with the positions of ``flags [B or 1, H or 1, S]`` zeroed."""
    flags = flags.expand(x.shape[0], x.shape[1], -1)
    if x.device.type != "cpu":  # no host sync on accelerators: one pass at memory bandwidth
        return x.masked_fill(flags[..., None], 0.0)
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


def clear_cache() -> None:
    """Forget every cached BlockMask, dense mask and what was derived from them."""
    for cache in _LRU.instances:
        cache.clear()


def cache_info() -> dict[str, int]:
    """Entries now and bounds: ``size``/``maxsize`` for BlockMasks, ``dense_*`` for dense masks."""
    return {
        "size": len(_BLOCK_MASKS),
        "maxsize": _BLOCK_MASKS.maxsize,
        "dense_size": len(_DENSE_MASKS),
        "dense_maxsize": _DENSE_MASKS.maxsize,
    }


# --------------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskStats:
    """What a mask costs and keeps; ``str()`` gives a one-screen summary."""

    expr: str
    shape: tuple[int, int, int, int]  # (B, H, q_len, kv_len) of the BlockMask
    block_size: tuple[int, int]
    element_density: float | None  # allowed (q, kv) pairs / all pairs; None if not computable
    full_blocks: int
    partial_blocks: int
    empty_blocks: int
    block_mask_bytes: int
    dense_bytes: int  # a dense bool mask of the same shape
    masked_rows: int | None  # query rows that see no key (attention returns zeros there)

    @property
    def total_blocks(self) -> int:
        return self.full_blocks + self.partial_blocks + self.empty_blocks

    @property
    def block_density(self) -> float:
        """Fraction of blocks attention visits (full or partial)."""
        return (self.full_blocks + self.partial_blocks) / self.total_blocks

    def __str__(self) -> str:
        b, h, q, kv = self.shape
        density = "unknown" if self.element_density is None else f"{self.element_density:.1%}"
        rows = "unknown" if self.masked_rows is None else f"{self.masked_rows}"
        ratio = self.dense_bytes / max(self.block_mask_bytes, 1)
        return "\n".join(
            [
                self.expr,
                f"  shape            B={b} H={h} q_len={q} kv_len={kv}, "
                f"blocks of {self.block_size[0]}x{self.block_size[1]}",
                f"  element density  {density} of (q, kv) pairs may attend",
                f"  block density    {self.block_density:.1%} of {self.total_blocks} blocks "
                f"visited: {self.full_blocks} full, {self.partial_blocks} partial, "
                f"{self.empty_blocks} empty",
                f"  memory           BlockMask {format_bytes(self.block_mask_bytes)} vs dense "
                f"bool {format_bytes(self.dense_bytes)} ({ratio:.0f}x smaller)",
                f"  masked rows      {rows} query rows see no key (their output is zeros)",
            ]
        )


def describe(
    mask_or_block_mask: MaskModFn | BlockMask,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    batch: int | None = None,
    heads: int | None = None,
    block_size: int = 128,
    device: torch.device | str | None = None,
    compile: bool = True,
) -> MaskStats:
    """Densities, block counts, memory and fully masked rows of a mask or a BlockMask.

    Element counts come from full blocks (all allowed) plus the mask evaluated on partial blocks
    only, so describing a long sparse mask never materialises ``q_len x kv_len``. For a BlockMask
    whose ``mask_mod`` cannot be evaluated (a sliced one), element figures are None.

    Example:
        >>> import flexmask as fm
        >>> s = fm.describe(fm.causal(), 256, block_size=128, device="cpu", compile=False)
        >>> s.full_blocks, s.partial_blocks, s.empty_blocks, round(s.element_density, 3)
        (1, 2, 1, 0.502)
    """
    if isinstance(mask_or_block_mask, BlockMask):
        bm = mask_or_block_mask
        expr = getattr(bm.mask_mod, "__name__", None) or repr(bm.mask_mod)
        expr = f"BlockMask(mask_mod={expr})"
    else:
        if q_len is None:
            raise ValueError(
                "describe(mask, q_len=...) needs q_len for a mask (only a BlockMask knows its "
                "own shape); e.g. describe(causal(), 4096)."
            )
        m = as_mask(mask_or_block_mask, name="describe(mask)")
        bm = block_mask(m, q_len, kv_len, batch=batch, heads=heads, block_size=block_size,
                        device=device, compile=compile)  # fmt: skip
        expr = repr(m)
    kinds = block_kinds(bm)
    nb, nh = kinds.shape[:2]
    q, kv = bm.seq_lengths
    try:
        row_counts = _counts(bm, kinds)[0]
        density: float | None = float(row_counts.sum()) / (nb * nh * q * kv)
        masked: int | None = int((row_counts == 0).sum())
    except Exception:  # a mask_mod that cannot run here (e.g. a sliced BlockMask's)
        density, masked = None, None
    tensors = [t for t in bm.as_tuple() if isinstance(t, Tensor)]
    return MaskStats(
        expr=expr,
        shape=(nb, nh, q, kv),
        block_size=bm.BLOCK_SIZE,
        element_density=density,
        full_blocks=int((kinds == 2).sum()),
        partial_blocks=int((kinds == 1).sum()),
        empty_blocks=int((kinds == 0).sum()),
        block_mask_bytes=sum(t.numel() * t.element_size() for t in tensors),
        dense_bytes=nb * nh * q * kv,
        masked_rows=masked,
    )


def _counts(bm: BlockMask, kinds: Tensor) -> tuple[Tensor, Tensor]:
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


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def check(
    mask: MaskModFn,
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int | None = None,
    heads: int | None = None,
    block_size: int = 128,
    device: torch.device | str | None = None,
    compile: bool = True,
    q_offset: int | Tensor = 0,
) -> list[str]:
    """Problems a mask has at this size, in words; an empty list when all is well.

    Looks for: a mask_mod that fails under vmap (Python ``if``/``and`` on tensors, ``.item()``),
    query rows that see no key (their attention output is zeros), and a mask that ignores ``b`` or
    ``h`` although ``batch``/``heads`` were asked (one shared row would do, at a fraction of the
    memory). ``q_offset`` checks queries after a cache (``kv_len - q_len`` for a decode step).

    Example:
        >>> import flexmask as fm
        >>> fm.check(fm.causal(), 64, device="cpu", compile=False)
        []
        >>> fm.check(fm.causal() & fm.padding([60]), 64, device="cpu", compile=False)
        ['4 of 64 query rows see no key (they get zeros): b=0 rows 60..63']
    """
    m = with_offset(as_mask(mask), q_offset)
    kv_len = check_lengths(q_len, kv_len)
    nb = resolve_batch(m, batch) or 1
    nh = check_count(heads, "heads") or 1
    dev = resolve_device(m, device)
    bound = m.bind(q_len, kv_len)
    problems: list[str] = []

    try:
        evaluate_tiles(bound, *(torch.zeros(1, dtype=torch.long, device=dev),) * 4,
                       min(q_len, 8), min(kv_len, 8), q_len, kv_len)  # fmt: skip
    except TypeError as err:  # not a bool tensor
        return [str(err).rstrip(".")]
    except Exception as err:  # report, don't raise: this is the diagnosis
        cause = err.__cause__ or err
        problems.append(
            f"the mask fails under vmap ({type(cause).__name__}: "
            f"{(str(cause).splitlines() or [''])[0]}); write it with tensor operations only: "
            "&, |, ~ instead of and/or/not, torch.where instead of if, no .item() or int() on "
            "its arguments"
        )
        return problems

    bm = block_mask(m, q_len, kv_len, batch=nb, heads=nh, block_size=block_size,
                    device=dev, compile=compile, cache=False)  # fmt: skip
    counts = _counts(bm, block_kinds(bm))[0]  # [B, H, q_len]
    empty = counts == 0
    if bool(empty.any()):
        problems.append(
            f"{int(empty.sum())} of {empty.numel()} query rows see no key (they get zeros): "
            + _describe_rows(empty)
        )
    if (
        batch is not None
        and nb > 1
        and m.batch_size is None
        and _same_along(bound, 0, nb, nh, q_len, kv_len, dev)
    ):
        problems.append(
            f"the mask ignores b but batch={nb} was asked: build with batch=None to share one "
            f"BlockMask row across the batch ({nb}x less memory and build time)"
        )
    if nh > 1 and _same_along(bound, 1, nb, nh, q_len, kv_len, dev):
        problems.append(
            f"the mask ignores h but heads={nh} was asked: build with heads=None to share one "
            f"BlockMask across heads ({nh}x less memory and build time)"
        )
    return problems


def _describe_rows(empty: Tensor, limit: int = 4) -> str:
    """``b=0 rows 60..63; b=1 h=2 rows 5, 9..10`` for the first few (b, h) with empty rows."""
    parts = []
    nh = empty.shape[1]
    for b, h in empty.any(-1).nonzero().tolist()[:limit]:
        rows = empty[b, h].nonzero().flatten().tolist()
        runs, start, prev = [], rows[0], rows[0]
        for r in [*rows[1:], None]:  # None closes the last run
            if r is not None and r == prev + 1:
                prev = r
                continue
            runs.append(f"{start}" if start == prev else f"{start}..{prev}")
            if r is not None:
                start = prev = r
        where = f"b={b}" if nh == 1 else f"b={b} h={h}"
        parts.append(f"{where} rows {', '.join(runs[:6])}{', ...' if len(runs) > 6 else ''}")
    more = int(empty.any(-1).sum()) - limit
    return "; ".join(parts) + (f"; and {more} more (b, h)" if more > 0 else "")


def _same_along(
    mask: MaskMod, dim: int, nb: int, nh: int, q_len: int, kv_len: int, dev: torch.device
) -> bool:
    """Whether the mask is identical for every index of ``dim`` (0: batch, 1: head)."""
    n = nb if dim == 0 else nh
    rows = max(1, 2**22 // kv_len)  # evaluate a few million elements at a time
    for q0 in range(0, q_len, rows):
        size = min(rows, q_len - q0)
        idx = torch.arange(n, device=dev)
        zero = torch.zeros(n, dtype=torch.long, device=dev)
        b, h = (idx, zero) if dim == 0 else (zero, idx)
        start = torch.full((n,), q0, device=dev)
        tiles = evaluate_tiles(mask, b, h, start, zero, size, kv_len, q_len, kv_len)
        if not bool((tiles == tiles[:1]).all()):
            return False
    return True
