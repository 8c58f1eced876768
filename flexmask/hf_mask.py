"""The mask Transformers hands flexmask's attention function: ``mask_interface`` answers
Transformers' mask interface with an ``HFMask``, the layer's mask as a flexmask expression built
on first use, and for Transformers' commonest mask (causal or not, keys padded by a 2-D mask) a
dense form made from tensors directly, which a CPU decode step runs on without the expression."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from transformers.masking_utils import causal_mask_function

from .coverage import DenseMask
from .hf_mask_functions import translate
from .masks import MaskMod, as_mask, causal, from_hf_attention_mask, full, shifted
from .runners import MaskForms

__all__ = ["HFMask", "mask_interface"]


class HFMask(BlockMask):
    """What flexmask's mask function hands its attention function: the layer's mask in local
    coordinates (queries ``0..q_len-1``, keys ``0..kv_len-1``) and its 4-D ``shape``.

    A BlockMask by type only (none of its tables exist): with a static cache, ``generate`` builds
    every mask before the forward pass, and the model passes a prepared 4-D mask through
    unchanged only when it is a Tensor or a BlockMask. flexmask's attention function is the one
    reader of it.
    """

    def __init__(
        self,
        build: Callable[[], MaskMod],
        shape: tuple[int, int, int, int],
        causal_padding: _CausalPadding | None = None,
    ) -> None:
        self._build = build
        self._mask: MaskMod | None = None
        self._shape = shape  # (batch, 1, q_len, kv_len)
        self._causal_padding = causal_padding
        self._forms: dict[tuple[Any, ...], MaskForms] = {}

    @property
    def mask(self) -> MaskMod:
        """The mask expression, built on first use: a decode step that runs SDPA on the dense
        mask of a ``_CausalPadding`` never needs it."""
        mask = self._mask
        if mask is None:
            mask = self._mask = self._build()
        return mask

    def forms(self, query: Tensor, kv_len: int) -> MaskForms:
        """The layer's ``MaskForms``, one per input shape and device for the whole forward pass:
        the first layer builds the dense mask or BlockMask, the others reuse it (this object
        lives one forward pass, and its mask never changes)."""
        key = (*query.shape[:3], kv_len, query.device)
        forms = self._forms.get(key)
        if forms is None:
            forms = self._forms[key] = _Forms(self, self._causal_padding)
        return forms

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    @property
    def ndim(self) -> int:  # models test it to tell a prepared 4-D mask from a 2-D one
        return 4

    def __repr__(self) -> str:
        return f"HFMask({self.mask!r}, shape={self._shape})"


@dataclass(frozen=True)
class _CausalPadding:
    """Transformers' commonest mask, causal (or not) over keys padded by a 2-D mask, as the
    tensors that give its dense form in a few operations: a decode step spent ~0.5 ms building
    it from the mask expression, as long as its attention on a small model."""

    causal: bool
    q_offset: int | Tensor  # the first query's position (a tensor with a static cache)
    keys: Tensor | None  # [B, frame] bool, the real keys; None: every key

    def dense(self, q_len: int, kv_len: int, device: torch.device) -> Tensor:
        """``[B or 1, 1, q_len, kv_len]`` bool, equal to ``to_dense`` of the mask expression."""
        allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        if self.causal:
            q = torch.arange(q_len, device=device) + self.q_offset
            allowed = torch.arange(kv_len, device=device) <= q[:, None]
            allowed = allowed[None, None]
        if self.keys is not None:
            allowed = allowed & self.keys[:, None, None, :kv_len].to(device)
        return allowed


class _Forms(MaskForms):
    """``MaskForms`` of an ``HFMask``: with a ``_CausalPadding``, the dispatch questions and the
    dense form are answered from it, and the mask expression is built only if a BlockMask is."""

    def __init__(self, source: HFMask, fast: _CausalPadding | None) -> None:
        super().__init__(build_mask=lambda: source.mask)
        self._fast = fast

    @property
    def none(self) -> bool:
        f = self._fast
        if f is None:
            return super().none
        return self._block is None and self._dense is None and not f.causal and f.keys is None

    def causal(self, q: Tensor, s_kv: int) -> bool:
        f = self._fast
        if f is None:
            return super().causal(q, s_kv)
        unshifted = isinstance(f.q_offset, int) and f.q_offset == 0
        return f.causal and f.keys is None and unshifted and s_kv == q.shape[2]

    @property
    def dense_only(self) -> bool:
        return False  # it has a mask

    def dense(self, q: Tensor, s_kv: int) -> DenseMask | None:
        if self.none:  # every key visible: no mask at all
            return None
        if self._dense is None and self._block is None and self._fast is not None:
            self._dense = DenseMask.of(self._fast.dense(q.shape[2], s_kv, q.device))
        return super().dense(q, s_kv)


def mask_interface(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: Tensor | None = None,
    cache_position: Tensor | None = None,
    **kwargs: Any,
) -> HFMask:
    """Transformers' mask-interface call, answered with a flexmask mask (no tensor work here;
    the expression is built when first needed)."""
    if q_length is None:  # transformers < 5.4 passed the query positions instead
        if cache_position is None:
            raise TypeError("flexmask mask function: got neither q_length nor cache_position.")
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    if kv_length is None:
        raise TypeError("flexmask mask function: Transformers passed no kv_length.")
    # A static cache gives the offset as a tensor: kept one, flex does not recompile per step.
    offset = int(q_offset)
    # Transformers' own mask functions as flexmask masks (cached by value); others as callables
    mask = translate(mask_function) or as_mask(mask_function, name="Transformers' mask_function")
    # One query after every key (a decode step): causality hides nothing. Not with a tensor
    # offset (a static cache), whose masks keep one structure so that flex compiles once.
    last = q_length == 1 and offset >= kv_offset + kv_length - 1
    if mask == causal() and last and not isinstance(q_offset, Tensor):
        mask = full()
    query_free = mask == full()  # reads no query position: their offset changes nothing
    am = None
    if attention_mask is not None and not bool(attention_mask.all()):
        # A 2-D mask pads keys only (Transformers' padding_mask_function); its columns are
        # absolute key positions. Cross-attention: keys are the encoder's, queries not.
        frame = kv_offset + kv_length
        am = attention_mask[:, :frame]
        if am.shape[1] < frame:  # a static cache longer than the tokens seen: the rest is empty
            am = torch.nn.functional.pad(am, (0, frame - am.shape[1]), value=False)
    at = q_offset if isinstance(q_offset, Tensor) else offset
    shift = (isinstance(q_offset, Tensor) or offset or kv_offset) and not (
        query_free and not kv_offset
    )

    def build() -> MaskMod:
        m = mask
        if am is not None:
            keys = from_hf_attention_mask(am, keys_only=True)
            m = keys if query_free else m & keys
        return shifted(m, at, kv_offset) if shift else m

    # Transformers' commonest mask (causal or not, keys padded) has a dense form without the
    # expression; not with a key offset (a sliding cache), which that form does not cover.
    simple = (query_free or mask == causal()) and not kv_offset
    fast = _CausalPadding(not query_free, at, None if am is None else am.bool()) if simple else None
    result = HFMask(build, (batch_size, 1, q_length, kv_length), fast)
    if fast is None:
        result.mask  # noqa: B018 (built now: no dense form stands in for it)
    return result
