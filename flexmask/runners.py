"""The runners: free functions that compute attention one way each, with one signature
``runner(q, k, v, forms, options)``: ``flex`` (compiled FlexAttention), ``sparse`` (the
block-sparse CPU path), ``sdpa`` (SDPA with a dense mask or ``is_causal``, or an explicit softmax
when the scores must be modified). ``dispatch.choose`` picks one; ``RUNNERS`` names them."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .block import RECOMPILE_LIMIT, block_mask_for
from .coverage import DenseMask, as_dense_mask, cached_dense, coverage
from .dense import block_mask_to_dense
from .masks import MaskMod, causal, full
from .sparse import sparse_attention

__all__ = [
    "RUNNERS",
    "MaskForms",
    "Options",
    "ScoreModFn",
    "flex",
    "masked_sdpa",
    "sdpa",
    "softmax_attention",
    "sparse",
]

ScoreModFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(score, b, h, q_idx, kv_idx) -> score``: torch's score_mod signature."""


@dataclass(frozen=True)
class Options:
    """What a call asks of attention besides the mask."""

    scale: float | None = None  # default 1 / sqrt(D)
    dropout_p: float = 0.0
    score_mod: ScoreModFn | None = None
    sinks: Tensor | None = None  # [H] logits of a virtual key of value zero (GPT-OSS)
    bias: Tensor | None = None  # additive, broadcastable to [B, H, S, S_kv] (T5)
    kernel_options: dict[str, Any] | None = None  # flex's own, passed through

    @property
    def softmax_only(self) -> bool:
        """Sinks or a bias: only the explicit softmax applies them."""
        return self.sinks is not None or self.bias is not None


class MaskForms:
    """One call's mask in the forms runners take, each built at most once per call: the mask
    (local positions; None: every key visible), its BlockMask and its dense mask. Built forms are
    also cached across calls under the mask's key (``MaskMod.cache_key``), unless ``keep`` is
    False (a KV cache's step mask: a new one every call)."""

    def __init__(
        self,
        mask: MaskMod | None = None,
        *,
        block: BlockMask | None = None,
        dense: DenseMask | None = None,
        block_size: int | tuple[int, int] = 128,
        keep: bool = True,
        build_mask: Callable[[], MaskMod] | None = None,
    ) -> None:
        self._mask, self._build_mask = mask, build_mask
        self._block, self._dense = block, dense
        self.block_size = (block_size, block_size) if isinstance(block_size, int) else block_size
        self.keep = keep

    @property
    def mask(self) -> MaskMod | None:
        """The mask; with ``build_mask``, built on first use (a caller whose dense form stands
        in for it may never need it: a Transformers decode step)."""
        if self._mask is None and self._build_mask is not None:
            self._mask, self._build_mask = self._build_mask(), None
        return self._mask

    @property
    def none(self) -> bool:
        """No mask at all: every query sees every key."""
        if self._block is not None or self._dense is not None:
            return False
        return self.mask is None or self.mask == full()

    def causal(self, q: Tensor, s_kv: int) -> bool:
        """``causal()`` on a square problem: SDPA's ``is_causal`` kernel computes it (also once
        its BlockMask is built: the GPU benchmark's auto row ran the dense mask, 3-4x slower)."""
        return self.mask == causal() and s_kv == q.shape[2]

    @property
    def dense_only(self) -> bool:
        """Only a dense mask (a 4-D tensor from Transformers): SDPA is the one runner for it."""
        return self._dense is not None and self.mask is None and self._block is None

    @property
    def block_sizes(self) -> tuple[int, int]:
        """The BlockMask's (query, key) block sizes, built or not."""
        return self._block.BLOCK_SIZE if self._block is not None else self.block_size

    def prepare(self, backend: str, q: Tensor, s_kv: int) -> None:
        """Build now the form ``backend``'s runner takes, so that its errors come before any
        state changes (a KV cache's write)."""
        if backend != "sdpa":
            self.block_mask(q, s_kv)
        elif not self.causal(q, s_kv):
            self.dense(q, s_kv)

    def block_mask(self, q: Tensor, s_kv: int) -> BlockMask:
        """The BlockMask for queries ``q [B, H, S, D]`` and ``s_kv`` keys: one row per batch
        entry or head only where the mask depends on it."""
        if self._block is None:
            self._block = block_mask_for(self.mask, q, s_kv, block_size=self.block_size,
                                         cache=self.keep)  # fmt: skip
        return self._block

    def dense(self, q: Tensor, s_kv: int) -> DenseMask | None:
        """The dense mask (with its coverage), or None for no mask."""
        if self._dense is None and not self.none:
            if self._block is not None:
                self._dense = DenseMask.of(block_mask_to_dense(self._block).to(q.device))
            elif self.mask is not None:
                bsz, nh, s_q, _ = q.shape
                self._dense = cached_dense(
                    self.mask, s_q, s_kv,
                    batch=bsz if self.mask.uses_batch else 1,
                    heads=nh if self.mask.uses_heads else 1,
                    device=q.device, cache=self.keep,
                )  # fmt: skip
        return self._dense


Runner = Callable[[Tensor, Tensor, Tensor, MaskForms, Options], Tensor]


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    # Built on first use, never at import (compiling flex costs seconds). Static shapes: a KV
    # cache keeps them fixed, and torch 2.13's dynamic-shape CPU flex kernel fails to compile
    # (undeclared `cur_kvSplitSize2`) once a second shape is seen.
    return torch.compile(flex_attention, dynamic=False)


def flex(q: Tensor, k: Tensor, v: Tensor, forms: MaskForms, options: Options) -> Tensor:
    """Compiled ``flex_attention`` on the BlockMask (never flex's ``block_mask=None``: on CPU
    that is one giant block, several times slower). Queries and keys the mask hides from
    everyone are zeroed first, so NaN there cannot reach the output.

    Shapes: q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv, D]`` -> ``[B, H, S, D]``.
    """
    bm = forms.block_mask(q, k.shape[2])
    q, k, v = coverage(bm).hide(q, k, v)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):  # one graph per mask
        return _compiled_flex()(q, k, v, score_mod=options.score_mod, block_mask=bm,
                                scale=options.scale, enable_gqa=_gqa(q, k),
                                kernel_options=_kernel_options(q, bm, options))  # fmt: skip


def _kernel_options(q: Tensor, bm: BlockMask, options: Options) -> dict[str, Any] | None:
    """The caller's kernel options; flexmask's tiles (``kernel_tiles``) where the caller chose
    no forward tile (torch would let a prefixed tile override the caller's)."""
    given = options.kernel_options or {}
    if any(key in given for key in ("BLOCK_M", "BLOCK_N", "fwd_BLOCK_M", "fwd_BLOCK_N")):
        return dict(given)
    return {**(kernel_tiles(q, bm.BLOCK_SIZE) or {}), **given} or None


def kernel_tiles(q: Tensor, block_sizes: tuple[int, int]) -> dict[str, int] | None:
    """Forward tile sizes for a BlockMask whose blocks are not multiples of 128, else None.

    Torch's CUDA kernel takes one tile size per GPU, dtype and head dim (128 query rows on
    Hopper) and refuses blocks it does not divide: ``block_size=64`` failed to compile on an
    H200. These tiles divide the blocks and are no larger than torch's defaults. Queries shorter
    than 128 go to FlexDecoding, which picks its own tiles (a forward tile would override them).
    """
    q_block, kv_block = block_sizes
    if q.device.type != "cuda" or q.shape[2] < 128 or (q_block % 128 == 0 and kv_block % 128 == 0):
        return None
    head_dim = q.shape[-1]
    tile = 64 if q.element_size() == 2 and head_dim <= 128 else 32 if head_dim <= 128 else 16
    return {"fwd_BLOCK_M": math.gcd(q_block, tile), "fwd_BLOCK_N": math.gcd(kv_block, tile)}


def backward_tiles_refuse(q: Tensor, block_sizes: tuple[int, int]) -> str | None:
    """Why torch's CUDA backward kernel cannot take these blocks, or None where it can.

    Its tiles come from a fixed list per GPU, dtype and head dim (torch's inductor ``choices``),
    and it has no kernel when no tile divides the blocks: bfloat16 at ``block_size=64`` on an
    H200 (tiles of 128 keys) failed to compile with ``NoValidChoicesError``.
    """
    q_block, kv_block = block_sizes
    if q.device.type != "cuda" or (q_block % 128 == 0 and kv_block % 128 == 0):
        return None
    # Asked on every training call: the answer depends on these facts alone (autotuning widens
    # torch's tile list).
    autotune = bool(getattr(torch._inductor.config, "max_autotune", False))
    return _backward_tiles_refuse(q.shape[-1], q.dtype, q.device, q_block, kv_block, autotune)


@functools.cache
def _backward_tiles_refuse(
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    q_block: int,
    kv_block: int,
    autotune: bool,
) -> str | None:
    try:
        from torch._inductor.virtualized import V

        tiles = V.choices.get_flex_attention_bwd_configs(head_dim, dtype, "cuda")
    except (ImportError, AttributeError, TypeError):  # another torch: let its kernel decide
        return None
    for t in tiles:
        pairs = ((q_block, t.block_m1), (kv_block, t.block_n1), (kv_block, t.block_n2),
                 (q_block, t.block_m2))  # fmt: skip
        if all(block % tile == 0 for block, tile in pairs):
            return None
    sizes = sorted({f"{t.block_m1}x{t.block_n1} and {t.block_m2}x{t.block_n2}" for t in tiles})
    gpu = torch.cuda.get_device_name(device)
    return (
        f"torch {torch.__version__}'s FlexAttention backward on {gpu} in {dtype} with head "
        f"dim {head_dim} has tiles of {'; '.join(sizes)} (queries x keys), none of which "
        f"divides blocks of {q_block} x {kv_block}"
    )


def sparse(q: Tensor, k: Tensor, v: Tensor, forms: MaskForms, options: Options) -> Tensor:
    """``sparse_attention`` on the BlockMask: only its visited blocks, with backward."""
    bm = forms.block_mask(q, k.shape[2])
    return sparse_attention(q, k, v, bm, scale=options.scale, dropout_p=options.dropout_p,
                            score_mod=options.score_mod)  # fmt: skip


def sdpa(q: Tensor, k: Tensor, v: Tensor, forms: MaskForms, options: Options) -> Tensor:
    """SDPA: its ``is_causal`` kernel for a square ``causal()``, else the dense mask (or none);
    the explicit softmax when the scores must be modified (score_mod, sinks, bias)."""
    p = options.dropout_p
    if options.score_mod is not None or options.softmax_only:
        return softmax_attention(q, k, v, forms.dense(q, k.shape[2]), score_mod=options.score_mod,
                                 bias=options.bias, sinks=options.sinks, scale=options.scale,
                                 dropout_p=p)  # fmt: skip
    if forms.causal(q, k.shape[2]):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=p, scale=options.scale, enable_gqa=_gqa(q, k)
        )
    return masked_sdpa(q, k, v, forms.dense(q, k.shape[2]), dropout_p=p, scale=options.scale)


RUNNERS: dict[str, Runner] = {"flex": flex, "sparse": sparse, "sdpa": sdpa}


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
    dense = as_dense_mask(dense)
    if dense is None:
        return _grouped_sdpa(q, k, v, None, dropout_p, scale)
    cover = dense.coverage

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # A row with no allowed key would be NaN (or depend on the kernel): it sees every key
        # (its query is zero), then its output is zeroed: finite values forward, zero gradients.
        out = _grouped_sdpa(q, k, v, dense.sdpa_mask, dropout_p, scale)
        return out if cover.every_row else out.masked_fill(~cover.rows[..., None], 0.0)

    inference = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    if q.device.type == "cpu" and inference and dropout_p == 0.0:
        # NaN where the mask hides everything can only reach the output by making it NaN, so a
        # finite output needs no zeroing: one read of the output instead of reading q, k and v
        # (a decode step over a 1k-slot cache spent more on that than on attention).
        out = attend(q, k, v)
        if math.isfinite(float(out.sum())):
            return out
    return attend(*cover.hide(q, k, v))


def _grouped_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None
) -> Tensor:
    """SDPA with grouped-query heads. One query per row (a decode step) under a mask shared by
    the heads: each key head's group of queries goes in as that head's rows (as Transformers'
    sdpa does), which ran 1.35x faster than ``enable_gqa`` at 8 heads over 1k keys on CPU."""
    bsz, nh, s_q, dim = q.shape
    nkv = k.shape[1]
    if nkv == nh:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              scale=scale)  # fmt: skip
    if s_q == 1 and (mask is None or mask.shape[1] == 1):
        folded = q.reshape(bsz, nkv, nh // nkv, dim)  # [B, H_kv, group, D]
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)  # fmt: skip
        return out.reshape(bsz, nh, 1, dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          scale=scale, enable_gqa=True)  # fmt: skip


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
