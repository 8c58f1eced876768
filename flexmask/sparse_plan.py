"""The sparse path's plan: how a BlockMask's visited blocks are grouped into runs that one SDPA
call each computes (strided views where the blocks allow, gathers elsewhere), with the element
masks of partial blocks; built once per BlockMask and cached.

A *causal square* (query blocks ``a..b-1`` seeing exactly key blocks ``a..`` their own, causally:
a document of a packed causal batch) is computed by SDPA's ``is_causal``, with no element mask,
equal squares at a constant stride in one batched call: 1.05-1.35x faster than the same blocks
as masked runs (``benchmarks/causal_squares.py``: 8 and 32 documents in 8192 tokens)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._lru import LRU
from .coverage import block_mask_key
from .evaluation import block_kinds, evaluate_tiles

__all__ = ["Plan", "Run", "plan"]


@dataclass
class Run:
    """Query blocks ``qb [n]`` of mask row ``row`` attending to key blocks ``blocks [n, c]``."""

    row: int
    qb: Tensor
    q_view: tuple[int, int] | None  # see _view
    blocks: Tensor
    kv_view: tuple[int, int] | None
    allowed: Tensor | None  # [n, 1, qbs, c*kvbs] with blind queries opened; None: all full
    blind: Tensor | None  # [n, 1, qbs, 1] queries that see no key, None when there are none
    merged: bool  # rows as query sequences (seq_blocks); allowed, blind: [1, 1, n*qbs, ...]
    causal: bool = False  # causal squares: merged, keys = each sequence's blocks, SDPA is_causal
    seqs: int = 1  # a merged run's sequences: equal causal squares at a constant stride
    additive: dict[torch.dtype, Tensor] = field(default_factory=dict)

    def seq_blocks(self) -> tuple[Tensor, Tensor]:
        """A merged run's query blocks ``[m, L]`` and key blocks ``[m, c]``, one row per sequence
        (``q_view`` and ``kv_view`` are their views)."""
        length = len(self.qb) // self.seqs
        return self.qb.view(self.seqs, length), self.blocks[::length]

    def attn_mask(self, dtype: torch.dtype) -> Tensor | None:
        """``allowed`` as an additive mask (SDPA converts a boolean one on every call)."""
        if self.allowed is None:
            return None
        if dtype not in self.additive:
            with torch.inference_mode(False):  # kept with the plan: may serve training later
                zero = torch.zeros((), dtype=dtype, device=self.allowed.device)
                self.additive[dtype] = zero.masked_fill(~self.allowed, float("-inf"))
        return self.additive[dtype]


@dataclass(frozen=True)
class Plan:
    shape: tuple[int, int, int, int]  # the BlockMask's [Bm, Hm, QB, KVB]
    runs: list[Run]
    order: Tensor | None  # the rows the runs' outputs fill; None: all rows in order
    density: float  # the fraction of the BlockMask's blocks that are visited
    gathered: float  # the fraction of visited blocks that are copied, not viewed

    @property
    def cost(self) -> float:
        """The sparse path's cost relative to dense SDPA over every block, as
        ``MultiheadFlexAttention(backend="auto")`` estimates it: gathered blocks count twice
        (measured: copies, and non-consecutive blocks come with partial blocks on both sides)."""
        return self.density * (1.0 + self.gathered)


_PLANS = LRU("plans", 16)


def plan(bm: BlockMask) -> Plan:
    """The runs a BlockMask is computed in, with their element masks; cached per BlockMask (while
    its mask's key stands), so every layer and training step that reuses a BlockMask evaluates
    its mask_mod once. Built outside inference mode: a plan made during evaluation serves
    training later."""
    key = block_mask_key(bm)
    hit = _PLANS.get_recent(key)
    if isinstance(hit, tuple) and hit[0] is bm:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        result = _make_plan(bm)
    _PLANS.put(key, (bm, result))
    return result


def _make_plan(bm: BlockMask) -> Plan:
    kinds = block_kinds(bm)  # [Bm, Hm, QB, KVB]: 0 empty, 1 partial, 2 full
    mb, mh, nqb, nkvb = kinds.shape
    flat = kinds.flatten(0, 1)
    visited = flat > 0
    counts = visited.sum(-1)
    first = visited.to(torch.int8).argmax(-1)
    last = nkvb - 1 - visited.flip(-1).to(torch.int8).argmax(-1)
    contiguous = last - first + 1 == counts
    runs, done = [], []
    for r in range(mb * mh):
        rest = visited[r].clone()  # the rows no causal square took
        squares = _causal_squares(bm, flat[r], r, first[r], counts[r], contiguous[r], mh)
        for starts, length in _equal_squares(squares):  # one SDPA call per group
            seqs = torch.tensor(starts, device=kinds.device)[:, None] + torch.arange(
                length, device=kinds.device)  # [m, L]  # fmt: skip
            qb = seqs.flatten()
            blocks = seqs.repeat_interleave(length, dim=0)  # each row names its square's keys
            runs.append(Run(r, qb, _view(seqs), blocks, _view(seqs), None, None, merged=True,
                            causal=True, seqs=len(starts)))  # fmt: skip
            done.append(r * nqb + qb)
            rest[qb] = False
        for qb, blocks in _runs(rest, rest.sum(-1), first[r], contiguous[r]):
            allowed = _element_mask(bm, flat[r], r, qb, blocks, mh)
            blind = None
            if allowed is not None:
                seen = allowed.any(-1, keepdim=True)
                if not bool(seen.all()):
                    # SDPA would give NaN on a row with no key: open it, zero it afterwards.
                    allowed, blind = allowed | ~seen, ~seen
            q_view, kv_view = _view(qb[:, None]), _view(blocks)
            merged = len(qb) > 1 and q_view is not None and q_view[1] == 1 and kv_view is not None \
                and kv_view[1] == 0  # fmt: skip
            if merged:
                allowed, blind = (None if t is None else t.view(1, 1, -1, t.shape[-1])
                                  for t in (allowed, blind))  # fmt: skip
                q_view, kv_view = _view(qb[None, :]), _view(blocks[:1])
            runs.append(Run(r, qb, q_view, blocks, kv_view, allowed, blind, merged))
            done.append(r * nqb + qb)
    order: Tensor | None = torch.cat(done) if done else kinds.new_zeros(0, dtype=torch.long)
    everything = torch.arange(mb * mh * nqb, device=kinds.device)
    if order is not None and order.shape == everything.shape and bool((order == everything).all()):
        order = None
    sizes = [run.blocks.numel() for run in runs]
    total = max(1, sum(sizes))
    gathered = sum(n for n, run in zip(sizes, runs, strict=True) if run.kv_view is None) / total
    density = float(visited.float().mean()) if visited.numel() else 0.0
    return Plan((mb, mh, nqb, nkvb), runs, order, density, gathered)


CAUSAL_SQUARE_MAX_TOKENS = 2048
"""The longest causal square: with a score_mod, its bias and causal mask span the whole square
(L x L per head), so longer ones are left to the masked runs."""


def _causal_squares(
    bm: BlockMask, kinds: Tensor, row: int, first: Tensor, counts: Tensor, contiguous: Tensor,
    mask_heads: int,
) -> list[tuple[int, int]]:  # fmt: skip
    """Query blocks ``a..b-1`` of mask row ``row`` (``kinds``: its ``[QB, KVB]`` classes) where
    block ``j`` visits key blocks ``a..j``, all full but the diagonal, whose elements are exactly
    causal (``kv <= q``) on every real query: SDPA's ``is_causal`` on the square computes them."""
    qbs, kvbs = bm.BLOCK_SIZE
    s_q, s_kv = bm.seq_lengths
    nqb, nkvb = kinds.shape
    if qbs != kvbs:
        return []
    j = torch.arange(min(nqb, nkvb), device=kinds.device)
    diagonal = kinds[j, j] == 1
    below_full = (kinds[: len(j), : len(j)] == 2).tril(-1).sum(-1) == j - first[: len(j)]
    shaped = contiguous[: len(j)] & (first[: len(j)] + counts[: len(j)] - 1 == j)
    candidate = (diagonal & below_full & shaped).tolist()
    starts = first.tolist()
    squares, longest = [], max(1, CAUSAL_SQUARE_MAX_TOKENS // qbs)
    a = 0
    while a < len(candidate):  # a square starts at a block that sees only its diagonal
        if not (candidate[a] and starts[a] == a):
            a += 1
            continue
        b = a + 1
        while b < len(candidate) and b - a < longest and candidate[b] and starts[b] == a:
            b += 1
        squares.append((a, b))
        a = b
    if not squares:
        return []
    diag = torch.tensor([i for a, b in squares for i in range(a, b)], device=kinds.device)
    tiles = evaluate_tiles(
        bm.mask_mod, torch.full_like(diag, row // mask_heads),
        torch.full_like(diag, row % mask_heads), diag * qbs, diag * kvbs, qbs, kvbs, s_q, s_kv,
    )  # fmt: skip
    pos = torch.arange(qbs, device=kinds.device)
    causal = pos[None, :] <= pos[:, None]
    real = (diag[:, None] * qbs + pos < s_q)[:, :, None]  # padded queries are dropped anyway
    exact = ((tiles == causal) | ~real).flatten(1).all(-1).tolist()
    ok = dict(zip(diag.tolist(), exact, strict=True))
    kept = []
    for a, b in squares:  # up to the first diagonal that is not causal: still a square
        end = next((i for i in range(a, b) if not ok[i]), b)
        if end > a:
            kept.append((a, end))
    return kept


def _equal_squares(squares: list[tuple[int, int]]) -> Iterator[tuple[list[int], int]]:
    """Causal squares ``(a, b)`` grouped into runs of equal length at a constant stride (packed
    documents of one length): ``(starts, length)``, computed by one batched SDPA call."""
    starts, lengths = [a for a, _ in squares], [b - a for a, b in squares]
    for i, j in _constant_steps(starts, lengths):
        if lengths[i] == lengths[j - 1]:  # lengths advance by a constant step: all equal
            yield starts[i:j], lengths[i]
        else:
            yield from (([starts[k]], lengths[k]) for k in range(i, j))


def _view(blocks: Tensor) -> tuple[int, int] | None:
    """``(first block, step)`` when each row of ``blocks [n, c]`` is consecutive and the rows'
    first blocks advance by a constant step (the rows are strided windows of one tensor)."""
    starts = blocks[:, 0]
    step = int(starts[1] - starts[0]) if len(starts) > 1 else 0
    if step < 0 or not bool((blocks.diff(dim=1) == 1).all()):
        return None
    if len(starts) > 2 and not bool((starts.diff() == step).all()):
        return None
    return int(starts[0]), step


def _runs(
    visited: Tensor, counts: Tensor, first: Tensor, contiguous: Tensor
) -> Iterator[tuple[Tensor, Tensor]]:
    """Query blocks of one mask row grouped for one SDPA call each: ``(qb [n], blocks [n, c])``.

    Rows visiting ``c`` consecutive key blocks whose query and key starts advance by constant
    steps form a run that strided views reach without copying (a sliding window is one run per
    count, documents one per document or per count); the other rows are gathered by count.
    """
    ar = torch.arange(visited.shape[-1], device=visited.device)
    for c in torch.unique(counts[counts > 0]).tolist():
        rows = ((counts == c) & contiguous).nonzero().flatten()
        if rows.numel():
            starts = first[rows]
            for a, b in _constant_steps(rows.tolist(), starts.tolist()):
                yield rows[a:b], starts[a:b, None] + ar[:c]
        rows = ((counts == c) & ~contiguous).nonzero().flatten()
        if rows.numel():
            order = torch.argsort(visited[rows].to(torch.int8), dim=-1, descending=True,
                                  stable=True)  # fmt: skip
            yield rows, order[:, :c]


def _constant_steps(xs: list[int], ys: list[int]) -> Iterator[tuple[int, int]]:
    """Split ``range(len(xs))`` into maximal runs along which ``(x, y)`` advances by one step."""
    a, n = 0, len(xs)
    while a < n:
        b = a + 1
        if b < n:
            step = (xs[b] - xs[a], ys[b] - ys[a])
            while b + 1 < n and (xs[b + 1] - xs[b], ys[b + 1] - ys[b]) == step:
                b += 1
            b += 1
        yield a, b
        a = b


def _element_mask(
    bm: BlockMask, kinds: Tensor, row: int, qb: Tensor, blocks: Tensor, mask_heads: int
) -> Tensor | None:
    """``BoolTensor[n, 1, qbs, c*kvbs]`` over the keys of ``_take(k, blocks)`` for query blocks
    ``qb`` of mask row ``row`` (``kinds``: its ``[QB, KVB]`` classes), or None when every block
    is full: the BlockMask's ``mask_mod`` is evaluated on partial blocks only."""
    qbs, kvbs = bm.BLOCK_SIZE
    s_q, s_kv = bm.seq_lengths
    n, c = blocks.shape
    kind = kinds[qb[:, None], blocks]  # [n, c]
    kv_start = blocks * kvbs
    if bool((kind == 2).all()) and not bool((kv_start + kvbs > s_kv).any()):
        return None
    allowed = (kind == 2)[:, None, :, None].expand(n, qbs, c, kvbs).clone()
    part_r, part_c = (kind == 1).nonzero(as_tuple=True)
    if part_r.numel():
        values = evaluate_tiles(
            bm.mask_mod,
            torch.full_like(part_r, row // mask_heads), torch.full_like(part_r, row % mask_heads),
            qb[part_r] * qbs, kv_start[part_r, part_c], qbs, kvbs, s_q, s_kv,
        )  # fmt: skip
        allowed[part_r, :, part_c, :] = values
    kv_pos = kv_start[:, :, None] + torch.arange(kvbs, device=blocks.device)
    allowed &= (kv_pos < s_kv)[:, None]  # keys past the sequence (a cut last block)
    return allowed.view(n, 1, qbs, c * kvbs)
