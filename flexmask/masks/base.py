"""``MaskMod``: what every mask is (a torch mask_mod), knows about itself, and is keyed by.

A mask answers one question: may query ``q_idx`` of batch row ``b`` and head ``h`` attend to key
``kv_idx``? Every ``MaskMod`` is itself a torch ``mask_mod`` (``m(b, h, q_idx, kv_idx)`` returns a
bool tensor, True = may attend), so it goes straight into ``create_block_mask``, ``create_mask``
and ``flex_attention``. Masks combine with ``&``, ``|`` and ``~`` (``algebra.py``); ``repr`` is the
expression that rebuilds the mask.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._checks import as_device

if TYPE_CHECKING:
    from .tiles import Tiles

__all__ = ["MAX_DEPTH", "MaskMod", "MaskModFn", "check_depth"]

MaskModFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""Any callable ``(b, h, q_idx, kv_idx) -> BoolTensor``: torch's mask_mod signature."""

# Operator precedence, to parenthesise only where needed: ~ binds tighter than &, & than |.
ATOM, NOT, AND, OR = 4, 3, 2, 1
MAX_DEPTH = 100
"""Deepest expression flexmask builds (``a & b & c`` is one level; ``~(a & ~b)`` three): every
walk over an expression recurses, and Python's stack is finite."""


def check_depth(depth: int) -> int:
    """``depth`` if an expression that deep is allowed (``MAX_DEPTH``), else ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError(
            f"the mask expression is nested {depth} levels deep, more than the {MAX_DEPTH} "
            "flexmask supports; flatten it (a & b & c needs no parentheses, ~~m is m)."
        )
    return depth


class MaskMod:
    """Base class of every flexmask mask; an instance is a torch mask_mod.

    Subclasses implement ``__call__`` and ``_expr``; factories derive from ``Leaf`` (declared
    fields), operators from the composites of ``algebra.py``. Scalar-only masks have a ``_key``
    and compare by value; masks holding tensors compare by identity. flexmask's own masks are
    ``_sealed``: what they compute depends only on their fields and tensors, which is what lets
    results built from them be cached (``cache_key``). A plain callable, or a subclass written
    elsewhere, may read anything, so nothing built from it is cached.
    """

    _precedence = ATOM
    _sealed = False

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError

    # -- expression -------------------------------------------------------------------------
    def _expr(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self._expr()

    def wrapped(self, outer: int) -> str:
        """The expression, in parentheses where an operator of precedence ``outer`` needs it."""
        text = self._expr()
        return f"({text})" if self._precedence < outer else text

    @property
    def slug(self) -> str:
        """A file-name-safe form of the expression, e.g. ``causal_and_padding_lengths_3_5``."""
        text = self._expr().replace("tensor(", "(")
        for op, word in (("&", "_and_"), ("|", "_or_"), ("~", "not_")):
            text = text.replace(op, word)
        text = re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_.")
        if len(text) > 96:  # keep names short; the hash keeps them distinct
            digest = hashlib.sha1(text.encode()).hexdigest()[:8]
            text = f"{text[:87].rstrip('_.')}_{digest}"
        return text

    # -- equality: by value for scalar masks, by identity otherwise ---------------------------
    def _key(self) -> tuple[Any, ...] | None:
        return None

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(self) is not type(other):
            return False
        key = self._key()
        return key is not None and key == other._key()

    def __hash__(self) -> int:
        key = self._key()
        return id(self) if key is None else hash((type(self).__name__, key))

    def cache_key(self) -> tuple[Any, ...] | None:
        """A key under which results built from this mask may be cached, or None.

        Equal keys mean masks that give the same answer now: scalar masks by value; masks
        holding tensors by identity *and* the version counters of their tensors, so refilling a
        tensor in place changes the key. None when flexmask cannot know what the mask reads (a
        plain callable: results built from it are never cached) or a tensor keeps no version
        counter (an inference tensor).
        """
        if self._key() is not None:
            return (self,)
        if not self.sealed:
            return None
        try:
            versions = tuple(t._version for t in self.tensors())
        except RuntimeError:  # inference tensors track no version
            return None
        return (self, versions)

    # -- algebra (algebra.py) -----------------------------------------------------------------
    def __and__(self, other: MaskModFn) -> MaskMod:
        from .algebra import and_masks

        return and_masks(self, other)

    def __rand__(self, other: MaskModFn) -> MaskMod:
        from .algebra import and_masks

        return and_masks(other, self)

    def __or__(self, other: MaskModFn) -> MaskMod:
        from .algebra import or_masks

        return or_masks(self, other)

    def __ror__(self, other: MaskModFn) -> MaskMod:
        from .algebra import or_masks

        return or_masks(other, self)

    def __invert__(self) -> MaskMod:
        from .algebra import not_mask

        return not_mask(self)

    # -- structure, used by block_mask / to_dense / check -------------------------------------
    @property
    def children(self) -> tuple[MaskMod, ...]:
        return ()

    def leaves(self) -> list[MaskMod]:
        """Every non-composite part of the expression, left to right."""
        if not self.children:
            return [self]
        return [leaf for child in self.children for leaf in child.leaves()]

    def tensors(self) -> list[Tensor]:
        """The tensors this mask captures (for device checks, moves and cache keys)."""
        return [t for leaf in self.leaves() for t in leaf._own_tensors()]

    def _own_tensors(self) -> list[Tensor]:
        return []

    @property
    def depth(self) -> int:
        """Levels of nesting: 1 for a factory, one more per operator or wrapper around it."""
        return 1

    @property
    def sealed(self) -> bool:
        """Whether everything this mask reads is known to flexmask (False if it holds a plain
        callable or a MaskMod subclass defined elsewhere)."""
        return all(leaf._sealed_leaf() for leaf in self.leaves())

    def _sealed_leaf(self) -> bool:
        return type(self)._sealed or self._key() is not None

    @property
    def device(self) -> torch.device | None:
        """The device of the captured tensors, or None when the mask holds none.

        Raises:
            ValueError: if the tensors are on several devices.
        """
        devices = {t.device for t in self.tensors()}
        if len(devices) > 1:
            raise ValueError(
                f"the mask {self!r} holds tensors on several devices "
                f"({sorted(map(str, devices))}); move it to one with mask.to(device)."
            )
        return devices.pop() if devices else None

    def to(self, device: torch.device | str) -> MaskMod:
        """The same mask with its tensors on ``device``.

        Raises:
            TypeError, ValueError: if ``device`` is not a device this machine has (``"meta"``
                is allowed: shapes without values).
        """
        dev = as_device(device, "mask.to(device=...)", allow_meta=True)
        if self.children:
            return self._rebuild([c.to(dev) for c in self.children])
        return self._moved(dev)

    def _moved(self, device: torch.device) -> MaskMod:
        return self

    def _rebuild(self, children: list[MaskMod]) -> MaskMod:
        return self

    @property
    def batch_size(self) -> int | None:
        """Rows of the per-batch tensors this mask holds, or None when it is the same for all."""
        sizes = {n for leaf in self.leaves() if (n := leaf._own_batch()) is not None}
        if len(sizes) > 1:
            raise ValueError(
                f"mask parts disagree on the batch size: {self!r} holds per-batch tensors of "
                f"{sorted(sizes)} rows; give every per-batch tensor one row per sequence."
            )
        return sizes.pop() if sizes else None

    def _own_batch(self) -> int | None:
        return None

    @property
    def uses_heads(self) -> bool:
        """Whether the mask may differ between heads (True for plain callables: unknown)."""
        return any(leaf._opaque() for leaf in self.leaves())

    @property
    def uses_batch(self) -> bool:
        """Whether the mask may differ between batch rows (per-batch tensors, plain callables)."""
        return self.batch_size is not None or self.uses_heads

    def _opaque(self) -> bool:
        return False

    @property
    def counts_from_end(self) -> bool:
        """Whether some part counts positions from the end of the sequence and is not bound to
        a length yet (``padding(side="left")``): it has no meaning on a growing KV cache."""
        return any(leaf._counts_from_end() for leaf in self.leaves())

    def _counts_from_end(self) -> bool:
        return False

    def bind(self, q_len: int, kv_len: int) -> MaskMod:
        """Check the mask against a ``q_len x kv_len`` problem and fix what depends on it.

        ``padding(..., side="left")`` counts from the end of the sequence and so needs its
        length; every other mask returns itself after checking its tensors fit.
        """
        if self.children:
            bound = [c.bind(q_len, kv_len) for c in self.children]
            if all(b is c for b, c in zip(bound, self.children, strict=True)):
                return self
            return self._rebuild(bound)
        return self._bind_leaf(q_len, kv_len)

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        return self

    # -- what the structure says about tiles, without evaluating --------------------------------
    @property
    def exact_bounds(self) -> bool:
        """Whether ``tile_bounds`` is exact: a tile that is neither all-allowed nor all-masked
        is then known to be mixed, without evaluating it."""
        return False

    @property
    def exact_on_rectangles(self) -> bool:
        """Whether ``tile_bounds`` stays exact on any rectangles (it reads only the tiles'
        corners, not per-position tensors)."""
        return self.exact_bounds and not any(leaf._per_position() for leaf in self.leaves())

    def _per_position(self) -> bool:
        return False

    @property
    def is_box(self) -> bool:
        """Whether the mask keeps exactly a box of real positions per batch row (``box``)."""
        return False

    def box(self, b: int) -> tuple[int, int]:
        """Real positions ``[lo, hi)`` of row ``b``, for queries and keys alike (``is_box``)."""
        raise NotImplementedError

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        """What the mask is certain of on each tile, without evaluating it element by element.

        Returns ``(all_true, any_true)``, bool ``[NQ, NK]``: ``all_true`` only where every pair of
        the tile is allowed, ``~any_true`` only where none is. Both may be conservative (a tile
        with neither is simply undecided and gets evaluated). Masks must be bound.
        """
        undecided = torch.zeros_like(tiles.q0 + tiles.k0, dtype=torch.bool)
        return undecided, ~undecided
