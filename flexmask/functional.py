"""``flex_attend``: compiled FlexAttention on a flexmask mask, as a function of q, k and v."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import check_block_mask_shape, check_block_sizes, check_kernel_options
from .dispatch import FLEX_DTYPES_CPU
from .masks import MaskModFn, as_mask
from .runners import MaskForms, Options, ScoreModFn, flex
from .sparse import check_qkv

__all__ = ["flex_attend"]


def flex_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskModFn | BlockMask | None = None,
    *,
    score_mod: ScoreModFn | None = None,
    scale: float | None = None,
    block_size: int | tuple[int, int] = 128,
    kernel_options: dict[str, Any] | None = None,
) -> Tensor:
    """Compiled ``flex_attention`` with a flexmask mask: its BlockMask built from the mask's
    structure and cached, and the guarantees of ``MultiheadFlexAttention``'s flex backend.

    Query rows that see no key give zeros, never NaN, also when the inputs hold NaN at the
    positions the mask hides from every query. Blocks smaller than torch's tiles get tiles that
    divide them (``block_size=64`` on Hopper).

    Shapes:
        q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv, D]`` (``H_kv`` divides ``H``) ->
        ``[B, H, S, D]``.

    Args:
        mask: a flexmask mask or mask_mod (its BlockMask is built with ``block_size``), a ready
            BlockMask for ``(S, S_kv)``, or None (every key visible).
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score``, applied in the kernel.
        scale: score scale, default ``1 / sqrt(D)``.
        block_size: BlockMask tile size for a mask that is not a BlockMask (an int, or
            ``(q_block, kv_block)``).
        kernel_options: flex's own (``FlexKernelOptions``), passed through; a forward tile
            given here replaces flexmask's.

    Raises:
        TypeError: for inputs that are not 4-D tensors of one floating dtype, a dtype flex
            has no CPU kernel for, or a score_mod that is not callable.
        ValueError: for shapes that disagree, a BlockMask of another shape, or a backward on
            CPU (FlexAttention has no CPU backward: use ``sparse_attention``).

    Example (not run as a doctest: the first call compiles flex, seconds on a CPU;
    ``tests/test_functional.py`` runs it against the float64 golden):
        >>> import torch, flexmask as fm
        >>> q = k = v = torch.randn(1, 2, 256, 16)
        >>> out = fm.flex_attend(q, k, v, fm.causal() & fm.padding([200]))  # doctest: +SKIP
    """
    who = "flex_attend"
    check_qkv(q, k, v, who)
    block_size = check_block_sizes(block_size)
    options = check_kernel_options(kernel_options, f"{who}(kernel_options=...)")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"{who}(score_mod=...) must be a callable (score, b, h, q_idx, kv_idx) "
                        f"-> score, got {type(score_mod).__name__}.")  # fmt: skip
    if q.device.type == "cpu":
        if q.dtype not in FLEX_DTYPES_CPU:
            raise TypeError(f"{who} on CPU supports {FLEX_DTYPES_CPU}, got {q.dtype}.")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                f"{who} cannot train on CPU: FlexAttention has no CPU backward pass. Use "
                "flexmask.sparse_attention (block-sparse, with backward), or torch.no_grad()."
            )
    if isinstance(mask, BlockMask):
        check_block_mask_shape(mask, f"{who}(mask=BlockMask)", q.shape[0], q.shape[1],
                               q.shape[2], k.shape[2])  # fmt: skip
        forms = MaskForms(block=mask)
    else:
        m = None if mask is None else as_mask(mask, name=f"{who}(mask=...)")
        forms = MaskForms(m, block_size=block_size)
    return flex(q, k, v, forms, Options(scale=scale, score_mod=score_mod,
                                        kernel_options=options))  # fmt: skip
