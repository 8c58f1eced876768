"""``MultiheadFlexAttention``: batch-first multi-head attention under any flexmask mask."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ._checks import check_block_size, check_int
from .block import (
    RECOMPILE_LIMIT,
    Coverage,
    DenseMask,
    block_mask_for,
    cached_dense,
    coverage,
)
from .block import block_mask as build_block_mask
from .cache import KVCache, _CacheStep
from .convert import block_mask_to_dense, to_dense
from .masks import MaskMod, MaskModFn, as_mask, causal, full
from .sparse import _plan as sparse_plan
from .sparse import sparse_attention

__all__ = ["MultiheadFlexAttention", "ScoreModFn"]

ScoreModFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(score, b, h, q_idx, kv_idx) -> score``: torch's score_mod signature."""

BACKENDS = ("auto", "flex", "sdpa", "sparse")
SPARSE_MAX_DENSITY = 0.85
"""``backend="auto"`` on CPU runs the sparse path when the BlockMask's visited fraction of blocks
(gathered blocks counted twice, ``flexmask.sparse._Plan.cost``) is at most this, SDPA with the
dense mask above it. Chosen from ``benchmarks/dispatch.py`` (BENCHMARKS.md); override per module
with ``MultiheadFlexAttention(sparse_max_density=...)``."""
_FLEX_DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    # Built on first use, never at import (compiling flex costs seconds). Static shapes: a KV
    # cache keeps them fixed, and torch 2.13's dynamic-shape CPU flex kernel fails to compile
    # (undeclared `cur_kvSplitSize2`) once a second shape is seen.
    return torch.compile(flex_attention, dynamic=False)


class MultiheadFlexAttention(nn.Module):
    """Multi-head attention (batch first) whose mask is a flexmask expression or a BlockMask.

    Projections are ``q_proj: E -> H*D``, ``k_proj, v_proj: E -> H_kv*D`` and ``out_proj: E -> E``
    with ``D = embed_dim // num_heads``; grouped-query attention when ``num_kv_heads <
    num_heads``.

    Backends:
        ``"flex"``: compiled ``flex_attention`` (compiled once per process) on the BlockMask;
        inference only on CPU.
        ``"sparse"``: ``sparse_attention``, SDPA over the BlockMask's visited blocks only;
        trains on CPU (no ``score_mod``).
        ``"sdpa"``: ``scaled_dot_product_attention`` with the dense boolean mask (an explicit
        softmax when a ``score_mod`` is given).
        ``"auto"``: per call, from the mask and the device: no mask or ``full()`` -> SDPA
        without a mask; ``causal()`` on a square problem -> SDPA ``is_causal``; other masks on
        CPU -> sparse when the fraction of blocks visited (those that must be gathered counted
        twice) is at most ``sparse_max_density``, else SDPA dense; on CUDA -> flex. With a
        ``score_mod``: flex where it runs, else SDPA. ``backend_for`` says which, for an input.

    Fully masked query rows (padding, or a ``score_mod`` sending a whole row to ``-inf``) give
    zeros and zero gradients on every backend, never NaN, also when the inputs hold NaN at the
    positions the mask hides from every query.

    Inside ``torch.compile``: the projections are compiled with the model; the attention step
    between them (mask, backend, kernel, cache) runs outside the graph through
    ``torch.compiler.disable``, one graph break per call, so that a new mask at the same shapes
    (new lengths, document ids, tree parents) never recompiles the model. FlexAttention itself
    is compiled once per process.

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``H``; must divide ``embed_dim``.
        num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
        bias: add biases to the projections.
        dropout: attention-probability dropout while training.
        score_mod: optional ``(score, b, h, q_idx, kv_idx) -> score`` (ALiBi, soft-capping, ...).
        block_size: BlockMask tile size for masks the module builds itself.
        backend: ``"auto"``, ``"flex"``, ``"sparse"`` or ``"sdpa"``.
        sparse_max_density: ``"auto"``'s threshold on CPU between the sparse path and dense
            SDPA (default ``SPARSE_MAX_DENSITY``, chosen by ``make bench``).

    Example:
        >>> import torch, flexmask as fm
        >>> attn = fm.MultiheadFlexAttention(32, 4, backend="sdpa")
        >>> x = torch.randn(2, 10, 32)
        >>> attn(x, mask=fm.causal() & fm.padding([10, 6])).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        score_mod: ScoreModFn | None = None,
        block_size: int = 128,
        backend: str = "auto",
        sparse_max_density: float = SPARSE_MAX_DENSITY,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads)):  # fmt: skip
            check_int(value, f"MultiheadFlexAttention({name}=...)", expected="a positive int")
        if embed_dim % num_heads:
            raise ValueError(
                f"MultiheadFlexAttention(embed_dim={embed_dim}, num_heads={num_heads}): embed_dim "
                f"must be divisible by num_heads to split it into heads; pick num_heads among "
                f"{[h for h in range(1, min(embed_dim, 64) + 1) if embed_dim % h == 0]}."
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"MultiheadFlexAttention(num_heads={num_heads}, num_kv_heads={num_kv_heads}): "
                "num_heads must be divisible by num_kv_heads (each key/value head serves a "
                "group of query heads)."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"MultiheadFlexAttention(dropout=...) must be a number in [0, 1), "
                            f"got {dropout!r}.")  # fmt: skip
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadFlexAttention(dropout=...) must be in [0, 1), got "
                             f"{dropout!r}.")  # fmt: skip
        if backend not in BACKENDS:
            raise ValueError(
                f"MultiheadFlexAttention(backend=...) must be one of {BACKENDS}, got {backend!r}."
            )
        if score_mod is not None and not callable(score_mod):
            raise TypeError(
                f"MultiheadFlexAttention(score_mod=...) must be a callable (score, b, h, q_idx, "
                f"kv_idx) -> score, got {type(score_mod).__name__}."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.score_mod = score_mod
        self.block_size = check_block_size(block_size)
        density = sparse_max_density
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(
                "MultiheadFlexAttention(sparse_max_density=...) must be a number in [0, 1], got "
                f"{sparse_max_density!r}."
            )
        if not 0 <= density <= 1:
            raise ValueError(
                "MultiheadFlexAttention(sparse_max_density=...) must be a block density in "
                f"[0, 1] (0: never the sparse path, 1: always), got {sparse_max_density!r}."
            )
        self.backend = backend
        self.sparse_max_density = float(sparse_max_density)
        self._last_choice: tuple[object, tuple[object, ...], str] | None = None
        kw: dict[str, Any] = {"device": device, "dtype": dtype, "bias": bias}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, "
                f"backend={self.backend!r}")  # fmt: skip

    # ----------------------------------------------------------------------------------------
    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries from ``x``, keys and values from ``context`` (default ``x``).

        Shapes:
            x: ``[B, S, E]``, context: ``[B, S_kv, E]`` ->
            q: ``[B, H, S, D]``, k and v: ``[B, H_kv, S_kv, D]``.
        """
        self._check_input(x, context)
        src = x if context is None else context
        bsz, s_q, _ = x.shape
        s_kv = src.shape[1]
        q = self.q_proj(x).view(bsz, s_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(src).view(bsz, s_kv, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(src).view(bsz, s_kv, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: MaskModFn | BlockMask | None = None,
        cache: KVCache | None = None,
        lengths: Tensor | None = None,
        padding_side: str = "right",
    ) -> Tensor:
        """Attend ``x`` to itself, or to ``context`` (cross-attention), under ``mask``.

        Shapes:
            x: ``[B, S, E]``; context: ``[B, S_kv, E]``; returns ``[B, S, E]``.

        Args:
            x: queries (and keys/values for self-attention).
            context: keys/values for cross-attention.
            mask: a flexmask mask or mask_mod callable (the module builds its BlockMask or
                dense mask for this shape and device, cached while the mask cannot have
                changed; a plain callable is evaluated afresh on every call), a ready
                ``BlockMask`` (its shape is checked against the input), or None for no mask
                (every key visible).
            cache: a ``KVCache``: this call's keys and values are appended to it and the queries
                attend to everything cached. Query ``i`` of row ``b`` is position
                ``cache.lengths[b] + i`` and ``mask`` is evaluated in those absolute positions
                (prefill and decode, one token or a tree of candidates, are the same call). A
                call that raises leaves the cache exactly as it was.
            lengths: with a cache, the real tokens of each row in this call (``[B]``, default
                ``S``): prompts of different lengths; each row's cache advances by its own
                count (pads never enter it) and padded queries get zeros.
            padding_side: where this call's pads are with ``lengths``: ``"right"`` (after the
                tokens) or ``"left"`` (before them, as tokenizers pad for generation).

        Raises:
            TypeError, ValueError: for bad input (shapes, dtypes, devices, a mask for another
                batch, a cache that does not fit), before the cache is touched.
        """
        q, k, v = self.project(x, context)
        out = self._attend(q, k, v, mask, cache, lengths, padding_side, context is not None)
        bsz, s_q, _ = x.shape
        return self.out_proj(out.transpose(1, 2).reshape(bsz, s_q, self.embed_dim))

    @torch.compiler.disable
    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: MaskModFn | BlockMask | None,
        cache: KVCache | None,
        lengths: Tensor | None,
        padding_side: str,
        cross: bool,
    ) -> Tensor:
        """Everything between the projections (q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv,
        D]`` -> ``[B, H, S, D]``). Outside compiled graphs: dynamo would guard on the mask
        object and recompile for every new one."""
        if padding_side not in ("right", "left"):
            raise ValueError(
                f"forward(padding_side=...) must be 'right' or 'left', got {padding_side!r}."
            )
        if mask is not None and not isinstance(mask, BlockMask):
            mask = as_mask(mask, name="forward(mask=...)")
        if cache is not None:
            return self._attend_cached(q, k, v, mask, cache, lengths, padding_side, cross)
        if lengths is not None:
            raise ValueError("forward(lengths=...) counts tokens written to a cache; pass cache=.")
        bsz, _, s_q, _ = q.shape
        if isinstance(mask, BlockMask):
            self._check_block_mask(mask, bsz, s_q, k.shape[2])
        backend, form = self._prepare(q, mask, k.shape[2])
        return self._run(backend, form, q, k, v)

    def _attend_cached(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: MaskMod | BlockMask | None,
        cache: KVCache,
        lengths: Tensor | None,
        padding_side: str,
        cross: bool,
    ) -> Tensor:
        # Everything that can fail runs before the cache is written; the kernel runs inside
        # cache.appended, which restores the cache if it raises.
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"forward(cache=...) must be a flexmask.KVCache, got {type(cache).__name__}."
            )
        if cross:
            raise ValueError("forward(cache=...) caches self-attention keys; it takes no context.")
        bsz, _, s_q, _ = q.shape
        cache.check_compatible(bsz, self.num_kv_heads, self.head_dim, q)
        counts = self._check_lengths(lengths, bsz, s_q, q.device)
        cache.check_room(s_q)
        if isinstance(mask, BlockMask):
            self._check_block_mask(mask, bsz, s_q, cache.max_len)
        rotate = padding_side == "left" and lengths is not None
        if rotate:  # each row's real tokens to the front: run right-padded, rotate back
            shift = (s_q - counts)[:, None]
            ar = torch.arange(s_q, device=q.device)
            q, k, v = (_rotate(t, (ar + shift) % s_q) for t in (q, k, v))
        step: MaskMod | BlockMask = (
            mask
            if isinstance(mask, BlockMask)
            else _CacheStep(mask or full(), cache.lengths.clone(), counts)
        )
        backend, form = self._prepare(q, step, cache.max_len, cached=True)
        with cache.appended(k, v, counts):
            out = self._run(backend, form, q, cache.k, cache.v)
        return _rotate(out, (ar - shift) % s_q) if rotate else out

    def backend_for(
        self, x: Tensor, context: Tensor | None = None, *, mask: MaskModFn | BlockMask | None = None
    ) -> str:
        """The backend ``forward(x, context, mask=mask)`` runs now (without a cache):
        ``"flex"``, ``"sparse"``, ``"sdpa"`` (dense mask, or none) or ``"sdpa_causal"``
        (SDPA's ``is_causal`` kernel). Depends on autograd being on, ``train()``/``eval()``."""
        self._check_input(x, context)
        s_kv = x.shape[1] if context is None else context.shape[1]
        if mask is not None and not isinstance(mask, BlockMask):
            mask = as_mask(mask, name="backend_for(mask=...)")
        q = torch.empty(x.shape[0], self.num_heads, x.shape[1], 0, device=x.device,
                        dtype=self.q_proj.weight.dtype, requires_grad=x.requires_grad)  # fmt: skip
        return self._choose_backend(q, mask, s_kv)

    def _prepare(
        self, q: Tensor, mask: MaskMod | BlockMask | None, s_kv: int, cached: bool = False
    ) -> tuple[str, Any]:
        """The backend for this call and the mask in the form it takes (a BlockMask, a
        ``DenseMask`` or None). Evaluating the mask happens here, so its errors come before any
        state changes."""
        if cached and self.backend == "auto" and q.device.type == "cpu":
            # The dense step mask is only S x max_len; on CPU, benchmarks/decode.py measured SDPA
            # faster than flex in 11 of 12 decode cases (up to 2.2x), 6% slower in the last.
            backend = "sdpa"
        else:
            backend = self._choose_backend(q, mask, s_kv)
        bsz, nh, s_q, _ = q.shape
        if backend in ("flex", "sparse"):
            if isinstance(mask, BlockMask):
                return backend, mask
            if cached:  # a new step mask every call: built, not cached
                bm = build_block_mask(mask or full(), s_q, s_kv, batch=bsz,
                                      block_size=self.block_size, device=q.device,
                                      cache=False)  # fmt: skip
                return backend, bm
            return backend, block_mask_for(mask, q, s_kv, block_size=self.block_size)
        if (
            backend == "sdpa_causal"
            or mask is None
            or (isinstance(mask, MaskMod) and mask == full())
        ):
            return backend, None
        if isinstance(mask, BlockMask):
            allowed = block_mask_to_dense(mask).to(q.device)
            return backend, DenseMask(allowed, Coverage.of_dense(allowed))
        if cached:
            heads = nh if mask.uses_heads else 1
            allowed = to_dense(mask, s_q, s_kv, batch=bsz, heads=heads, device=q.device)
            return backend, DenseMask(allowed, Coverage.of_dense(allowed))
        return backend, dense_mask_for(mask, q, s_kv)

    def _run(self, backend: str, form: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        if backend == "flex":
            return flex_attend(q, k, v, form, block_size=self.block_size, score_mod=self.score_mod)
        if backend == "sparse":
            return sparse_attention(q, k, v, form, block_size=self.block_size, dropout_p=p)
        if backend == "sdpa_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p,
                                                  enable_gqa=_gqa(q, k))  # fmt: skip
        if self.score_mod is not None:
            return softmax_attention(q, k, v, form, score_mod=self.score_mod, dropout_p=p)
        return masked_sdpa(q, k, v, form, dropout_p=p)

    @staticmethod
    def _check_lengths(lengths: Tensor | None, bsz: int, s_q: int, device: torch.device) -> Tensor:
        if lengths is None:
            return torch.full((bsz,), s_q, dtype=torch.long, device=device)
        if (
            not isinstance(lengths, Tensor)
            or lengths.dtype.is_floating_point
            or lengths.dtype.is_complex
            or lengths.dtype == torch.bool
        ):
            raise TypeError(
                f"forward(lengths=...) must be an integer tensor of shape [{bsz}] (real tokens per "
                f"row), got {lengths!r}."
            )
        if lengths.shape != (bsz,) or lengths.is_meta:
            raise ValueError(
                f"forward(lengths=...) must be an integer tensor of shape [{bsz}] (real tokens per "
                f"row), got shape {tuple(lengths.shape)} on {lengths.device}."
            )
        if int(lengths.min()) < 0 or int(lengths.max()) > s_q:
            got = lengths.tolist()
            raise ValueError(
                f"forward(lengths=...) must lie in 0..{s_q} (this call's tokens), got {got}."
            )
        return lengths.to(device).long()

    # ----------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, context: Tensor | None) -> None:
        weight = self.q_proj.weight
        for name, t in (("x", x), ("context", context)):
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"forward({name}=...) must be a tensor [B, S, E], got "
                                f"{type(t).__name__}.")  # fmt: skip
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"forward({name}=...) must have shape [B, S, {self.embed_dim}] (batch first, "
                    f"embed_dim last), got {tuple(t.shape)}."
                )
            if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
                raise TypeError(
                    f"forward({name}=...) is {t.dtype} but the module's weights are "
                    f"{weight.dtype}; convert one of them, e.g. {name}.to({weight.dtype}) or "
                    f"module.to({t.dtype})."
                )
            if t.device != weight.device:
                raise ValueError(
                    f"forward({name}=...) is on {t.device} but the module's weights are on "
                    f"{weight.device}; move one of them, e.g. {name}.to('{weight.device}')."
                )
            if t.shape[0] == 0 or t.shape[1] == 0:
                raise ValueError(
                    f"forward({name}=...) needs at least one sequence of one token, got shape "
                    f"{tuple(t.shape)}."
                )
        if context is not None and context.shape[0] != x.shape[0]:
            raise ValueError(
                f"forward(context=...) has batch {context.shape[0]} but x has batch "
                f"{x.shape[0]}; give one context sequence per query sequence."
            )

    def _check_block_mask(self, bm: BlockMask, bsz: int, s_q: int, s_kv: int) -> None:
        mb, mh = bm.kv_num_blocks.shape[:2]
        if bm.seq_lengths != (s_q, s_kv) or mb not in (1, bsz) or mh not in (1, self.num_heads):
            raise ValueError(
                f"forward(mask=BlockMask) has shape {tuple(bm.shape)} but the input needs "
                f"(B in {{1, {bsz}}}, H in {{1, {self.num_heads}}}, {s_q}, {s_kv}); build it with "
                f"flexmask.block_mask(mask, q_len={s_q}, kv_len={s_kv}) or pass the mask itself."
            )

    def _choose_backend(
        self, q: Tensor, mask: MaskMod | BlockMask | None = None, s_kv: int | None = None
    ) -> str:
        """One of "flex", "sdpa", "sparse", "sdpa_causal" (SDPA ``is_causal``) for this call."""
        dropout = self.training and self.dropout > 0
        on_cpu = q.device.type == "cpu"

        def needs_grad() -> bool:
            return torch.is_grad_enabled() and (
                q.requires_grad or any(p.requires_grad for p in self.parameters())
            )

        if self.backend == "sdpa":
            return "sdpa"
        if self.backend == "sparse":
            if self.score_mod is not None:
                raise ValueError(
                    "backend='sparse' has no score_mod (it runs SDPA on the visited blocks); use "
                    "backend='auto', 'flex' or 'sdpa'."
                )
            return "sparse"
        if self.backend == "flex":
            if on_cpu and needs_grad():
                raise ValueError(
                    "backend='flex' cannot train on CPU: FlexAttention has no CPU backward pass. "
                    "Use backend='auto' or 'sparse' (block-sparse, with backward) or 'sdpa', or "
                    "run under torch.no_grad()."
                )
            if dropout:
                raise ValueError(
                    "backend='flex' has no attention dropout; call .eval(), set dropout=0, or "
                    "use backend='auto', 'sparse' or 'sdpa'."
                )
            if on_cpu and q.dtype not in _FLEX_DTYPES_CPU:
                raise TypeError(
                    f"backend='flex' on CPU supports {_FLEX_DTYPES_CPU}, got {q.dtype}; use "
                    "backend='sdpa' or 'auto'."
                )
            return "flex"
        # auto
        if self.score_mod is not None:  # only flex and the explicit softmax take a score_mod
            cpu_flex_ok = not needs_grad() and q.dtype in _FLEX_DTYPES_CPU
            return "flex" if not dropout and (not on_cpu or cpu_flex_ok) else "sdpa"
        if mask is None or (isinstance(mask, MaskMod) and mask == full()):
            return "sdpa"  # no mask at all
        if isinstance(mask, MaskMod) and mask == causal() and s_kv == q.shape[2]:
            return "sdpa_causal"
        if on_cpu:
            return self._sparse_or_dense(q, mask, s_kv)
        return "sdpa" if dropout else "flex"

    def _sparse_or_dense(self, q: Tensor, mask: MaskMod | BlockMask, s_kv: int | None) -> str:
        # Remember the last answer: every step of a model asks again with the same mask. (Both
        # answers compute the same attention; this only saves building a BlockMask.)
        key = (tuple(q.shape), s_kv, self.sparse_max_density)
        last = self._last_choice
        if last is not None and last[0] is mask and last[1] == key:
            return last[2]
        bm = (
            mask
            if isinstance(mask, BlockMask)
            else block_mask_for(mask, q, s_kv or q.shape[2], block_size=self.block_size)
        )
        choice = "sparse" if sparse_plan(bm).cost <= self.sparse_max_density else "sdpa"
        self._last_choice = (mask, key, choice)
        return choice


def _rotate(t: Tensor, index: Tensor) -> Tensor:
    """``t [B, H, S, D]`` with positions taken from ``index [B, S]`` along S."""
    return t.gather(2, index[:, None, :, None].expand_as(t))


def flex_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskMod | BlockMask | None,
    *,
    block_size: int = 128,
    score_mod: ScoreModFn | None = None,
    scale: float | None = None,
) -> Tensor:
    """Compiled ``flex_attention`` under a flexmask mask (its BlockMask built and cached for
    these shapes), a ready BlockMask, or None (every key visible). Queries and keys the mask
    hides from everyone are zeroed first, so NaN there cannot reach the output.

    Shapes: q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv, D]``.
    """
    if not isinstance(mask, BlockMask):
        # Never flex's block_mask=None: on CPU that is one giant block, several times slower.
        mask = block_mask_for(mask, q, k.shape[2], block_size=block_size)
    q, k, v = coverage(mask).hide(q, k, v)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):  # one graph per mask
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale,
                                enable_gqa=_gqa(q, k))  # fmt: skip


def dense_mask_for(mask: MaskMod | None, q: Tensor, s_kv: int) -> DenseMask | None:
    """The dense mask SDPA takes for queries ``q`` and ``s_kv`` keys, cached so that every layer
    shares it (one row per batch entry or head only where the mask depends on it)."""
    if mask is None:
        return None
    bsz, nh, s_q, _ = q.shape
    return cached_dense(
        mask, s_q, s_kv,
        batch=bsz if mask.uses_batch else 1,
        heads=nh if mask.uses_heads else 1, device=q.device,
    )  # fmt: skip


def as_dense_mask(mask: DenseMask | Tensor | None) -> DenseMask | None:
    """A ``DenseMask`` from a boolean tensor (True = may attend), or as it is."""
    if mask is None or isinstance(mask, DenseMask):
        return mask
    return DenseMask(mask, Coverage.of_dense(mask))


def masked_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dense: DenseMask | Tensor | None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """SDPA under a boolean mask (True = may attend) in which a row that sees nothing gives zeros
    and zero gradients, and NaN in what the mask hides from everyone stays out.

    Shapes: q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv, D]``, the mask broadcastable to
    ``[B, H, S, S_kv]``.
    """
    gqa = _gqa(q, k)
    dense = as_dense_mask(dense)
    if dense is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)  # fmt: skip
    q, k, v = dense.coverage.hide(q, k, v)
    # A row with no allowed key would be NaN (or depend on the kernel); let it see every key
    # (its query is zero), then zero its output: finite values forward, zero gradients back.
    seen = dense.coverage.rows[..., None]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense.allowed | ~seen, dropout_p=dropout_p, scale=scale,
        enable_gqa=gqa,
    )  # fmt: skip
    return out.masked_fill(~seen, 0.0)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dense: DenseMask | Tensor | None,
    *,
    score_mod: ScoreModFn | None = None,
    bias: Tensor | None = None,
    sinks: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Softmax attention written out, for what SDPA has no hook for: a ``score_mod`` (evaluated
    under vmap, as flex evaluates it), an additive ``bias`` broadcastable to ``[B, H, S, S_kv]``
    (T5's position bias), and attention ``sinks`` (``[H]`` logits of a virtual key with value
    zero, as GPT-OSS). Rows left with no finite score give zeros and zero gradients.

    Shapes: q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv, D]``.
    """
    dense = as_dense_mask(dense)
    if dense is not None:
        q, k, v = dense.coverage.hide(q, k, v)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # [B, H, S, S_kv]
    if score_mod is not None:
        scores = _apply_score_mod(scores, score_mod)
    if bias is not None:
        scores = scores + bias
    if dense is not None:
        scores = scores.masked_fill(~dense.allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    # A row of -inf only (masked, or sent there by the score_mod) is 0/0 in softmax: zeros.
    dead = scores.amax(-1, keepdim=True) == float("-inf")
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink's value is zero
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _apply_score_mod(scores: Tensor, score_mod: ScoreModFn) -> Tensor:
    """``score_mod(score, b, h, q_idx, kv_idx)`` on every score of ``[B, H, S, S_kv]``."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    bsz, nh, s_q, s_kv = scores.shape
    fn: Callable[..., Tensor] = score_mod
    # vmap over kv, q, h, b (innermost first), exactly how flex evaluates a score_mod.
    for dims in ((0, None, None, None, 0), (0, None, None, 0, None),
                 (0, None, 0, None, None), (0, 0, None, None, None)):  # fmt: skip
        fn = torch.vmap(fn, in_dims=dims)
    dev = scores.device
    with TransformGetItemToIndex():
        return fn(scores, torch.arange(bsz, device=dev), torch.arange(nh, device=dev),
                  torch.arange(s_q, device=dev), torch.arange(s_kv, device=dev))  # fmt: skip


def _gqa(q: Tensor, k: Tensor) -> bool:
    return q.shape[1] != k.shape[1]
