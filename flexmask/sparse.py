"""``sparse_attention``: block-sparse attention from a BlockMask with dense kernels, on CPU too.

Every query block attends to the key blocks its BlockMask row visits. Query blocks are grouped
into *runs* that one ``scaled_dot_product_attention`` call computes: rows visiting the same
number ``c`` of consecutive key blocks, with query and key starts advancing by constant steps,
are strided views of q, k, v (no copy: a sliding window is one run per count); query blocks that
read the same keys (a bidirectional document) are merged into one long query sequence, and so
are the blocks of a causal document, computed by SDPA's ``is_causal`` with no element mask; other
rows are gathered. An element mask exists only for runs holding partial blocks; it is evaluated
once per BlockMask and cached with the runs (the *plan*). The backward pass keeps each run's
SDPA graph and adds its gradients into one buffer per input. Memory is proportional to the
visited blocks, never to ``q_len x kv_len``.

An additive score_mod (``alibi``, ``relative_bias``, their ``compose``) is added to each run's
scores as a float bias, evaluated on the run's positions only; the gradient of the tensors it
reads (a relative-bias table) is gathered from every run's bias gradient.

A second backward through the same graph (``retain_graph=True``, ``gradcheck``) recomputes the
runs from the saved inputs (with the same dropout); a differentiable backward
(``create_graph=True``: gradient penalties) recomputes them with an explicit softmax, which
autograd can differentiate again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import check_block_mask_shape
from .block import block_mask_for
from .coverage import coverage
from .masks import MaskModFn, as_mask
from .score_mods import is_additive
from .sparse_plan import Plan, Run, plan

__all__ = ["sparse_attention"]


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskModFn | BlockMask | None = None,
    *,
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
    dropout_p: float = 0.0,
    score_mod: Any = None,
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
        score_mod: an additive score_mod (``alibi``, ``relative_bias``, or their ``compose``),
            added to the scores of the visited blocks; gradients reach the tensors it reads.

    Raises:
        ValueError: for a score_mod that is not additive (``softcap``, a plain function): the
            runs are SDPA calls, which take a bias but no function of the score.

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
    _check_inputs(q, k, v, dropout_p, score_mod)
    bsz, nh, s_q, _ = q.shape
    nkv, s_kv = k.shape[1], k.shape[2]
    if not isinstance(mask, BlockMask):
        m = None if mask is None else as_mask(mask, name="sparse_attention(mask=...)")
        mask = block_mask_for(m, q, s_kv, block_size=block_size)
    check_block_mask_shape(mask, "sparse_attention(mask=BlockMask)", bsz, nh, s_q, s_kv)

    the_plan = plan(mask)
    mb, mh, nqb, nkvb = the_plan.shape
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
    if not the_plan.runs:  # nothing visible: zeros, still in the graph so that gradients are zeros
        inputs = q.sum() + k.sum() + v.sum()
        never = torch.zeros((), dtype=torch.bool, device=q.device)
        return q.new_zeros(q.shape) + torch.where(never, inputs, 0.0)
    bias = None if score_mod is None else _Bias(score_mod, bsz, nh, mb, mh)
    args = (the_plan, (qbs, kvbs), scale, dropout_p, bias)
    tensors = () if bias is None else score_mod.tensors()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_rows, k_rows, v_rows, *tensors)):
        result = _SparseRuns.apply(q_rows, k_rows, v_rows, *args, *tensors)
    else:
        result = _attend_runs(q_rows, k_rows, v_rows, *args)
    return _unblock(result, bsz, nh, mb, mh, nqb, qbs)[:, :, :s_q]


_Graph = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]
"""One run's autograd graph: its output, the leaves q, k, v it was computed from, and the bias
with the leaf SDPA added (its gradient once ``_accumulate`` ran), or None twice."""


@dataclass(frozen=True)
class _Bias:
    """An additive score_mod, evaluated on the positions of one run at a time."""

    mod: Any
    batch: int
    heads: int
    mask_batch: int
    mask_heads: int

    def of(self, run: Run, sizes: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """``mod(0, b, h, q_idx, kv_idx)`` over the run's scores, broadcastable to
        ``[n, hs, q, c*kvbs]`` (hs: the batch rows and heads riding along as in ``_mask_rows``)."""
        qbs, kvbs = sizes
        dev = run.qb.device
        if run.merged:  # a row per sequence
            q_blocks, blocks = run.seq_blocks()
            q_idx = (q_blocks[:, :, None] * qbs + torch.arange(qbs, device=dev)).flatten(1)
        else:
            q_idx = run.qb[:, None] * qbs + torch.arange(qbs, device=dev)
            blocks = run.blocks.reshape(len(run.qb), -1)
        kv_idx = blocks[:, :, None] * kvbs + torch.arange(kvbs, device=dev)
        per_b, per_h = self.batch // self.mask_batch, self.heads // self.mask_heads
        hs = torch.arange(per_b * per_h, device=dev)
        b = (run.row // self.mask_heads) * per_b + hs // per_h
        h = (run.row % self.mask_heads) * per_h + hs % per_h
        zero = torch.zeros((), device=dev)  # float32 positions: bf16 would round the distances
        bias = self.mod(zero, b.view(1, -1, 1, 1), h.view(1, -1, 1, 1),
                        q_idx.view(q_idx.shape[0], 1, -1, 1),
                        kv_idx.view(blocks.shape[0], 1, 1, -1))  # fmt: skip
        return bias.to(dtype)


def _attend_runs(
    q_rows: Tensor,
    k_rows: Tensor,
    v_rows: Tensor,
    plan: Plan,
    sizes: tuple[int, int],
    scale: float | None,
    dropout_p: float,
    bias: _Bias | None = None,
    graphs: list[_Graph] | None = None,
    explicit: bool = False,
) -> Tensor:
    """Every run of the plan, one SDPA call each: ``[Bm*Hm*QB, hs, qbs, D]`` query blocks.

    With ``graphs``, each run's inputs are made leaves and its autograd graph is kept there as
    ``(out, qg, kg, vg, bias, bias leaf)`` for ``_SparseRuns.backward`` (the bias pair None
    without a bias that needs a gradient). ``explicit`` computes each run with an explicit
    softmax instead of SDPA (differentiable twice; no dropout)."""
    qbs, kvbs = sizes
    gqa = q_rows.shape[1] != k_rows.shape[1]
    attend = _explicit_attention if explicit else F.scaled_dot_product_attention
    outs = []
    for run in plan.runs:
        if run.merged:  # consecutive query blocks, the same keys: long query sequences
            q_blocks, blocks = run.seq_blocks()
            qg = _take(q_rows[run.row], q_blocks, run.q_view, qbs)
        else:
            qg, blocks = _take(q_rows[run.row], run.qb, run.q_view, qbs), run.blocks
        kg = _take(k_rows[run.row], blocks, run.kv_view, kvbs)
        vg = _take(v_rows[run.row], blocks, run.kv_view, kvbs)
        attn_mask, causal = run.attn_mask(q_rows.dtype), run.causal
        with torch.enable_grad() if graphs is not None else contextlib.nullcontext():
            b = b_used = None if bias is None else bias.of(run, sizes, q_rows.dtype)
            if graphs is not None:
                qg, kg, vg = (t.detach().requires_grad_() for t in (qg, kg, vg))
                if b is not None and b.requires_grad:  # the bias's gradient, then the table's
                    b_used = b.detach().requires_grad_()
            if b_used is not None:
                if causal:  # SDPA takes a mask or is_causal, not both
                    attn_mask = _causal_additive(qg.shape[-2], q_rows.dtype, qg.device)
                    causal = False
                attn_mask = b_used if attn_mask is None else b_used + attn_mask
            out = attend(qg, kg, vg, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal,
                         scale=scale, enable_gqa=gqa)  # fmt: skip
            if run.blind is not None:  # queries that see no key: zeros, and zero gradients
                out = out.masked_fill(run.blind, 0.0)
        if graphs is not None:
            pair = (b, b_used) if b_used is not b else (None, None)
            graphs.append((out, qg, kg, vg, *pair))
            out = out.detach()
        if run.merged:
            out = _from_sequences(out, run.seqs, qbs)
        outs.append(out)
    if plan.order is None:  # the runs cover every query block in order
        return torch.cat(outs)
    rows, hs, _, dim = q_rows.shape  # rows that visit no block stay zero
    result = q_rows.new_zeros(rows * (q_rows.shape[2] // qbs), hs, qbs, dim)
    return result.index_copy(0, plan.order, torch.cat(outs))


def _causal_additive(length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``is_causal`` as an additive mask ``[length, length]``: -inf above the diagonal."""
    above = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(above, float("-inf"))


def _explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> Tensor:
    """SDPA's arithmetic written out with ops autograd can differentiate again."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        scores = scores + _causal_additive(q.shape[-2], scores.dtype, scores.device)
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
        ctx: Any, q_rows: Tensor, k_rows: Tensor, v_rows: Tensor, plan: Plan,
        sizes: tuple[int, int], scale: float | None, dropout_p: float, bias: _Bias | None,
        *tensors: Tensor,
    ) -> Tensor:  # fmt: skip
        # ``tensors`` (what the bias reads) are inputs so that autograd asks for their gradients;
        # the bias reads them through its score_mod.
        device = q_rows.device
        ctx.rng = _rng_state(device) if dropout_p else None
        graphs: list[_Graph] = []
        args = (plan, sizes, scale, dropout_p, bias)
        result = _attend_runs(q_rows, k_rows, v_rows, *args, graphs=graphs)
        ctx.save_for_backward(q_rows, k_rows, v_rows)
        ctx.graphs, ctx.args = graphs, args
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q_rows, k_rows, v_rows = ctx.saved_tensors
        plan, sizes, scale, dropout_p, bias = ctx.args
        tensors = () if bias is None else bias.mod.tensors()
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
            grads = _differentiable_backward(ctx, (q_rows, k_rows, v_rows, *tensors), grad)
        else:
            graphs, ctx.graphs = ctx.graphs, None
            if graphs is None:  # a second backward (retain_graph): recompute the runs
                graphs = []
                q, k, v = (t.detach() for t in (q_rows, k_rows, v_rows))
                with torch.random.fork_rng(devices=_rng_devices(q_rows.device)):
                    if ctx.rng is not None:
                        _set_rng_state(q_rows.device, ctx.rng)
                    _attend_runs(q, k, v, plan, sizes, scale, dropout_p, bias, graphs)
            grads = _accumulate(plan, sizes, graphs, grad, q_rows.shape, k_rows.shape)
            grads += _bias_grads(graphs, tensors, ctx.needs_input_grad[8:])
        return (*grads[:3], None, None, None, None, None, *grads[3:])


def _differentiable_backward(
    ctx: Any, inputs: tuple[Tensor, ...], grad: Tensor
) -> tuple[Tensor | None, ...]:
    """The gradients as a function of the inputs' own history (double backward): of q, k, v,
    then of the bias's tensors."""
    if ctx.args[3]:
        raise ValueError(
            "sparse_attention: a differentiable backward (create_graph=True, e.g. a gradient "
            "penalty) cannot replay the forward pass's dropout; use dropout_p=0 for that step."
        )
    ctx.graphs = None
    needs = ctx.needs_input_grad[:3] + ctx.needs_input_grad[8:]
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    plan, sizes, scale, _, bias = ctx.args
    q, k, v = inputs[:3]
    out = _attend_runs(q, k, v, plan, sizes, scale, 0.0, bias, explicit=True)
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def _bias_grads(
    graphs: list[_Graph], tensors: tuple[Tensor, ...], needs: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """The gradients of the tensors the bias reads, from every run's bias gradient (which
    ``_accumulate`` left in the graphs' last slot)."""
    wanted = [t for t, need in zip(tensors, needs, strict=True) if need]
    pairs = [(g[4], g[5]) for g in graphs if g[4] is not None]
    if not wanted or not pairs:
        return tuple(None for _ in tensors)
    biases, bias_grads = zip(*pairs, strict=True)
    grads = iter(torch.autograd.grad(biases, wanted, bias_grads, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


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
    plan: Plan,
    sizes: tuple[int, int],
    graphs: list[_Graph],
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
    for i, (run, (out, qg, kg, vg, _, b_used)) in enumerate(zip(plan.runs, graphs, strict=True)):
        n = len(run.qb)
        g = grad_rows[start : start + n]  # [n, hs, qbs, D]
        start += n
        if run.merged:  # [n, hs, qbs, D] -> [m, hs, L*qbs, D]
            m, hs, dim = run.seqs, g.shape[1], g.shape[3]
            g = g.view(m, n // m, hs, qbs, dim).transpose(1, 2).reshape(m, hs, -1, dim)
        if b_used is None:
            dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), g)
        else:  # the bias's gradient, for _bias_grads
            dq, dk, dv, db = torch.autograd.grad(out, (qg, kg, vg, b_used), g)
            graphs[i] = (out, qg, kg, vg, graphs[i][4], db)
        if run.merged:
            dq = _from_sequences(dq, run.seqs, qbs)
        q_blocks[run.row][:, run.qb] = dq.reshape(n, -1, qbs, dq.shape[-1]).transpose(0, 1)
        blocks = (run.seq_blocks()[1] if run.merged else run.blocks).flatten()
        for buffer, d in ((gk, dk), (gv, dv)):
            hs, dim = d.shape[1], d.shape[-1]
            # [m, hs, c*kvbs, D] -> [hs, m*c, kvbs, D]: one slice per key block, added in
            # place (a block read by several rows gets all their gradients).
            per_block = d.view(d.shape[0], hs, -1, kvbs, dim).transpose(0, 1)
            buffer[run.row].view(hs, -1, kvbs, dim).index_add_(
                1, blocks, per_block.reshape(hs, -1, kvbs, dim)
            )
    return gq, gk, gv


def _from_sequences(x: Tensor, seqs: int, qbs: int) -> Tensor:
    """A merged run's ``[m, hs, L*qbs, D]`` as query blocks ``[m*L, hs, qbs, D]`` (a view for
    one sequence)."""
    m, hs, _, dim = x.shape
    return x.view(m, hs, -1, qbs, dim).transpose(1, 2).flatten(0, 1)


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


def check_qkv(q: Tensor, k: Tensor, v: Tensor, who: str) -> None:
    """q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv, D]`` of one floating dtype and device, for
    ``who`` (the function, named in the messages)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            error = ValueError if isinstance(t, Tensor) else TypeError
            raise error(f"{who}({name}=...) must be a 4-D tensor [B, H, S, D], got {got}.")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k and v must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}.")  # fmt: skip
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch "
            "(dim 0) and head size (dim 3)."
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{who}: query heads ({q.shape[1]}) must be a multiple of key/value heads "
            f"({k.shape[1]}) for grouped-query attention."
        )
    if q.dtype != k.dtype or q.dtype != v.dtype or not q.dtype.is_floating_point:
        raise TypeError(f"{who}: q, k, v must share one floating dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}.")  # fmt: skip
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{who}: q, k, v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}.")  # fmt: skip


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, score_mod: object) -> None:
    check_qkv(q, k, v, "sparse_attention")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"sparse_attention(dropout_p=...) must be in [0, 1), got {dropout_p!r}.")
    if score_mod is not None and not is_additive(score_mod):
        raise ValueError(
            f"sparse_attention(score_mod=...) takes the additive score_mods (alibi, "
            f"relative_bias, or their compose), got {score_mod!r}: its runs are SDPA calls, "
            "which take a bias but no function of the score. Use flexmask's flex or sdpa "
            "backend (an explicit softmax) for it."
        )
