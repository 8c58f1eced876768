"""Mask expressions: the ``MaskMod`` base class, its algebra, and one small factory per mask.

A mask answers one question: may query ``q_idx`` of batch row ``b`` and head ``h`` attend to key
``kv_idx``? Every ``MaskMod`` is itself a torch ``mask_mod`` (``m(b, h, q_idx, kv_idx)`` returns a
bool tensor, True = may attend), so it goes straight into ``create_block_mask``, ``create_mask``
and ``flex_attention``. Masks combine with ``&``, ``|`` and ``~``; ``repr`` is the expression that
rebuilds the mask.

Tensors a mask captures (lengths, document ids, parents) are copied when the mask is made and stay
tensors, so a new mask with other values at the same shapes never makes ``torch.compile``
recompile. Masks with only scalar parameters are hashable and compare equal when their
expressions are equal; masks holding tensors compare by identity.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import MAX_INDEX, as_device, check_memory

__all__ = [
    "MaskMod",
    "MaskModFn",
    "and_masks",
    "as_mask",
    "causal",
    "chunked",
    "document",
    "full",
    "not_mask",
    "or_masks",
    "packed",
    "padding",
    "prefix_lm",
    "shifted",
    "sliding_window",
    "tree",
]

MaskModFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""Any callable ``(b, h, q_idx, kv_idx) -> BoolTensor``: torch's mask_mod signature."""

# Operator precedence, to parenthesise only where needed: ~ binds tighter than &, & than |.
_ATOM, _NOT, _AND, _OR = 4, 3, 2, 1
MAX_DEPTH = 100
"""Deepest expression flexmask builds (``a & b & c`` is one level; ``~(a & ~b)`` three): every
walk over an expression recurses, and Python's stack is finite."""


class MaskMod:
    """Base class of every flexmask mask; an instance is a torch mask_mod.

    Subclasses implement ``__call__`` and ``_expr``. Scalar-only masks override ``_key`` to give
    value equality; the default is identity. flexmask's own leaves are ``_sealed``: what they
    compute depends only on their fields and ``_own_tensors()``, which is what lets results built
    from them be cached (``cache_key``). A plain callable, or a subclass written elsewhere, may
    read anything, so nothing built from it is cached.
    """

    _precedence = _ATOM
    _sealed = False

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError

    # -- expression -------------------------------------------------------------------------
    def _expr(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self._expr()

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

    # -- algebra ------------------------------------------------------------------------------
    def __and__(self, other: MaskModFn) -> MaskMod:
        return and_masks(self, other)

    def __rand__(self, other: MaskModFn) -> MaskMod:
        return and_masks(other, self)

    def __or__(self, other: MaskModFn) -> MaskMod:
        return or_masks(self, other)

    def __ror__(self, other: MaskModFn) -> MaskMod:
        return or_masks(other, self)

    def __invert__(self) -> MaskMod:
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
        """The tensors this mask captures (for device checks and moves)."""
        return [t for leaf in self.leaves() for t in leaf._own_tensors()]

    def _own_tensors(self) -> list[Tensor]:
        return []

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

    @property
    def exact_bounds(self) -> bool:
        """Whether ``tile_bounds`` is exact: a tile that is neither all-allowed nor all-masked
        is then known to be mixed, without evaluating it."""
        return False

    @property
    def exact_on_rectangles(self) -> bool:
        """Whether ``tile_bounds`` stays exact on any rectangles (it reads only the tiles'
        corners, not per-position tensors)."""
        return self.exact_bounds and not self._own_tensors_by_position()

    def _own_tensors_by_position(self) -> bool:
        return any(leaf._per_position() for leaf in self.leaves())

    def _per_position(self) -> bool:
        return False

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        """What the mask is certain of on each tile, without evaluating it element by element.

        Returns ``(all_true, any_true)``, bool ``[NQ, NK]``: ``all_true`` only where every pair of
        the tile is allowed, ``~any_true`` only where none is. Both may be conservative (a tile
        with neither is simply undecided and gets evaluated). Masks must be bound.
        """
        undecided = torch.zeros_like(tiles.q0 + tiles.k0, dtype=torch.bool)
        return undecided, ~undecided


class Tiles:
    """A grid of ``size x size`` tiles over ``q_len x kv_len`` for batch row ``b`` (the last row
    and column of tiles are cut at the lengths), or the band of it with queries in
    ``[q_from, q_to)`` (``q_from`` a multiple of ``size``). ``q0``/``q1`` (``[NQ, 1]``) and
    ``k0``/``k1`` (``[1, NK]``) are each tile's first and last position, inclusive."""

    def __init__(
        self,
        b: int,
        size: int,
        q_len: int,
        kv_len: int,
        device: torch.device | None = None,
        q_from: int = 0,
        q_to: int | None = None,
    ) -> None:
        self.b, self.size, self.q_len, self.kv_len = b, size, q_len, kv_len
        self.q_from, self.q_to = q_from, min(q_len, q_to or q_len)
        self.k_from = 0
        q0 = torch.arange(q_from, self.q_to, size, device=device)
        k0 = torch.arange(0, kv_len, size, device=device)
        self.q0, self.q1 = q0[:, None], (q0 + size).clamp(max=q_len)[:, None] - 1
        self.k0, self.k1 = k0[None, :], (k0 + size).clamp(max=kv_len)[None, :] - 1

    def clipped(self, lo: int, hi: int) -> Tiles:
        """The tiles cut to positions ``[lo, hi)`` for queries and keys; empty tiles get a first
        position after their last. Only for bounds that read the corners, not ``span``."""
        out = copy.copy(self)
        out.q0, out.q1 = self.q0.clamp(min=lo), self.q1.clamp(max=hi - 1)
        out.k0, out.k1 = self.k0.clamp(min=lo), self.k1.clamp(max=hi - 1)
        return out

    def shifted(self, dq: int, dk: int) -> Tiles:
        """The same tiles seen ``dq`` query and ``dk`` key positions further on."""
        out = copy.copy(self)
        out.q0, out.q1, out.k0, out.k1 = self.q0 + dq, self.q1 + dq, self.k0 + dk, self.k1 + dk
        out.q_from, out.q_to, out.q_len = self.q_from + dq, self.q_to + dq, self.q_len + dq
        out.k_from, out.kv_len = self.k_from + dk, self.kv_len + dk
        return out

    def area(self) -> Tensor:
        """Pairs in each tile, ``[NQ, NK]``."""
        return (self.q1 - self.q0 + 1) * (self.k1 - self.k0 + 1)

    def span(self, values: Tensor, axis: int) -> tuple[Tensor, Tensor]:
        """Per-tile min and max of a per-position tensor along queries (0) or keys (1)."""
        v = values[self.q_from : self.q_to] if axis == 0 else values[self.k_from : self.kv_len]
        pad = (-v.shape[0]) % self.size  # repeat the last value: it changes neither min nor max
        v = torch.cat([v, v[-1:].expand(pad)]).view(-1, self.size)
        lo, hi = v.amin(1), v.amax(1)
        return (lo[:, None], hi[:, None]) if axis == 0 else (lo[None, :], hi[None, :])


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


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
        if all(c._key() is not None for c in self.parts):
            return self.parts
        return None

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash((self.op, self.parts))

    def _expr(self) -> str:
        return f" {self.op} ".join(_wrap(p, self._precedence) for p in self.parts)


class _And(_Composite):
    op = "&"
    _precedence = _AND

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = self.parts[0](b, h, q_idx, kv_idx)
        for part in self.parts[1:]:
            out = out & part(b, h, q_idx, kv_idx)
        return out

    def _split_boxes(self) -> tuple[list[_Padding], list[MaskMod]]:
        boxes = [p for p in self.parts if isinstance(p, _Padding) and p.exact_bounds]
        return boxes, [p for p in self.parts if not any(p is box for box in boxes)]

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
        all_true, any_true = self.parts[0].tile_bounds(tiles)
        for part in self.parts[1:]:
            a, n = part.tile_bounds(tiles)
            all_true, any_true = all_true & a, any_true & n
        return all_true, any_true


class _Or(_Composite):
    op = "|"
    _precedence = _OR

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = self.parts[0](b, h, q_idx, kv_idx)
        for part in self.parts[1:]:
            out = out | part(b, h, q_idx, kv_idx)
        return out

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        all_true, any_true = self.parts[0].tile_bounds(tiles)
        for part in self.parts[1:]:
            a, n = part.tile_bounds(tiles)
            all_true, any_true = all_true | a, any_true | n
        return all_true, any_true


class _Not(_Composite):
    op = "~"
    _precedence = _NOT

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ~self.parts[0](b, h, q_idx, kv_idx)

    @property
    def exact_bounds(self) -> bool:
        return self.parts[0].exact_bounds

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        all_true, any_true = self.parts[0].tile_bounds(tiles)
        return ~any_true, ~all_true

    def _expr(self) -> str:
        return "~" + _wrap(self.parts[0], _NOT)


def check_depth(depth: int) -> int:
    """``depth`` if an expression that deep is allowed (``MAX_DEPTH``), else ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError(
            f"the mask expression is nested {depth} levels deep, more than the {MAX_DEPTH} "
            "flexmask supports; flatten it (a & b & c needs no parentheses, ~~m is m)."
        )
    return depth


def _wrap(mask: MaskMod, outer: int) -> str:
    text = mask._expr()
    return f"({text})" if mask._precedence < outer else text


def _combine(cls: type[_Composite], masks: tuple[MaskModFn, ...], name: str) -> MaskMod:
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


# --------------------------------------------------------------------------------------------
# Validation helpers: raise before any tensor work, naming the argument as the user wrote it.
# --------------------------------------------------------------------------------------------


def _positive_int(value: Any, call: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{call} needs an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{call} needs a value >= {minimum}, got {value}.")
    if value > MAX_INDEX:
        raise ValueError(f"{call} needs a value <= 2**62, got {value}.")
    return value


def capture(tensor: Tensor) -> Tensor:
    """A private copy of a tensor a mask keeps: detached, so later edits of the caller's tensor
    don't leak in, and never an inference tensor, so a mask made under ``torch.inference_mode``
    still serves training."""
    with torch.inference_mode(False):
        return tensor.detach().clone()


def _int_tensor(value: Any, call: str, ranks: tuple[int, ...]) -> Tensor:
    """An integer tensor of one of ``ranks``, captured (see ``capture``)."""
    if isinstance(value, Tensor):
        tensor = value
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:  # an empty list would make a float tensor
            tensor = torch.tensor(value) if len(value) else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            if _all_ints(value):  # ints past int64
                raise ValueError(f"{call} needs integers below 2**63, got {value!r}.") from None
            raise TypeError(f"{call} needs integers, got {value!r} ({err}).") from None
    else:
        raise TypeError(
            f"{call} needs an integer tensor (or a list of ints), got {type(value).__name__}."
        )
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(
            f"{call} needs an integer tensor, got dtype {tensor.dtype}; convert it with "
            ".long() (or pass a list of ints)."
        )
    if tensor.dim() not in ranks:
        shapes = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{call} needs a {shapes} tensor, got shape {tuple(tensor.shape)}.")
    if tensor.is_meta:
        raise ValueError(
            f"{call} got a meta tensor, which holds no values; pass one on 'cpu' or an accelerator."
        )
    return capture(tensor)


def _all_ints(value: Any) -> bool:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return all(_all_ints(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _lengths(value: Any, call: str, needs: str) -> Tensor:
    """A non-empty 1-D tensor of counts >= 0."""
    tensor = _int_tensor(value, call, ranks=(1,))
    if tensor.numel() == 0:
        raise ValueError(f"{call} needs {needs}, got an empty tensor.")
    if int(tensor.min()) < 0:
        raise ValueError(f"{call} needs lengths >= 0, got {tensor.tolist()}.")
    if int(tensor.max()) > MAX_INDEX:
        raise ValueError(f"{call} needs lengths <= 2**62, got {int(tensor.max())}.")
    return tensor


def _fmt_tensor(t: Tensor) -> str:
    if t.is_meta:  # no values to show
        return f"tensor(..., shape={tuple(t.shape)}, device='meta')"
    if t.numel() <= 16:
        return f"tensor({t.tolist()})"
    flat = t.flatten().tolist()
    head = ", ".join(map(str, flat[:3]))
    tail = ", ".join(map(str, flat[-3:]))
    return f"tensor([{head}, ..., {tail}], shape={tuple(t.shape)})"


def _index(t: Tensor, b: Tensor) -> Tensor:
    """``t[b]`` for a per-batch tensor, ``t`` itself for a 0-d one."""
    return t if t.dim() == 0 else t[b]


# --------------------------------------------------------------------------------------------
# Factories. Every picture is checked by tests/test_masks.py against an independent oracle.
# --------------------------------------------------------------------------------------------


class _Full(MaskMod):
    _sealed = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx >= 0

    def _expr(self) -> str:
        return "full()"

    def _key(self) -> tuple[Any, ...]:
        return ()

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        true = torch.ones_like(tiles.q0 + tiles.k0, dtype=torch.bool)
        return true, true


def full() -> MaskMod:
    """Every query sees every key (bidirectional attention).

    Keeps every ``(q_idx, kv_idx)``. For 4 tokens::

        ■ ■ ■ ■
        ■ ■ ■ ■
        ■ ■ ■ ■
        ■ ■ ■ ■

    Example:
        >>> import flexmask as fm
        >>> fm.full()
        full()
        >>> fm.to_dense(fm.full(), 2, 3).all().item()
        True
    """
    return _Full()


class _Causal(MaskMod):
    _sealed = True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    def _expr(self) -> str:
        return "causal()"

    def _key(self) -> tuple[Any, ...]:
        return ()

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        return tiles.k1 <= tiles.q0, tiles.k0 <= tiles.q1


def causal() -> MaskMod:
    """Each query sees itself and the keys before it, top-left aligned (as FlexAttention).

    Keeps ``kv_idx <= q_idx``. For 4 tokens::

        ■ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ■

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.causal(), 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return _Causal()


class _SlidingWindow(MaskMod):
    _sealed = True

    def __init__(self, window: int) -> None:
        self.window = window

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (q_idx - kv_idx < self.window)

    def _expr(self) -> str:
        return f"sliding_window({self.window})"

    def _key(self) -> tuple[Any, ...]:
        return (self.window,)

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t, w = tiles, self.window
        return (t.k1 <= t.q0) & (t.q1 - t.k0 < w), (t.k0 <= t.q1) & (t.q0 - t.k1 < w)


def sliding_window(window: int) -> MaskMod:
    """Causal attention to the last ``window`` keys, the query's own position included.

    Keeps ``kv_idx <= q_idx and q_idx - kv_idx < window`` (Transformers' convention; attention-gym's
    ``generate_sliding_window(w)`` keeps ``w + 1`` keys). For ``window=3``, 5 tokens::

        ■ ⬚ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚ ⬚
        ■ ■ ■ ⬚ ⬚
        ⬚ ■ ■ ■ ⬚
        ⬚ ⬚ ■ ■ ■

    Args:
        window: number of keys each query sees, itself included (>= 1).

    Raises:
        TypeError: if ``window`` is not an int.
        ValueError: if ``window < 1``.

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.sliding_window(2), 3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    return _SlidingWindow(_positive_int(window, "sliding_window(window=...)"))


class _PrefixLM(MaskMod):
    _sealed = True

    def __init__(self, prefix_len: int | Tensor) -> None:
        self.prefix_len = prefix_len

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        p = self.prefix_len
        prefix = _index(p, b) if isinstance(p, Tensor) else p
        return (kv_idx < prefix) | (kv_idx <= q_idx)

    def _expr(self) -> str:
        p = self.prefix_len
        return f"prefix_lm({_fmt_tensor(p) if isinstance(p, Tensor) else p})"

    def _key(self) -> tuple[Any, ...] | None:
        return None if isinstance(self.prefix_len, Tensor) else (self.prefix_len,)

    def _own_tensors(self) -> list[Tensor]:
        return [self.prefix_len] if isinstance(self.prefix_len, Tensor) else []

    def _own_batch(self) -> int | None:
        p = self.prefix_len
        return p.shape[0] if isinstance(p, Tensor) and p.dim() == 1 else None

    def _moved(self, device: torch.device) -> MaskMod:
        p = self.prefix_len
        return _PrefixLM(p.to(device)) if isinstance(p, Tensor) else self

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t, p = tiles, self.prefix_len
        prefix = int(_index(p, torch.tensor(t.b))) if isinstance(p, Tensor) else p
        return (t.k1 < prefix) | (t.k1 <= t.q0), (t.k0 < prefix) | (t.k0 <= t.q1)


def prefix_lm(prefix_len: int | Tensor | Sequence[int]) -> MaskMod:
    """Bidirectional over the first ``prefix_len`` keys, causal after them (prefix-LM, T5/PaLI).

    Keeps ``kv_idx < prefix_len or kv_idx <= q_idx``. ``prefix_len`` may be an int, a 0-d tensor,
    or a ``[B]`` tensor with one prefix length per batch row. For ``prefix_len=2``, 4 tokens::

        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ■

    Args:
        prefix_len: length of the bidirectional prefix (>= 0), int or integer tensor.

    Raises:
        TypeError: if ``prefix_len`` is not an int or integer tensor.
        ValueError: if it is negative or a tensor of rank > 1.

    Example:
        >>> import flexmask as fm
        >>> fm.prefix_lm([1, 3])
        prefix_lm(tensor([1, 3]))
        >>> fm.to_dense(fm.prefix_lm(2), 3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    call = "prefix_lm(prefix_len=...)"
    if isinstance(prefix_len, int) and not isinstance(prefix_len, bool):
        return _PrefixLM(_positive_int(prefix_len, call, minimum=0))
    tensor = _int_tensor(prefix_len, call, ranks=(0, 1))
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{call} needs prefix lengths >= 0, got {tensor.tolist()}.")
    return _PrefixLM(tensor)


class _Padding(MaskMod):
    _sealed = True

    def __init__(self, lengths: Tensor, side: str, start: Tensor | None = None) -> None:
        self.lengths = lengths
        self.side = side
        self.start = start  # left padding: first real position per row, set by bind()

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if self.side == "right":
            n = self.lengths[b]
            return (q_idx < n) & (kv_idx < n)
        if self.start is None:
            raise ValueError(
                "padding(side='left') counts from the end of the sequence, so it needs the "
                "sequence length: build it through flexmask.block_mask / to_dense / "
                "MultiheadFlexAttention, or call mask.bind(q_len, kv_len) first."
            )
        s = self.start[b]
        return (q_idx >= s) & (kv_idx >= s)

    def _expr(self) -> str:
        side = "" if self.side == "right" else f", side={self.side!r}"
        return f"padding(lengths={_fmt_tensor(self.lengths)}{side})"

    def _own_tensors(self) -> list[Tensor]:
        return [self.lengths] if self.start is None else [self.lengths, self.start]

    def _own_batch(self) -> int | None:
        return self.lengths.shape[0]

    def _moved(self, device: torch.device) -> MaskMod:
        start = None if self.start is None else self.start.to(device)
        return _Padding(self.lengths.to(device), self.side, start)

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        # Queries and keys are positions in one sequence frame, whose length is kv_len.
        limit = kv_len if self.side == "left" else max(q_len, kv_len)
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        if longest > limit:
            raise ValueError(
                f"padding(lengths=...) has a length of {longest}, longer than the sequence "
                f"(q_len={q_len}, kv_len={kv_len}); lengths count real tokens, at most the "
                "sequence length."
            )
        if self.side == "right":
            return self
        return _Padding(self.lengths, "left", kv_len - self.lengths)

    @property
    def exact_bounds(self) -> bool:
        return self.side == "right" or self.start is not None

    def box(self, b: int) -> tuple[int, int]:
        """Real positions of row ``b``: ``[lo, hi)``, for queries and keys alike (bound)."""
        if self.side == "right":
            return 0, int(self.lengths[b])
        return int(self.start[b]), 1 << 62  # type: ignore[index]

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t = tiles
        if self.side == "right":
            n = int(self.lengths[t.b])
            return (t.q1 < n) & (t.k1 < n), (t.q0 < n) & (t.k0 < n)
        if self.start is None:
            return super().tile_bounds(tiles)  # unbound: __call__ says how to fix it
        s = int(self.start[t.b])
        return (t.q0 >= s) & (t.k0 >= s), (t.q1 >= s) & (t.k1 >= s)


def padding(lengths: Tensor | Sequence[int], side: str = "right") -> MaskMod:
    """Hide padding: a pair may attend only when both the query and the key are real tokens.

    Token ``i`` of row ``b`` is real iff ``i < lengths[b]`` (``side="right"``) or
    ``i >= S - lengths[b]`` (``side="left"``, counted from the end of the ``S = kv_len`` keys).
    Pad query rows see nothing; attention returns zeros for them, never NaN. Combine with
    ``causal()`` for a decoder. For ``lengths=[3]``, 4 tokens, right padding::

        ■ ■ ■ ⬚
        ■ ■ ■ ⬚
        ■ ■ ■ ⬚
        ⬚ ⬚ ⬚ ⬚

    Args:
        lengths: ``[B]`` integer tensor (or list) of real-token counts, one per batch row.
        side: ``"right"`` (pads after the tokens) or ``"left"`` (pads before, for generation).

    Raises:
        TypeError: if ``lengths`` is not an integer tensor or list of ints.
        ValueError: if ``lengths`` is not 1-D, is negative, or ``side`` is unknown; when
            building, if a length exceeds the sequence.

    Example:
        >>> import flexmask as fm
        >>> fm.padding([3, 1], side="left")
        padding(lengths=tensor([3, 1]), side='left')
        >>> fm.to_dense(fm.padding([2, 3], side="left"), 3, 3)[0, 0].int().tolist()
        [[0, 0, 0], [0, 1, 1], [0, 1, 1]]
    """
    tensor = _lengths(lengths, "padding(lengths=...)", "one length per batch row")
    if side not in ("right", "left"):
        raise ValueError(f"padding(side=...) must be 'right' or 'left', got {side!r}.")
    return _Padding(tensor, side)


class _Document(MaskMod):
    _sealed = True

    def __init__(self, doc_ids: Tensor, name: str = "document", shown: Tensor | None = None):
        self.doc_ids = doc_ids
        self.name = name
        self.shown = doc_ids if shown is None else shown  # what repr prints (packed: lengths)

    def _per_position(self) -> bool:
        return True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ids = self.doc_ids
        n = ids.shape[-1]  # positions past the ids (a longer KV cache) belong to no document
        q, kv = q_idx.clamp(max=n - 1), kv_idx.clamp(max=n - 1)
        same = ids[q] == ids[kv] if ids.dim() == 1 else ids[b, q] == ids[b, kv]
        return same & (q_idx < n) & (kv_idx < n)

    def _expr(self) -> str:
        arg = "lengths" if self.name == "packed" else "doc_ids"
        return f"{self.name}({arg}={_fmt_tensor(self.shown)})"

    def _own_tensors(self) -> list[Tensor]:
        return [self.doc_ids]

    def _own_batch(self) -> int | None:
        return self.doc_ids.shape[0] if self.doc_ids.dim() == 2 else None

    def _moved(self, device: torch.device) -> MaskMod:
        return _Document(self.doc_ids.to(device), self.name, self.shown)

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        n = self.doc_ids.shape[-1]
        if n != max(q_len, kv_len):
            what = "document lengths sum" if self.name == "packed" else "doc_ids has"
            raise ValueError(
                f"{self.name}(...): {what} {n} positions but the mask is built for "
                f"q_len={q_len}, kv_len={kv_len}; give one document id per token "
                f"({max(q_len, kv_len)} in all), with padding as a document of its own."
            )
        return self

    @property
    def exact_bounds(self) -> bool:
        # Sorted ids (packed documents): id ranges that overlap share an id; unsorted may not.
        ids = self.doc_ids
        return bool((ids[..., 1:] >= ids[..., :-1]).all())

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        ids = self.doc_ids if self.doc_ids.dim() == 1 else self.doc_ids[tiles.b]
        q_lo, q_hi = tiles.span(ids, 0)
        k_lo, k_hi = tiles.span(ids, 1)
        one_doc = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        return one_doc, (q_lo <= k_hi) & (k_lo <= q_hi)  # id ranges that do not meet share none


def document(doc_ids: Tensor | Sequence[int]) -> MaskMod:
    """Same document only: tokens attend within their own document (sequence packing).

    Keeps ``doc_ids[q_idx] == doc_ids[kv_idx]`` (``doc_ids[b, ...]`` for a ``[B, S]`` tensor).
    Combine with ``causal()`` for packed causal training. For ``doc_ids=[0, 0, 1, 1]``::

        ■ ■ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ⬚ ⬚ ■ ■
        ⬚ ⬚ ■ ■

    Args:
        doc_ids: ``[S]`` or ``[B, S]`` integer tensor, one document id per token.

    Raises:
        TypeError: if ``doc_ids`` is not an integer tensor.
        ValueError: if it is not 1-D or 2-D; when building, if its length is not the sequence's.

    Example:
        >>> import flexmask as fm
        >>> m = fm.document([0, 0, 1]) & fm.causal()
        >>> m
        document(doc_ids=tensor([0, 0, 1])) & causal()
        >>> fm.to_dense(m, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    call = "document(doc_ids=...)"
    ids = _int_tensor(doc_ids, call, ranks=(1, 2))
    if ids.numel() == 0:
        raise ValueError(
            f"{call} needs one document id per token (and a row per sequence for [B, S]), got "
            f"shape {tuple(ids.shape)}."
        )
    return _Document(ids)


def packed(lengths: Tensor | Sequence[int]) -> MaskMod:
    """Same document only, with documents given by their lengths (packed sequences, cu_seqlens).

    ``packed([2, 2])`` is ``document([0, 0, 1, 1])``; the lengths must add up to the sequence.
    For ``lengths=[1, 3]``::

        ■ ⬚ ⬚ ⬚
        ⬚ ■ ■ ■
        ⬚ ■ ■ ■
        ⬚ ■ ■ ■

    Args:
        lengths: ``[N]`` integer tensor (or list) of document lengths, each >= 0.

    Raises:
        TypeError: if ``lengths`` is not an integer tensor or list of ints.
        ValueError: if it is not 1-D, empty or negative; when building, if the lengths do not
            add up to the sequence length.

    Example:
        >>> import flexmask as fm
        >>> fm.packed([2, 1])
        packed(lengths=tensor([2, 1]))
        >>> fm.to_dense(fm.packed([2, 1]), 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    tensor = _lengths(lengths, "packed(lengths=...)", "at least one document length")
    total = sum(tensor.tolist())  # Python ints: a sum past int64 cannot wrap
    check_memory(total * 8, f"packed(lengths=...) over {total} tokens (one document id each)",
                 "check the lengths: they count tokens", tensor.device)  # fmt: skip
    with torch.inference_mode(False):  # a mask's tensors are never inference tensors
        ids = torch.repeat_interleave(torch.arange(tensor.numel(), device=tensor.device), tensor)
    return _Document(ids, name="packed", shown=tensor)


class _Chunked(MaskMod):
    _sealed = True

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx // self.chunk == kv_idx // self.chunk

    def _expr(self) -> str:
        return f"chunked({self.chunk})"

    def _key(self) -> tuple[Any, ...]:
        return (self.chunk,)

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        t, c = tiles, self.chunk
        one_chunk = (t.q0 // c == t.q1 // c) & (t.k0 // c == t.k1 // c) & (t.q0 // c == t.k0 // c)
        return one_chunk, (t.q0 // c <= t.k1 // c) & (t.k0 // c <= t.q1 // c)


def chunked(chunk: int) -> MaskMod:
    """Same chunk only: the sequence is cut into chunks of ``chunk`` tokens (Llama 4 local layers).

    Keeps ``q_idx // chunk == kv_idx // chunk``; combine with ``causal()`` for chunked causal
    attention. For ``chunk=2``, 5 tokens::

        ■ ■ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚ ⬚
        ⬚ ⬚ ■ ■ ⬚
        ⬚ ⬚ ■ ■ ⬚
        ⬚ ⬚ ⬚ ⬚ ■

    Args:
        chunk: chunk size in tokens (>= 1).

    Raises:
        TypeError: if ``chunk`` is not an int.
        ValueError: if ``chunk < 1``.

    Example:
        >>> import flexmask as fm
        >>> fm.to_dense(fm.chunked(2) & fm.causal(), 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    return _Chunked(_positive_int(chunk, "chunked(chunk=...)"))


class _Tree(MaskMod):
    _sealed = True

    def __init__(self, parents: Tensor, context_len: int, ancestors: Tensor, ctx: Tensor):
        self.parents = parents
        self.context_len = context_len
        self.ancestors = ancestors  # [T, T] bool: ancestors[i, j] = j is i or an ancestor of i
        self.ctx = ctx  # context_len as a 0-d tensor: a new context length never recompiles

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qi = q_idx - self.ctx
        ki = kv_idx - self.ctx
        in_context = (ki < 0) & (kv_idx <= q_idx)  # context keys, causally (tree nodes see all)
        last = self.ancestors.shape[0] - 1  # positions past the tree (a longer KV cache): none
        inside = (qi >= 0) & (ki >= 0) & (qi <= last) & (ki <= last)
        in_tree = inside & self.ancestors[qi.clamp(0, last), ki.clamp(0, last)]
        return in_context | in_tree

    def _expr(self) -> str:
        ctx = f", context_len={self.context_len}" if self.context_len else ""
        return f"tree(parents={_fmt_tensor(self.parents)}{ctx})"

    def _own_tensors(self) -> list[Tensor]:
        return [self.parents, self.ancestors, self.ctx]

    def _moved(self, device: torch.device) -> MaskMod:
        return _Tree(
            self.parents.to(device), self.context_len,
            self.ancestors.to(device), self.ctx.to(device),
        )  # fmt: skip

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        n = self.context_len + self.parents.numel()
        if n != max(q_len, kv_len):
            raise ValueError(
                f"tree(...) covers context_len + nodes = {self.context_len} + "
                f"{self.parents.numel()} = {n} positions but the mask is built for "
                f"q_len={q_len}, kv_len={kv_len}; build it for {n} tokens."
            )
        return self

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        # Every allowed pair has kv <= q. Context keys are certain for a query once it is past
        # them, and for every tree query.
        t, ctx = tiles, self.context_len
        return (t.k1 < ctx) & ((t.k1 <= t.q0) | (t.q0 >= ctx)), t.k0 <= t.q1


def tree(parents: Tensor | Sequence[int], context_len: int = 0) -> MaskMod:
    """Tree attention: each candidate token sees the context, itself and its ancestors.

    Positions ``0 .. context_len-1`` are a causal context; tree node ``i`` sits at position
    ``context_len + i`` and sees key node ``j`` iff ``j`` is ``i`` or an ancestor of ``i`` (follow
    ``parents`` to a root), plus the whole context. Position ids are ``context_len + depth``.
    For ``parents=[-1, 0, 0, 1]`` after ``context_len=1``::

        ■ ⬚ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚ ⬚
        ■ ■ ■ ⬚ ⬚
        ■ ■ ⬚ ■ ⬚
        ■ ■ ■ ⬚ ■

    Args:
        parents: ``[T]`` integer tensor; ``parents[i]`` is the parent node of node ``i`` or -1
            for a root, and every parent comes before its child (``parents[i] < i``).
        context_len: number of context tokens before the tree (>= 0).

    Raises:
        TypeError: if ``parents`` is not an integer tensor or ``context_len`` not an int.
        ValueError: if ``parents`` is not 1-D or empty, has a parent >= its child or < -1, or
            ``context_len < 0``; when building, if ``context_len + T`` is not the sequence length.

    Example:
        >>> import flexmask as fm
        >>> fm.tree([-1, 0, 0], context_len=2)
        tree(parents=tensor([-1, 0, 0]), context_len=2)
        >>> fm.to_dense(fm.tree([-1, 0, 0]), 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    call = "tree(parents=...)"
    p = _int_tensor(parents, call, ranks=(1,))
    context_len = _positive_int(context_len, "tree(context_len=...)", minimum=0)
    n = p.numel()
    if n == 0:
        raise ValueError(f"{call} needs at least one node, got an empty tensor.")
    nodes = torch.arange(n, device=p.device)
    bad = (p >= nodes) | (p < -1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{call}: node {i} has parent {int(p[i])}; every parent must be -1 (a root) or an "
            f"earlier node (0 <= parent < {i}). Order the nodes so parents come first."
        )
    check_memory(n * n, f"tree(parents=...) of {n} nodes (an {n} x {n} ancestor table)",
                 "verify fewer candidates at a time", p.device)  # fmt: skip
    with torch.inference_mode(False):  # a mask's tensors are never inference tensors
        ancestors = torch.eye(n, dtype=torch.bool, device=p.device)
        for i, parent in enumerate(p.tolist()):  # parents come first: their rows are complete
            if parent >= 0:
                ancestors[i] |= ancestors[parent]
        ctx = torch.tensor(context_len, device=p.device)
    return _Tree(p, context_len, ancestors, ctx)


class _Shifted(MaskMod):
    """``inner`` evaluated ``q_offset`` query (and ``kv_offset`` key) positions further on."""

    def __init__(self, inner: MaskMod, q_offset: int | Tensor, kv_offset: int = 0) -> None:
        self.inner = inner
        self.q_offset = q_offset
        self.kv_offset = kv_offset
        check_depth(inner.depth + 1)

    @property
    def depth(self) -> int:
        return self.inner.depth + 1

    def _sealed_leaf(self) -> bool:
        return self.inner.sealed

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.inner(b, h, q_idx + self.q_offset, kv_idx + self.kv_offset)

    def _expr(self) -> str:
        q = self.q_offset
        shown = _fmt_tensor(q) if isinstance(q, Tensor) else str(q)
        kv = f", kv_offset={self.kv_offset}" if self.kv_offset else ""
        return f"shifted({self.inner!r}, q_offset={shown}{kv})"

    def _key(self) -> tuple[Any, ...] | None:
        if isinstance(self.q_offset, Tensor) or self.inner._key() is None:
            return None
        return (self.inner, self.q_offset, self.kv_offset)

    # The inner mask's tensors, batch rows and head use are this mask's own.
    def _own_tensors(self) -> list[Tensor]:
        q = [self.q_offset] if isinstance(self.q_offset, Tensor) else []
        return q + self.inner.tensors()

    def _own_batch(self) -> int | None:
        return self.inner.batch_size

    def _opaque(self) -> bool:
        return self.inner.uses_heads

    def _moved(self, device: torch.device) -> MaskMod:
        q = self.q_offset.to(device) if isinstance(self.q_offset, Tensor) else self.q_offset
        return _Shifted(self.inner.to(device), q, self.kv_offset)

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        # The inner mask sees absolute positions. A tensor offset may change after building, so
        # its queries are assumed to stay inside the keys (bottom-right alignment or before).
        frame_kv = kv_len + self.kv_offset
        frame_q = frame_kv if isinstance(self.q_offset, Tensor) else q_len + self.q_offset
        bound = self.inner.bind(frame_q, frame_kv)
        return self if bound is self.inner else _Shifted(bound, self.q_offset, self.kv_offset)

    @property
    def exact_bounds(self) -> bool:
        return self.inner.exact_bounds

    def _per_position(self) -> bool:
        return self.inner._own_tensors_by_position()

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        return self.inner.tile_bounds(tiles.shifted(int(self.q_offset), self.kv_offset))


def shifted(mask: MaskModFn, q_offset: int | Tensor, kv_offset: int = 0) -> MaskMod:
    """``mask`` in absolute positions: query ``i`` is position ``q_offset + i`` (decode alignment).

    Keeps ``mask(b, h, q_idx + q_offset, kv_idx + kv_offset)``. With ``q_len`` new queries after
    a cache, ``q_offset = kv_len - q_len`` puts them at the end of the ``kv_len`` keys
    (bottom-right alignment). A tensor ``q_offset`` can change without recompiling; its queries
    must stay inside the keys. For ``causal()`` with ``q_offset=2``, 2 queries, 4 keys::

        ■ ■ ■ ⬚
        ■ ■ ■ ■

    Args:
        mask: a flexmask mask or any mask_mod callable, written in absolute positions.
        q_offset: position of the first query (int >= 0, or a 0-d integer tensor).
        kv_offset: position of the first key (int >= 0; sliding-window caches drop old keys).

    Raises:
        TypeError: if an offset is not an int or a 0-d integer tensor.
        ValueError: if an offset is negative.

    Example:
        >>> import flexmask as fm
        >>> m = fm.shifted(fm.causal(), 2)
        >>> m
        shifted(causal(), q_offset=2)
        >>> fm.to_dense(m, 2, 4)[0, 0].int().tolist()
        [[1, 1, 1, 0], [1, 1, 1, 1]]
    """
    inner = as_mask(mask, name="shifted(mask)")
    kv = _positive_int(kv_offset, "shifted(kv_offset=...)", minimum=0)
    if isinstance(q_offset, int) and not isinstance(q_offset, bool):
        return _Shifted(inner, _positive_int(q_offset, "shifted(q_offset=...)", minimum=0), kv)
    q = _int_tensor(q_offset, "shifted(q_offset=...)", ranks=(0,))
    if int(q) < 0:
        raise ValueError(f"shifted(q_offset=...) needs a value >= 0, got {int(q)}.")
    return _Shifted(inner, q, kv)


class _Tokens(MaskMod):
    """Real tokens from a 0/1 ``[B, S]`` attention mask (any pattern): pairs of real tokens, or
    with ``keys_only`` real keys for any query (Transformers' reading of a 2-D mask, and the
    only one that fits cross-attention, where queries and keys are different sequences)."""

    _sealed = True

    def __init__(self, real: Tensor, keys_only: bool = False) -> None:
        self.real = real  # bool [B, S]
        self.keys_only = keys_only

    def _per_position(self) -> bool:
        return True

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        n = self.real.shape[1]  # positions past the mask (a longer KV cache) are not tokens
        keep = self.real[b, kv_idx.clamp(max=n - 1)] & (kv_idx < n)
        if self.keys_only:
            return keep
        return keep & self.real[b, q_idx.clamp(max=n - 1)] & (q_idx < n)

    def _expr(self) -> str:
        keys = ", keys_only=True" if self.keys_only else ""
        return f"from_hf_attention_mask({_fmt_tensor(self.real.long())}{keys})"

    def _own_tensors(self) -> list[Tensor]:
        return [self.real]

    def _own_batch(self) -> int | None:
        return self.real.shape[0]

    def _moved(self, device: torch.device) -> MaskMod:
        return _Tokens(self.real.to(device), self.keys_only)

    def _bind_leaf(self, q_len: int, kv_len: int) -> MaskMod:
        n = self.real.shape[1]
        want, what = (kv_len, "key") if self.keys_only else (max(q_len, kv_len), "position")
        if n != want:
            raise ValueError(
                f"from_hf_attention_mask(...): the attention mask covers {n} positions but the "
                f"mask is built for q_len={q_len}, kv_len={kv_len}; it needs one entry per "
                f"{what} ({want}), the cached ones included."
            )
        return self

    @property
    def exact_bounds(self) -> bool:
        return True

    def tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        real = self.real[tiles.b].long()
        k_lo, k_hi = tiles.span(real, 1)
        if self.keys_only:
            return k_lo == 1, k_hi == 1
        q_lo, q_hi = tiles.span(real, 0)
        return (q_lo == 1) & (k_lo == 1), (q_hi == 1) & (k_hi == 1)
