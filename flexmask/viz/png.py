"""PNG writers for masks, BlockMasks, score maps and grids (matplotlib, the ``viz`` extra).

matplotlib is imported only when a picture is drawn, into a bare ``Figure`` (no pyplot state). Every
writer takes an explicit path, creates parent folders, writes atomically and leaves out time and
version stamps, so the same picture is the same bytes.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .._checks import check_flag, check_int
from ..evaluation import block_kinds
from ..masks import MaskMod, MaskModFn, as_mask
from .picture import (
    MaskPicture,
    check_index,
    check_mask_args,
    mask_picture,
    pixel_kinds,
    score_weights,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["save_block_mask_png", "save_grid_png", "save_mask_png", "save_scores_png"]

MAX_LABELLED = 64  # tokens per side up to which every token is labelled on the axes

# Colours: (masked, may attend) pairs. With blocks shown, an element takes its block's pair, so the
# picture also shows what flex computes and discards (masked pairs in partial blocks).
PLAIN = ("#f2f2f2", "#1f3b73")
BY_BLOCK = {0: ("#f2f2f2", "#f2f2f2"), 1: ("#fdd9b5", "#c2571a"), 2: ("#1b7837", "#1b7837")}
LEGEND = {
    "plain": [(PLAIN[1], "may attend"), (PLAIN[0], "masked")],
    "blocks": [
        (BY_BLOCK[2][1], "may attend, full block"),
        (BY_BLOCK[1][1], "may attend, partial block"),
        (BY_BLOCK[1][0], "masked, partial block (computed, discarded)"),
        (BY_BLOCK[0][0], "masked, empty block (skipped)"),
    ],
    "block_mask": [
        (BY_BLOCK[2][1], "full block"),
        (BY_BLOCK[1][1], "partial block (mask_mod applied)"),
        (BY_BLOCK[0][0], "empty block (skipped)"),
    ],
}
SCORE_MASKED = "#d0d0d0"


def save_mask_png(
    mask: MaskModFn,
    path: str | os.PathLike[str],
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int = 0,
    head: int = 0,
    block_size: int = 128,
    show_blocks: bool = True,
    title: str | None = None,
) -> Path:
    """Draw ``mask`` (allowed / masked) with its BlockMask's full, partial and empty blocks.

    Masks up to ``MAX_PIXELS`` tokens per side are drawn token by token (labelled up to
    ``MAX_LABELLED``); longer ones pixel tile by pixel tile, shaded by the fraction of allowed
    pairs, computed without materialising the mask. The caption gives element and block density
    and the block counts of this (batch, head), as ``create_block_mask`` would classify them.
    Masks built from flexmask factories decide most tiles from their structure; a plain mask_mod
    function is evaluated on every pair, so its time grows with ``q_len x kv_len``.

    Args:
        mask: a flexmask mask or any mask_mod callable.
        path: the PNG to write (parent folders are created; written atomically).
        q_len, kv_len: query and key lengths (``kv_len`` defaults to ``q_len``).
        batch, head: which batch row and head to draw.
        block_size: the BlockMask block size whose blocks are shown (a multiple of 16).
        show_blocks: tint full/partial blocks and draw the block grid.
        title: defaults to the mask's expression.

    Returns:
        The path written.

    Example:
        >>> import tempfile, flexmask as fm
        >>> out = fm.save_mask_png(fm.causal() & fm.padding([20, 12]), tempfile.mkdtemp()
        ...                        + "/causal.png", 20, batch=1, block_size=16)
        >>> out.name
        'causal.png'
    """
    target = _check_path(path, "save_mask_png")
    check_flag(show_blocks, "save_mask_png(show_blocks=...)")
    m, _ = check_mask_args("save_mask_png", mask, q_len, kv_len, batch, head)
    pic = mask_picture(m, q_len, kv_len, batch=batch, head=head, block_size=block_size)
    fig = _figure((6.0, 7.0))
    ax = fig.add_subplot(1, 1, 1)
    _draw_mask(ax, pic, show_blocks)
    fig.suptitle(_title(title, m, batch, head), fontsize=10)
    caption = pic.caption() if show_blocks else f"element density {pic.element_density:.1%}"
    _legend(fig, "blocks" if show_blocks else "plain", caption)
    return _write(fig, target)


def save_block_mask_png(
    block_mask: BlockMask,
    path: str | os.PathLike[str],
    *,
    batch: int = 0,
    head: int = 0,
    title: str | None = None,
) -> Path:
    """Draw a BlockMask block by block: full, partial and empty (no ``mask_mod`` needed).

    A BlockMask with one batch row (or head) shared by all is drawn for any ``batch`` (``head``).

    Example:
        >>> import tempfile, flexmask as fm
        >>> bm = fm.block_mask(fm.sliding_window(300), 2048, device="cpu", compile=False)
        >>> fm.save_block_mask_png(bm, tempfile.mkdtemp() + "/bm.png").suffix
        '.png'
    """
    target = _check_path(path, "save_block_mask_png")
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"save_block_mask_png(block_mask=...) needs a torch BlockMask, got "
            f"{type(block_mask).__name__}; build one with flexmask.block_mask(mask, q_len), or "
            "draw a mask with flexmask.save_mask_png."
        )
    nb, nh = block_mask.kv_num_blocks.shape[:2]
    b = check_index(batch, nb, "save_block_mask_png(batch=...)", "batch rows", shared=True)
    h = check_index(head, nh, "save_block_mask_png(head=...)", "heads", shared=True)
    kinds = block_kinds(block_mask)[b, h].cpu()
    q_len, kv_len = block_mask.seq_lengths
    qbs, kvbs = block_mask.BLOCK_SIZE
    colours = torch.tensor([_rgb(BY_BLOCK[k][1]) for k in (0, 1, 2)])
    fig = _figure((6.0, 7.0))
    ax = fig.add_subplot(1, 1, 1)
    nqb, nkvb = kinds.shape
    ax.imshow(
        colours[kinds.long()].numpy(),
        extent=(0, nkvb * kvbs, nqb * qbs, 0),
        interpolation="nearest",
        aspect="auto",
    )
    _grid(ax, nqb, nkvb, qbs, kvbs)
    _axes(ax, q_len, kv_len)
    full, partial, empty = (int((kinds == k).sum()) for k in (2, 1, 0))
    caption = (
        f"{qbs}x{kvbs} blocks, b={batch} h={head}: {(full + partial) / kinds.numel():.1%} "
        f"visited ({full} full, {partial} partial, {empty} empty)"
    )
    name = getattr(block_mask.mask_mod, "__name__", None) or repr(block_mask.mask_mod)
    fig.suptitle(_wrap(title or f"BlockMask of {name}"), fontsize=10)
    _legend(fig, "block_mask", caption)
    return _write(fig, target)


def save_scores_png(
    q: Tensor,
    k: Tensor,
    path: str | os.PathLike[str],
    *,
    mask: MaskModFn | BlockMask | None = None,
    batch: int = 0,
    head: int = 0,
    scale: float | None = None,
    title: str | None = None,
    score_mod: Callable[..., Tensor] | None = None,
) -> Path:
    """Draw the attention weights ``softmax(q kᵀ · scale)`` of one (batch, head) under ``mask``,
    after ``score_mod`` where one is given (``flexmask.alibi(H)``, ``softcap``, ...).

    Masked pairs are drawn as masked (grey), not as zero weights; a query row that sees no key
    is grey throughout (attention returns zeros there). Computed in float64.

    Shapes:
        q: ``[B, H, Q, D]``, k: ``[B, H_kv, KV, D]`` with ``H`` a multiple of ``H_kv`` (GQA), as
        ``MultiheadFlexAttention.project(x)`` returns them.

    Args:
        q, k: queries and keys.
        path: the PNG to write.
        mask: a flexmask mask, a mask_mod callable or a BlockMask; None shows every pair.
        batch, head: which batch row and query head to draw.
        scale: defaults to ``1 / sqrt(D)``.
        title: defaults to the mask's expression (and the score_mod's).
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` applied to the scaled scores, as
            the module applies it.

    Example:
        >>> import tempfile, torch, flexmask as fm
        >>> attn = fm.MultiheadFlexAttention(32, 4)
        >>> q, k, v = attn.project(torch.randn(1, 10, 32))
        >>> fm.save_scores_png(q, k, tempfile.mkdtemp() + "/s.png", mask=fm.causal()).name
        's.png'
    """
    target = _check_path(path, "save_scores_png")
    weights, allowed, expr = score_weights(q, k, mask, batch, head, scale, score_mod)
    import numpy as np

    fig = _figure((6.4, 6.4))
    ax = fig.add_subplot(1, 1, 1)
    cmap = _cmap("viridis").with_extremes(bad=SCORE_MASKED)
    shown = np.ma.masked_array(weights.numpy(), mask=~allowed.numpy())
    q_len, kv_len = weights.shape
    image = ax.imshow(
        shown,
        cmap=cmap,
        vmin=0.0,
        interpolation="nearest",
        aspect="auto",
        extent=(0, kv_len, q_len, 0),
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    _axes(ax, q_len, kv_len)
    default = f"attention weights, b={batch} h={head}" + (f"\n{expr}" if expr else "")
    fig.suptitle(_wrap(title or default), fontsize=10)
    _legend(fig, [(SCORE_MASKED, "masked")])
    return _write(fig, target)


def save_grid_png(
    masks: MaskModFn | Sequence[MaskModFn],
    path: str | os.PathLike[str],
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int = 0,
    head: int = 0,
    heads: int | None = None,
    block_size: int = 128,
    show_blocks: bool = True,
    ncols: int | None = None,
    title: str | None = None,
) -> Path:
    """Several masks side by side, each titled with its expression (the README's picture).

    Given one mask instead of a list, draws each of its batch rows (``padding([...])`` has one
    per length), or each of ``heads`` heads when ``heads`` is given.

    Example:
        >>> import tempfile, flexmask as fm
        >>> masks = [fm.causal(), fm.sliding_window(4), fm.chunked(4) & fm.causal()]
        >>> fm.save_grid_png(masks, tempfile.mkdtemp() + "/grid.png", 12, block_size=16).name
        'grid.png'
    """
    target = _check_path(path, "save_grid_png")
    check_flag(show_blocks, "save_grid_png(show_blocks=...)")
    panels = _panels(masks, batch, head, heads)
    n = len(panels)
    if ncols is not None:
        check_int(ncols, "save_grid_png(ncols=...)", expected="a positive int")
    for m, b, h, _ in panels:  # every panel checked before any is drawn
        check_mask_args("save_grid_png", m, q_len, kv_len, b, h)
    pics = [
        mask_picture(m, q_len, kv_len, batch=b, head=h, block_size=block_size)
        for m, b, h, _ in panels
    ]
    cols = min(ncols or 4, n)
    rows = -(-n // cols)
    fig = _figure((3.4 * cols, 3.6 * rows + 0.9))
    for i, ((_, _, _, label), pic) in enumerate(zip(panels, pics, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_mask(ax, pic, show_blocks, small=True)
        ax.set_title(_wrap(label, 40), fontsize=8)
        ax.set_xlabel(f"{pic.element_density:.0%} dense", fontsize=7)
    if title:
        fig.suptitle(_wrap(title, 100), fontsize=10)
    _legend(fig, "blocks" if show_blocks else "plain", ncols=4 if cols > 2 else 2)
    return _write(fig, target)


def _panels(
    masks: MaskModFn | Sequence[MaskModFn], batch: int, head: int, heads: int | None
) -> list[tuple[MaskMod, int, int, str]]:
    """(mask, b, h, title) per panel."""
    if callable(masks):
        m = as_mask(masks, name="save_grid_png(masks)")
        if heads is not None:
            check_int(heads, "save_grid_png(heads=...)", expected="a positive int")
            return [(m, batch, h, f"{m!r}\nb={batch} h={h}") for h in range(heads)]
        rows = m.batch_size or 1
        return [(m, b, head, f"{m!r}\nb={b}") for b in range(rows)]
    if isinstance(masks, (str, bytes)) or not isinstance(masks, Sequence) or not masks:
        raise TypeError(
            "save_grid_png(masks=...) needs a mask or a non-empty list of masks, got "
            f"{type(masks).__name__} {masks!r}."
        )
    out = []
    for i, item in enumerate(masks):
        m = as_mask(item, name=f"save_grid_png(masks[{i}])")
        out.append((m, batch, head, repr(m)))
    return out


def _check_path(path: object, fn: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{fn}(path=...) needs a file path (str or pathlib.Path), got "
            f"{type(path).__name__}; e.g. 'figures/mask.png'."
        )
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{fn}(path=...) writes PNG files, got {str(path)!r}; end it in '.png'.")
    if target.is_dir():
        raise ValueError(f"{fn}(path=...) names a directory, {str(path)!r}; add a file name.")
    folder = target.parent  # the nearest folder that exists must be one, and writable
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{fn}(path=...): {str(folder)!r} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{fn}(path=...): cannot write in {str(folder)!r}.")
    return target


def _figure(size: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "flexmask's pictures need matplotlib: pip install 'flexmask[viz]' (or matplotlib)."
        ) from None
    # A bare Figure (no pyplot): no global state, no GUI backend, safe in threads and servers.
    return Figure(figsize=size, dpi=100, layout="constrained")


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _rgb(colour: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


def _draw_mask(ax: Axes, pic: MaskPicture, show_blocks: bool, small: bool = False) -> None:
    rows, cols = pic.fraction.shape
    if show_blocks:
        kinds = pixel_kinds(pic).long()
        low, high = (torch.tensor([_rgb(BY_BLOCK[k][i]) for k in (0, 1, 2)])[kinds] for i in (0, 1))
    else:
        low, high = (torch.tensor(_rgb(c)) for c in PLAIN)
    image = (low + pic.fraction[..., None] * (high - low)).mul_(255).round_().to(torch.uint8)
    ax.imshow(
        image.numpy(),
        aspect="auto",
        interpolation="antialiased",
        extent=(0, cols * pic.pixel, rows * pic.pixel, 0),
    )
    if show_blocks:
        nqb, nkvb = pic.kinds.shape
        _grid(ax, nqb, nkvb, pic.block_size, pic.block_size)
    _axes(ax, pic.q_len, pic.kv_len, small)


def _grid(ax: Axes, nqb: int, nkvb: int, qbs: int, kvbs: int, limit: int = 64) -> None:
    """Block boundaries, when there are few enough to see."""
    if max(nqb, nkvb) > limit:
        return
    for i in range(1, nqb):
        ax.axhline(i * qbs, color="#555555", linewidth=0.6)
    for j in range(1, nkvb):
        ax.axvline(j * kvbs, color="#555555", linewidth=0.6)


def _axes(ax: Axes, q_len: int, kv_len: int, small: bool = False) -> None:
    ax.set_xlim(0, kv_len)
    ax.set_ylim(q_len, 0)
    longest = max(q_len, kv_len)
    if longest <= MAX_LABELLED:  # every token labelled (every 2nd or 4th in small panels)
        step = 1 if not small or longest <= 16 else 2 if longest <= 32 else 4
        size = 7 if longest <= 32 else 5
        xs, ys = range(0, kv_len, step), range(0, q_len, step)
        ax.set_xticks([i + 0.5 for i in xs], [str(i) for i in xs], fontsize=size)
        ax.set_yticks([i + 0.5 for i in ys], [str(i) for i in ys], fontsize=size)
        ax.tick_params(length=0)
    else:
        ax.tick_params(labelsize=7)
    if not small:
        ax.set_xlabel("key position (kv_idx)", fontsize=9)
        ax.set_ylabel("query position (q_idx)", fontsize=9)


def _legend(
    fig: Figure, entries: str | list[tuple[str, str]], caption: str | None = None, ncols: int = 2
) -> None:
    from matplotlib.patches import Patch

    items = LEGEND[entries] if isinstance(entries, str) else entries
    handles = [Patch(facecolor=c, edgecolor="#999999", linewidth=0.5, label=t) for c, t in items]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(ncols, len(handles)),
        fontsize=8,
        title=caption,
        title_fontsize=8,
        frameon=False,
    )


def _title(title: str | None, m: MaskMod, b: int, h: int) -> str:
    if title is not None:
        return title
    where = f" (b={b})" if m.batch_size else ""
    where = f" (b={b}, h={h})" if m.uses_heads else where
    return _wrap(f"{m!r}{where}")


def _wrap(text: str, width: int = 70) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def _write(fig: Figure, target: Path) -> Path:
    """Save atomically (a temporary file in the same folder, then a rename), without metadata
    that changes between runs, so the same picture gives the same bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", metadata={"Software": None})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a picture is for sharing
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
