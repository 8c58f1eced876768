"""The algebra: ``&``, ``|``, ``~`` over masks, and plain mask_mod callables as operands."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .base import AND, NOT, OR, MaskMod, MaskModFn, check_depth
from .tiles import Tiles

__all__ = ["and_masks", "as_mask", "not_mask", "or_masks"]


def as_mask(mask: MaskModFn, *, name: str = "mask") -> MaskMod:
    """Return ``mask`` as a ``MaskMod``: itself if it is one, else a wrapper around the callable.

    Raises:
        TypeError: if ``mask`` is not callable or does not take ``(b, h, q_idx, kv_idx)``.
    """
    if isinstance(mask, MaskMod):
        return mask
    if not callable(mask):
        raise TypeError(
            f"{name} must be a flexmask mask or a mask_mod callable (b, h, q_idx, kv_idx) -> "
            f"BoolTensor, got {type(mask).__name__} {mask!r}; build one with a factory such as "
            "flexmask.causal()."
        )
    _check_arity(mask, name)
    return _Callable(mask)


def _check_arity(fn: Callable[..., Any], name: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        sig.bind(0, 0, 0, 0)
    except TypeError:
        raise TypeError(
            f"{name} must take four arguments (b, h, q_idx, kv_idx), got a callable with "
            f"signature {sig}; a mask_mod looks like `def m(b, h, q_idx, kv_idx): return "
            "q_idx >= kv_idx`."
        ) from None


class _Callable(MaskMod):
    """A plain mask_mod function (or attention-gym mask) inside an expression."""

    def __init__(self, fn: MaskModFn) -> None:
        self.fn = fn

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def _expr(self) -> str:
        return getattr(self.fn, "__name__", None) or repr(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Callable) and self.fn is other.fn

    def __hash__(self) -> int:
        return hash(("callable", id(self.fn)))

    def _opaque(self) -> bool:
        return True  # what it reads of b and h is unknown: assume it may use both


class _Composite(MaskMod):
    op = ""

    def __init__(self, parts: tuple[MaskMod, ...]) -> None:
        self.parts = parts
        self._depth = check_depth(1 + max(p.depth for p in parts))

    @property
    def children(self) -> tuple[MaskMod, ...]:
        return self.parts

    @property
    def depth(self) -> int:
        return self._depth

    def _rebuild(self, children: list[MaskMod]) -> MaskMod:
        return type(self)(tuple(children))

    def _key(self) -> tuple[Any, ...] | None:
        # Children compare with their own __eq__ (identity for tensor masks), so this is a key
        # for value comparison even when a child is identity-compared (see cache_key).
        if not hasattr(self, "_value_key"):  # immutable: found once
            self._value_key = self.parts if all(c._key() is not None for c in self.parts) else None
        return self._value_key

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash((self.op, self.parts))

    def _expr(self) -> str:
        return f" {self.op} ".join(p.wrapped(self._precedence) for p in self.parts)


class _Join(_Composite):
    """Parts joined by one boolean operator, applied alike to their values and to their tile
    bounds (an AND of certainties is certain, and so is an OR)."""

    join: Callable[[Any, Any], Any]

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = self.parts[0](b, h, q_idx, kv_idx)
        for part in self.parts[1:]:
            out = self.join(out, part(b, h, q_idx, kv_idx))
        return out

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        all_true, any_true = self.parts[0].tile_bounds(tiles)
        for part in self.parts[1:]:
            a, n = part.tile_bounds(tiles)
            all_true, any_true = self.join(all_true, a), self.join(any_true, n)
        return all_true, any_true


class _And(_Join):
    op = "&"
    _precedence = AND
    join = staticmethod(operator.and_)

    def _split_boxes(self) -> tuple[list[MaskMod], list[MaskMod]]:
        boxes = [p for p in self.parts if p.is_box]
        return boxes, [p for p in self.parts if not p.is_box]

    @property
    def exact_bounds(self) -> bool:
        # Padding is a box (real queries x real keys): the AND of boxes with one part whose
        # bounds are exact on any rectangle is exact on the tiles clipped to the boxes.
        boxes, rest = self._split_boxes()
        if boxes:
            return len(rest) <= 1 and all(p.exact_on_rectangles for p in rest)
        # Sorted documents & causal: a tile undecided by both straddles the diagonal, so it
        # holds a pair (x, x) (same document, allowed) and a pair above it (masked).
        kinds = sorted(type(p).__name__ for p in self.parts)
        return kinds == ["_Causal", "_Document"] and all(p.exact_bounds for p in self.parts)

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        boxes, rest = self._split_boxes()
        if boxes and self.exact_bounds:
            lo = max(box.box(tiles.b)[0] for box in boxes)
            hi = min(box.box(tiles.b)[1] for box in boxes)
            clipped = tiles.clipped(lo, hi)
            a, n = rest[0].tile_bounds(clipped) if rest else (True, True)
            inside = (tiles.q0 >= lo) & (tiles.q1 < hi) & (tiles.k0 >= lo) & (tiles.k1 < hi)
            meets = (clipped.q0 <= clipped.q1) & (clipped.k0 <= clipped.k1)
            return inside & a, meets & n
        return super().tile_bounds(tiles)


class _Or(_Join):
    op = "|"
    _precedence = OR
    join = staticmethod(operator.or_)


class _Not(_Composite):
    op = "~"
    _precedence = NOT

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ~self.parts[0](b, h, q_idx, kv_idx)

    @property
    def exact_bounds(self) -> bool:
        return self.parts[0].exact_bounds

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        all_true, any_true = self.parts[0].tile_bounds(tiles)
        return ~any_true, ~all_true

    def _expr(self) -> str:
        return "~" + self.parts[0].wrapped(NOT)


def _combine(cls: type[_Join], masks: tuple[MaskModFn, ...], name: str) -> MaskMod:
    if not masks:
        raise ValueError(f"{name}() needs at least one mask, got none; e.g. {name}(causal(), m).")
    parts: list[MaskMod] = []
    for i, m in enumerate(masks):
        mm = as_mask(m, name=f"{name}() argument {i}")
        parts.extend(mm.parts if type(mm) is cls else (mm,))  # a & (b & c) is a & b & c
    return parts[0] if len(parts) == 1 else cls(tuple(parts))


def and_masks(*masks: MaskModFn) -> MaskMod:
    """Intersection: a pair may attend when every mask allows it. Same as ``m1 & m2 & ...``.

    Example:
        >>> import flexmask as fm
        >>> fm.and_masks(fm.causal(), fm.chunked(4))
        causal() & chunked(4)
    """
    return _combine(_And, masks, "and_masks")


def or_masks(*masks: MaskModFn) -> MaskMod:
    """Union: a pair may attend when any mask allows it. Same as ``m1 | m2 | ...``.

    Example:
        >>> import flexmask as fm
        >>> fm.or_masks(fm.sliding_window(256), fm.prefix_lm(64)) & fm.padding([900, 4096])
        (sliding_window(256) | prefix_lm(64)) & padding(lengths=tensor([900, 4096]))
    """
    return _combine(_Or, masks, "or_masks")


def not_mask(mask: MaskModFn) -> MaskMod:
    """Complement: a pair may attend when ``mask`` forbids it. Same as ``~mask``.

    Example:
        >>> import flexmask as fm
        >>> ~(fm.causal() | fm.chunked(2))
        ~(causal() | chunked(2))
    """
    inner = as_mask(mask, name="not_mask() argument")
    return inner.parts[0] if isinstance(inner, _Not) else _Not((inner,))  # ~~m is m
