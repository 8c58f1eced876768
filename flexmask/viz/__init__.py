"""Pictures of masks, BlockMasks and attention score maps.

``picture`` computes what a picture shows with torch alone (``to_ascii`` needs nothing else);
``png`` draws and writes it with matplotlib (the ``viz`` extra), imported on first use.
"""

from .picture import MaskPicture, mask_picture, score_weights, to_ascii
from .png import save_block_mask_png, save_grid_png, save_mask_png, save_scores_png

__all__ = [
    "MaskPicture",
    "mask_picture",
    "save_block_mask_png",
    "save_grid_png",
    "save_mask_png",
    "save_scores_png",
    "score_weights",
    "to_ascii",
]
