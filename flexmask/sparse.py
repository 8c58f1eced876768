"""Block-sparse attention from a BlockMask with dense kernels: runs (and trains) on CPU.

Every query block attends to the key blocks its BlockMask row visits. Query blocks are grouped
into *runs* that one ``scaled_dot_product_attention`` call computes: rows visiting the same
number ``c`` of consecutive key blocks, with query and key starts advancing by constant steps,
are strided views of q, k, v (no copy: a sliding window is one run per count); query blocks that
read the same keys (a bidirectional document) are merged into one long query sequence; other
rows are gathered. An element mask exists only for runs holding partial blocks; it is evaluated
once per BlockMask and cached with the runs (the *plan*). The backward pass keeps each run's
SDPA graph and adds its gradients into one buffer per input. Memory is proportional to the
visited blocks, never to ``q_len x kv_len``.

A second backward through the same graph (``retain_graph=True``, ``gradcheck``) recomputes the
runs from the saved inputs (with the same dropout); a differentiable backward
(``create_graph=True``: gradient penalties) recomputes them with an explicit softmax, which
autograd can differentiate again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block import _LRU, block_mask_for, block_mask_key, coverage
from .convert import block_kinds, evaluate_tiles
from .masks import MaskModFn, as_mask

__all__ = ["sparse_attention"]


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskModFn | BlockMask | None = None,
    *,
    block_size: int = 128,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention that computes only the blocks a BlockMask visits; differentiable.

    Shapes:
        q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv, D]`` (``H_kv`` divides ``H``: grouped-query
        attention) -> ``[B, H, S, D]``.

    Args:
        mask: a flexmask mask or mask_mod (its BlockMask is built with ``block_size`` and
            cached), a BlockMask for ``(S, S_kv)`` with batch and heads of 1 or the inputs', or
            None (every key visible).
        scale: score scale, default ``1 / sqrt(D)``.
        dropout_p: attention-probability dropout.

    Query rows that see no key give zeros (and zero gradients), never NaN, also when the
    inputs hold NaN at positions the mask hides from every query (padding): those are zeroed
    before computing.

    Example:
        >>> import torch, flexmask as fm
        >>> q = k = v = torch.randn(1, 2, 300, 16)
        >>> out = fm.sparse_attention(q, k, v, fm.sliding_window(64), block_size=64)
        >>> dense = fm.to_dense(fm.sliding_window(64), 300)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        >>> torch.allclose(out, ref, atol=1e-6)
        True
    """
    _check_inputs(q, k, v, dropout_p)
    bsz, nh, s_q, _ = q.shape
    nkv, s_kv = k.shape[1], k.shape[2]
    if not isinstance(mask, BlockMask):
        m = None if mask is None else as_mask(mask, name="sparse_attention(mask=...)")
        mask = block_mask_for(m, q, s_kv, block_size=block_size)
    _check_block_mask(mask, bsz, nh, s_q, s_kv)

    plan = _plan(mask)
    mb, mh, nqb, nkvb = plan.shape
    qbs, kvbs = mask.BLOCK_SIZE
    if mh == nh and nkv != nh:  # per-head mask: one key head per query head
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    # One "mask row" per (Bm, Hm) of the BlockMask; the batch rows and heads the mask broadcasts
    # over ride along as SDPA heads, in an order that keeps GQA's head // group pairing.
    q, k, v = coverage(mask).hide(q, k, v)  # NaN where the mask hides everything stays out
    q_rows = _mask_rows(q, mb, mh, nqb * qbs)  # [Bm*Hm, hs, QB*qbs, D]
    k_rows = _mask_rows(k, mb, mh, nkvb * kvbs)
    v_rows = _mask_rows(v, mb, mh, nkvb * kvbs)
    if not plan.runs:  # nothing visible: zeros, still in the graph so that gradients are zeros
        inputs = q.sum() + k.sum() + v.sum()
        never = torch.zeros((), dtype=torch.bool, device=q.device)
        return q.new_zeros(q.shape) + torch.where(never, inputs, 0.0)
    args = (plan, (qbs, kvbs), scale, dropout_p)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_rows, k_rows, v_rows)):
        result = _SparseRuns.apply(q_rows, k_rows, v_rows, *args)
    else:
        result = _attend_runs(q_rows, k_rows, v_rows, *args)
    return _unblock(result, bsz, nh, mb, mh, nqb, qbs)[:, :, :s_q]


def _attend_runs(
    q_rows: Tensor,
    k_rows: Tensor,
    v_rows: Tensor,
    plan: _Plan,
    sizes: tuple[int, int],
    scale: float | None,
    dropout_p: float,
    graphs: list[tuple[Tensor, ...]] | None = None,
    explicit: bool = False,
) -> Tensor:
    """Every run of the plan, one SDPA call each: ``[Bm*Hm*QB, hs, qbs, D]`` query blocks.

    With ``graphs``, each run's inputs are made leaves and its autograd graph is kept there as
    ``(out, qg, kg, vg)`` for ``_SparseRuns.backward``. ``explicit`` computes each run with an
    explicit softmax instead of SDPA (differentiable twice; no dropout)."""
    qbs, kvbs = sizes
    gqa = q_rows.shape[1] != k_rows.shape[1]
    attend = _explicit_attention if explicit else F.scaled_dot_product_attention
    outs = []
    for run in plan.runs:
        n = len(run.qb)
        blocks = run.blocks[:1] if run.merged else run.blocks
        if run.merged:  # consecutive query blocks, the same keys: one long query sequence
            assert run.q_view is not None
            qg = q_rows[run.row].narrow(1, run.q_view[0] * qbs, n * qbs).unsqueeze(0)
        else:
            qg = _take(q_rows[run.row], run.qb, run.q_view, qbs)
        kg = _take(k_rows[run.row], blocks, run.kv_view, kvbs)
        vg = _take(v_rows[run.row], blocks, run.kv_view, kvbs)
        with torch.enable_grad() if graphs is not None else contextlib.nullcontext():
            if graphs is not None:
                qg, kg, vg = (t.detach().requires_grad_() for t in (qg, kg, vg))
            out = attend(
                qg, kg, vg, attn_mask=run.attn_mask(q_rows.dtype), dropout_p=dropout_p,
                scale=scale, enable_gqa=gqa,
            )  # fmt: skip
            if run.blind is not None:  # queries that see no key: zeros, and zero gradients
                out = out.masked_fill(run.blind, 0.0)
        if graphs is not None:
            graphs.append((out, qg, kg, vg))
            out = out.detach()
        if run.merged:
            out = out.view(-1, n, qbs, out.shape[-1]).transpose(0, 1)
        outs.append(out)
    if plan.order is None:  # the runs cover every query block in order
        return torch.cat(outs)
    rows, hs, _, dim = q_rows.shape  # rows that visit no block stay zero
    result = q_rows.new_zeros(rows * (q_rows.shape[2] // qbs), hs, qbs, dim)
    return result.index_copy(0, plan.order, torch.cat(outs))


def _explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
    enable_gqa: bool,
) -> Tensor:
    """SDPA's arithmetic written out with ops autograd can differentiate again."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:  # additive, and no row is all -inf (blind rows are opened)
        scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


class _SparseRuns(torch.autograd.Function):
    """The runs with a backward pass that writes each run's gradients into one buffer per input
    (autograd through per-run views of q, k, v would add a full-size zero gradient per run).

    The first backward reuses the graphs the forward pass kept; a later one (``retain_graph``)
    recomputes them from the saved inputs, with the dropout of the forward pass; a
    differentiable one (``create_graph``) recomputes the runs with an explicit softmax."""

    @staticmethod
    def forward(
        ctx: Any, q_rows: Tensor, k_rows: Tensor, v_rows: Tensor, plan: _Plan,
        sizes: tuple[int, int], scale: float | None, dropout_p: float,
    ) -> Tensor:  # fmt: skip
        device = q_rows.device
        ctx.rng = _rng_state(device) if dropout_p else None
        graphs: list[tuple[Tensor, ...]] = []
        result = _attend_runs(q_rows, k_rows, v_rows, plan, sizes, scale, dropout_p, graphs)
        ctx.save_for_backward(q_rows, k_rows, v_rows)
        ctx.graphs, ctx.plan, ctx.sizes = graphs, plan, sizes
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q_rows, k_rows, v_rows = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
            return (*_differentiable_backward(ctx, q_rows, k_rows, v_rows, grad), None, None,
                    None, None)  # fmt: skip
        graphs, ctx.graphs = ctx.graphs, None
        if graphs is None:  # a second backward (retain_graph): recompute the runs
            graphs = []
            q, k, v = (t.detach() for t in (q_rows, k_rows, v_rows))
            with torch.random.fork_rng(devices=_rng_devices(q_rows.device)):
                if ctx.rng is not None:
                    _set_rng_state(q_rows.device, ctx.rng)
                _attend_runs(q, k, v, ctx.plan, ctx.sizes, ctx.scale, ctx.dropout_p, graphs)
        return _accumulate(ctx.plan, ctx.sizes, graphs, grad, q_rows.shape, k_rows.shape)


def _differentiable_backward(
    ctx: Any, q_rows: Tensor, k_rows: Tensor, v_rows: Tensor, grad: Tensor
) -> tuple[Tensor | None, ...]:
    """The gradients as a function of the inputs' own history (double backward)."""
    if ctx.dropout_p:
        raise ValueError(
            "sparse_attention: a differentiable backward (create_graph=True, e.g. a gradient "
            "penalty) cannot replay the forward pass's dropout; use dropout_p=0 for that step."
        )
    ctx.graphs = None
    inputs = (q_rows, k_rows, v_rows)
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:3], strict=True) if need]
    out = _attend_runs(*inputs, ctx.plan, ctx.sizes, ctx.scale, 0.0, explicit=True)
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])


def _rng_devices(device: torch.device) -> list[torch.device]:
    return [] if device.type == "cpu" else [device]


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def _accumulate(
    plan: _Plan,
    sizes: tuple[int, int],
    graphs: list[tuple[Tensor, ...]],
    grad: Tensor,
    q_shape: torch.Size,
    k_shape: torch.Size,
) -> tuple[Tensor | None, ...]:
    """Each run's gradients, added into one buffer per input."""
    qbs, kvbs = sizes
    gq = grad.new_zeros(q_shape)
    gk, gv = grad.new_zeros(k_shape), grad.new_zeros(k_shape)
    q_blocks = gq.view(q_shape[0], q_shape[1], -1, qbs, q_shape[3])
    grad_rows = grad if plan.order is None else grad.index_select(0, plan.order)
    start = 0
    for run, (out, qg, kg, vg) in zip(plan.runs, graphs, strict=True):
        n = len(run.qb)
        g = grad_rows[start : start + n]  # [n, hs, qbs, D]
        start += n
        if run.merged:
            g = g.transpose(0, 1).reshape(1, g.shape[1], n * qbs, g.shape[3])
        dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), g)
        if run.merged:
            dq = dq.view(-1, n, qbs, dq.shape[-1]).transpose(0, 1)
        q_blocks[run.row][:, run.qb] = dq.reshape(n, -1, qbs, dq.shape[-1]).transpose(0, 1)
        blocks = (run.blocks[:1] if run.merged else run.blocks).flatten()
        for buffer, d in ((gk, dk), (gv, dv)):
            hs, dim = d.shape[1], d.shape[-1]
            # [m, hs, c*kvbs, D] -> [hs, m*c, kvbs, D]: one slice per key block, added in
            # place (a block read by several rows gets all their gradients).
            per_block = d.view(d.shape[0], hs, -1, kvbs, dim).transpose(0, 1)
            buffer[run.row].view(hs, -1, kvbs, dim).index_add_(
                1, blocks, per_block.reshape(hs, -1, kvbs, dim)
            )
    return gq, gk, gv, None, None, None, None


@dataclass
class _Run:
    """Query blocks ``qb [n]`` of mask row ``row`` attending to key blocks ``blocks [n, c]``."""

    row: int
    qb: Tensor
    q_view: tuple[int, int] | None  # see _view
    blocks: Tensor
    kv_view: tuple[int, int] | None
    allowed: Tensor | None  # [n, 1, qbs, c*kvbs] with blind queries opened; None: all full
    blind: Tensor | None  # [n, 1, qbs, 1] queries that see no key, None when there are none
    merged: bool  # rows computed as one query sequence; allowed, blind: [1, 1, n*qbs, ...]
    additive: dict[torch.dtype, Tensor] = field(default_factory=dict)

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
class _Plan:
    shape: tuple[int, int, int, int]  # the BlockMask's [Bm, Hm, QB, KVB]
    runs: list[_Run]
    order: Tensor | None  # the rows the runs' outputs fill; None: all rows in order
    density: float  # the fraction of the BlockMask's blocks that are visited
    gathered: float  # the fraction of visited blocks that are copied, not viewed

    @property
    def cost(self) -> float:
        """The sparse path's cost relative to dense SDPA over every block, as
        ``MultiheadFlexAttention(backend="auto")`` estimates it: gathered blocks count twice
        (measured: copies, and non-consecutive blocks come with partial blocks on both sides)."""
        return self.density * (1.0 + self.gathered)


_PLANS = _LRU(16)


def _plan(bm: BlockMask) -> _Plan:
    """The runs a BlockMask is computed in, with their element masks; cached per BlockMask (while
    its mask's key stands), so every layer and training step that reuses a BlockMask evaluates
    its mask_mod once. Built outside inference mode: a plan made during evaluation serves
    training later."""
    key = block_mask_key(bm)
    hit = None if key is None else _PLANS.get_recent(key)
    if isinstance(hit, tuple) and hit[0] is bm:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        plan = _make_plan(bm)
    if key is not None:
        _PLANS.put(key, (bm, plan))
    return plan


def _make_plan(bm: BlockMask) -> _Plan:
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
        for qb, blocks in _runs(visited[r], counts[r], first[r], contiguous[r]):
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
            runs.append(_Run(r, qb, q_view, blocks, kv_view, allowed, blind, merged))
            done.append(r * nqb + qb)
    order: Tensor | None = torch.cat(done) if done else kinds.new_zeros(0, dtype=torch.long)
    everything = torch.arange(mb * mh * nqb, device=kinds.device)
    if order is not None and order.shape == everything.shape and bool((order == everything).all()):
        order = None
    sizes = [run.blocks.numel() for run in runs]
    total = max(1, sum(sizes))
    gathered = sum(n for n, run in zip(sizes, runs, strict=True) if run.kv_view is None) / total
    density = float(visited.float().mean()) if visited.numel() else 0.0
    return _Plan((mb, mh, nqb, nkvb), runs, order, density, gathered)


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


def _take(x: Tensor, blocks: Tensor, view: tuple[int, int] | None, bs: int) -> Tensor:
    """Blocks of ``x [hs, L, D]`` side by side per row: ``blocks [n]`` or ``[n, c]`` ->
    ``[n, hs, c*bs, D]``; a strided view (no copy) when ``view`` is known, else a gather."""
    blocks = blocks.reshape(blocks.shape[0], -1)
    n, c = blocks.shape
    hs, _, dim = x.shape
    if view is None:
        g = x.view(hs, -1, bs, dim).index_select(1, blocks.flatten())
        return g.view(hs, n, c * bs, dim).transpose(0, 1)
    start, step = view
    first = x.narrow(1, start * bs, ((n - 1) * step + c) * bs)
    if step == 0:  # every row reads the same keys (the query blocks of one document)
        return first.unsqueeze(0).expand(n, hs, c * bs, dim)
    return first.unfold(1, c * bs, step * bs).permute(1, 0, 3, 2)


def _mask_rows(x: Tensor, mb: int, mh: int, padded: int) -> Tensor:
    """``[B, H, S, D]`` -> ``[mb*mh, (B/mb)*(H/mh), padded, D]`` (a view when the layout allows)."""
    bsz, nh, s, dim = x.shape
    if padded != s:
        x = F.pad(x, (0, 0, 0, padded - s))
    x = x.view(mb, bsz // mb, mh, nh // mh, padded, dim).transpose(1, 2)
    return x.reshape(mb * mh, (bsz // mb) * (nh // mh), padded, dim)


def _unblock(rows: Tensor, bsz: int, nh: int, mb: int, mh: int, nqb: int, qbs: int) -> Tensor:
    """``[mb*mh*QB, hs, qbs, D]`` query blocks back to ``[B, H, QB*qbs, D]``."""
    dim = rows.shape[-1]
    x = rows.view(mb, mh, nqb, bsz // mb, nh // mh, qbs, dim)
    return x.permute(0, 3, 1, 4, 2, 5, 6).reshape(bsz, nh, nqb * qbs, dim)


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


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            error = ValueError if isinstance(t, Tensor) else TypeError
            raise error(
                f"sparse_attention({name}=...) must be a 4-D tensor [B, H, S, D], got {got}."
            )
    if k.shape != v.shape:
        raise ValueError(f"sparse_attention: k and v must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}.")  # fmt: skip
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"sparse_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch "
            "(dim 0) and head size (dim 3)."
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"sparse_attention: query heads ({q.shape[1]}) must be a multiple of key/value heads "
            f"({k.shape[1]}) for grouped-query attention."
        )
    if q.dtype != k.dtype or q.dtype != v.dtype or not q.dtype.is_floating_point:
        raise TypeError(f"sparse_attention: q, k, v must share one floating dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}.")  # fmt: skip
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"sparse_attention: q, k, v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}.")  # fmt: skip
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"sparse_attention(dropout_p=...) must be in [0, 1), got {dropout_p!r}.")


def _check_block_mask(bm: BlockMask, bsz: int, nh: int, s_q: int, s_kv: int) -> None:
    mb, mh = bm.kv_num_blocks.shape[:2]
    if bm.seq_lengths != (s_q, s_kv) or mb not in (1, bsz) or mh not in (1, nh):
        raise ValueError(
            f"sparse_attention(mask=BlockMask) has shape {tuple(bm.shape)} but the inputs need "
            f"(B in {{1, {bsz}}}, H in {{1, {nh}}}, {s_q}, {s_kv}); build it with "
            f"flexmask.block_mask(mask, q_len={s_q}, kv_len={s_kv}) or pass the mask itself."
        )
