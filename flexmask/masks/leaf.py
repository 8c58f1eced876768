"""Declared masks: a factory's mask is a frozen dataclass whose fields say everything it holds.

A ``Leaf`` subclass, decorated with ``@declared``, lists its parameters as fields. From them come
its tensors (moved by ``to``, keyed by identity and version counter), its value key (when it
holds only scalars), its device moves, its depth and whether it is sealed. Adding a mask means
writing its fields, its predicate (``__call__``), its expression (``_expr``), where it can its
``tile_bounds``, and its docstring. A ``Wrapper`` is a leaf around another mask (``inner``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from .base import MaskMod, check_depth

__all__ = ["Leaf", "Wrapper", "at_position", "declared", "fmt_tensor", "row_of"]

T = TypeVar("T")

if TYPE_CHECKING:  # type checkers read `declared` as the dataclass it makes
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**kwargs: object) -> Callable[[T], T]:
        return lambda f: f


@dataclass_transform(frozen_default=True, eq_default=False)
def declared(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass that keeps ``MaskMod``'s equality, hash and repr."""
    return dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)


class Leaf(MaskMod):
    """A mask declared by its fields (see the module docstring)."""

    _sealed = True

    def __post_init__(self) -> None:
        # The fields never change (frozen): read them once, not on every comparison and key.
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        object.__setattr__(self, "_field_values", values)
        check_depth(self.depth)

    def _values(self) -> list[object]:
        return self._field_values  # type: ignore[attr-defined]

    def _masks(self) -> list[MaskMod]:
        return [v for v in self._values() if isinstance(v, MaskMod)]

    def _own_tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        for v in self._values():
            if isinstance(v, Tensor):
                out.append(v)
            elif isinstance(v, MaskMod):
                out.extend(v.tensors())
        return out

    def _key(self) -> tuple[Any, ...] | None:
        if "_value_key" not in self.__dict__:  # immutable: found once
            values = self._values()
            scalar = not any(isinstance(v, Tensor) or (isinstance(v, MaskMod) and v._key() is None)
                             for v in values)  # fmt: skip
            object.__setattr__(self, "_value_key", tuple(values) if scalar else None)
        return self.__dict__["_value_key"]

    def _moved(self, device: torch.device) -> MaskMod:
        changes: dict[str, object] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, (Tensor, MaskMod)):
                changes[f.name] = v.to(device)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @property
    def depth(self) -> int:
        return 1 + max((m.depth for m in self._masks()), default=0)

    def _sealed_leaf(self) -> bool:
        return type(self)._sealed and all(m.sealed for m in self._masks())


class Wrapper(Leaf):
    """A leaf around another mask, ``inner``: its parts are this mask's own (tensors, batch rows,
    head use, per-position tensors, counting from the end)."""

    inner: MaskMod

    def _own_batch(self) -> int | None:
        return self.inner.batch_size

    def _opaque(self) -> bool:
        return self.inner.uses_heads

    def _per_position(self) -> bool:
        return any(leaf._per_position() for leaf in self.inner.leaves())

    def _counts_from_end(self) -> bool:
        return self.inner.counts_from_end


def fmt_tensor(t: Tensor) -> str:
    """A tensor as a mask's repr shows it: all values up to 16, else the ends and the shape."""
    if t.is_meta:  # no values to show
        return f"tensor(..., shape={tuple(t.shape)}, device='meta')"
    if t.numel() <= 16:
        return f"tensor({t.tolist()})"
    flat = t.flatten().tolist()
    head = ", ".join(map(str, flat[:3]))
    tail = ", ".join(map(str, flat[-3:]))
    return f"tensor([{head}, ..., {tail}], shape={tuple(t.shape)})"


def at_position(values: Tensor, b: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """``values[i]`` (``values[b, i]`` for a ``[B, N]`` tensor) with ``i`` clamped into range,
    and whether ``i`` is in range: positions past a per-position tensor (a longer KV cache)
    read its last entry and are reported outside. Pointwise, as FlexAttention's kernels need."""
    n = values.shape[-1]
    at = i.clamp(max=n - 1)
    return (values[at] if values.dim() == 1 else values[b, at]), i < n


def row_of(t: Tensor, b: Tensor) -> Tensor:
    """``t[b]`` for a per-batch tensor, ``t`` itself for a 0-d one."""
    return t if t.dim() == 0 else t[b]
