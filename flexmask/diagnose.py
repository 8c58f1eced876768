"""``describe`` and ``check``: what a mask costs and keeps, and the mistakes made with masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import check_count, check_lengths, format_bytes, placed, resolve_batch, resolve_device
from .block import block_mask
from .evaluation import allowed_counts, block_kinds, evaluate_tiles
from .masks import MaskMod, MaskModFn, as_mask, with_offset

__all__ = ["MaskStats", "check", "describe"]


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
        row_counts = allowed_counts(bm, kinds)[0]
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
    m = placed(m, dev)
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
    counts = allowed_counts(bm, block_kinds(bm))[0]  # [B, H, q_len]
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
