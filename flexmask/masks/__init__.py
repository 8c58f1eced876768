"""Mask expressions: the ``MaskMod`` base class, its algebra, and one small factory per mask.

Every ``MaskMod`` is itself a torch ``mask_mod`` and combines with ``&``, ``|`` and ``~``;
``repr`` is the expression that rebuilds it. Tensors a mask captures (lengths, document ids,
parents) are copied when the mask is made and stay tensors, so a new mask with other values at
the same shapes never makes ``torch.compile`` recompile.

``base.py`` (what every mask is and is keyed by), ``algebra.py`` (``&``, ``|``, ``~``, plain
callables), ``leaf.py`` (masks declared by their fields), ``tiles.py`` (the tile grid that
``tile_bounds`` reasons about), and the factories by family: ``basic.py``, ``tokens.py``,
``documents.py``, ``images.py``, ``trees.py``, ``offsets.py``.
"""

from .algebra import and_masks, as_mask, not_mask, or_masks
from .base import MAX_DEPTH, MaskMod, MaskModFn, check_depth
from .basic import (
    causal,
    chunked,
    dilated_window,
    full,
    local_window,
    prefix_lm,
    sink_tokens,
    sliding_window,
)
from .documents import document, from_cu_seqlens, from_position_ids, packed
from .images import neighborhood_2d
from .leaf import Leaf, Wrapper, declared, fmt_tensor
from .offsets import shifted, with_offset
from .tiles import Tiles
from .tokens import from_hf_attention_mask, global_tokens, key_padding, padding
from .trees import tree

__all__ = [
    "MAX_DEPTH",
    "Leaf",
    "MaskMod",
    "MaskModFn",
    "Tiles",
    "Wrapper",
    "and_masks",
    "as_mask",
    "causal",
    "check_depth",
    "chunked",
    "declared",
    "dilated_window",
    "document",
    "fmt_tensor",
    "from_cu_seqlens",
    "from_hf_attention_mask",
    "from_position_ids",
    "full",
    "global_tokens",
    "key_padding",
    "local_window",
    "neighborhood_2d",
    "not_mask",
    "or_masks",
    "packed",
    "padding",
    "prefix_lm",
    "shifted",
    "sink_tokens",
    "sliding_window",
    "tree",
    "with_offset",
]
