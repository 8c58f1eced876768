"""Deprecated: the old home of the dense conversions and tile evaluation (kept as an alias).

``flexmask.convert`` split into ``flexmask.dense`` (``to_dense``, ``to_additive``,
``to_hf_4d``, ``block_mask_to_dense``), ``flexmask.evaluation`` (``evaluate_tiles``,
``tile_counts``, ``block_kinds``, ``partial_tiles``) and ``flexmask.masks``
(``from_hf_attention_mask``). Every public name is also importable from ``flexmask``.
"""

import warnings

from .dense import block_mask_to_dense, to_additive, to_dense, to_hf_4d
from .evaluation import block_kinds, evaluate_tiles, partial_tiles, tile_counts
from .masks import from_hf_attention_mask

__all__ = [
    "block_kinds",
    "block_mask_to_dense",
    "evaluate_tiles",
    "from_hf_attention_mask",
    "partial_tiles",
    "tile_counts",
    "to_additive",
    "to_dense",
    "to_hf_4d",
]

warnings.warn(
    "flexmask.convert is deprecated: import from flexmask (or flexmask.dense, "
    "flexmask.evaluation) instead.",
    DeprecationWarning,
    stacklevel=2,
)
