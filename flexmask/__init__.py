"""flexmask: structured attention masks for PyTorch FlexAttention.

Describe once which query may see which key, combine the pieces with ``&``, ``|``, ``~``, and get
a BlockMask, a dense mask for SDPA, diagnostics, and a drop-in attention module.
"""

from . import distributed
from ._lru import cache_info, clear_cache
from .attention import MultiheadFlexAttention, ScoreModFn
from .block import block_mask
from .cache import KVCache
from .candidates import Tree
from .dense import block_mask_to_dense, to_additive, to_dense, to_hf_4d
from .diagnose import MaskStats, check, describe
from .functional import flex_attend
from .masks import (
    MaskMod,
    MaskModFn,
    and_masks,
    as_mask,
    causal,
    chunked,
    dilated_window,
    document,
    from_cu_seqlens,
    from_hf_attention_mask,
    from_position_ids,
    full,
    global_tokens,
    key_padding,
    local_window,
    neighborhood_2d,
    not_mask,
    or_masks,
    packed,
    padding,
    prefix_lm,
    shifted,
    sink_tokens,
    sliding_window,
    tree,
)
from .score_mods import ScoreMod, alibi, compose, relative_bias, softcap
from .sparse import sparse_attention
from .viz import save_block_mask_png, save_grid_png, save_mask_png, save_scores_png, to_ascii

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "MaskMod",
    "MaskModFn",
    "MaskStats",
    "MultiheadFlexAttention",
    "ScoreMod",
    "ScoreModFn",
    "Tree",
    "alibi",
    "and_masks",
    "as_mask",
    "block_mask",
    "block_mask_to_dense",
    "cache_info",
    "causal",
    "check",
    "chunked",
    "clear_cache",
    "compose",
    "describe",
    "dilated_window",
    "distributed",
    "document",
    "flex_attend",
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
    "relative_bias",
    "save_block_mask_png",
    "save_grid_png",
    "save_mask_png",
    "save_scores_png",
    "shifted",
    "sink_tokens",
    "sliding_window",
    "softcap",
    "sparse_attention",
    "to_additive",
    "to_ascii",
    "to_dense",
    "to_hf_4d",
    "tree",
]
