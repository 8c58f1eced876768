"""Score mods: what a ``score_mod`` does to each score before the softmax, as named objects
with a formula and a ``repr``. ``alibi``, ``softcap``, ``relative_bias``, and ``compose`` to
chain them. Each is a torch ``score_mod`` ``(score, b, h, q_idx, kv_idx) -> score``, so it runs
in compiled FlexAttention and in flexmask's explicit softmax (``MultiheadFlexAttention(...,
score_mod=...)``, ``flex_attend``, ``save_scores_png``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_int

__all__ = ["ScoreMod", "alibi", "compose", "is_additive", "relative_bias", "softcap"]


class ScoreMod:
    """A named score_mod: ``mod(score, b, h, q_idx, kv_idx)`` returns the new score."""

    additive: bool = False
    """True when the mod adds a term that does not depend on the score (``score + f(b, h, q_idx,
    kv_idx)``): the sparse path then adds ``f`` as a bias on each run of visited blocks."""

    reads_positions: bool = True
    """Whether the mod reads ``q_idx`` or ``kv_idx`` (False only where known: ``softcap``)."""

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors ``f`` reads whose gradients must reach them (``relative_bias``'s table)."""
        return ()

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        raise NotImplementedError


class _Alibi(ScoreMod):
    additive = True

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads
        self.power = 2 ** int(math.log2(num_heads))  # the largest power of two <= num_heads

    def slope(self, h: Tensor) -> Tensor:
        # The paper's slopes: 2^(-8i/n) for i = 1..n, n the largest power of two <= H; past n,
        # every other slope of 2n heads (2^(-8j/(2n)), j = 1, 3, 5, ...), as Transformers builds.
        n = self.power
        first = torch.exp2(-8.0 * (h + 1) / n)
        rest = torch.exp2(-8.0 * (2 * (h - n) + 1) / (2 * n))
        return torch.where(h < n, first, rest)

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        return score + (kv_idx - q_idx) * self.slope(h)

    def __repr__(self) -> str:
        return f"alibi({self.num_heads})"


def alibi(num_heads: int) -> ScoreMod:
    """ALiBi (Press et al.): ``score + slope[h] * (kv_idx - q_idx)``, a linear penalty on distance.

    The slopes are the paper's: ``2^(-8i/n)`` for head ``i = 1..n``, with ``n = num_heads`` a
    power of two; otherwise ``n`` is the largest power of two below, and the other heads take
    every other slope of ``2n`` heads (Transformers' ``build_alibi_tensor``). Equal to
    attention-gym's ``generate_alibi_bias`` for a power of two.

    Args:
        num_heads: query heads (>= 1).

    Raises:
        TypeError, ValueError: if ``num_heads`` is not a positive int.

    Example:
        >>> import torch, flexmask as fm
        >>> mod = fm.alibi(4)
        >>> float(mod(torch.tensor(0.0), 0, torch.tensor(0), torch.tensor(3), torch.tensor(1)))
        -0.5
    """
    return _Alibi(check_int(num_heads, "alibi(num_heads=...)"))


class _Softcap(ScoreMod):
    reads_positions = False

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)

    def __repr__(self) -> str:
        return f"softcap({self.cap!r})"


def softcap(cap: float) -> ScoreMod:
    """Soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``, scores squashed into
    ``(-cap, cap)`` (on the scaled scores, as Gemma 2 does).

    Args:
        cap: the bound, a positive number.

    Raises:
        TypeError: if ``cap`` is not a number.
        ValueError: if it is not positive and finite.

    Example:
        >>> import torch, flexmask as fm
        >>> round(float(fm.softcap(50.0)(torch.tensor(1000.0), 0, 0, 0, 0)), 3)
        50.0
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise TypeError(f"softcap(cap=...) needs a number, got {type(cap).__name__} {cap!r}.")
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap(cap=...) needs a positive finite number, got {cap!r}.")
    return _Softcap(float(cap))


class _RelativeBias(ScoreMod):
    additive = True

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.radius = (table.shape[1] - 1) // 2

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.table,)

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        r = self.radius
        return score + self.table[h, (kv_idx - q_idx).clamp(-r, r) + r]

    def __repr__(self) -> str:
        heads, width = self.table.shape
        return f"relative_bias(table of {heads} heads x {width} offsets)"


def relative_bias(table: Tensor) -> ScoreMod:
    """A learned relative-position bias: ``score + table[h, clamp(kv_idx - q_idx, -R, R) + R]``.

    ``table`` is ``[H, 2R + 1]``: one bias per head and offset, offsets beyond ``R`` share the
    last one (T5-like buckets without the log spacing). The table is used as given, not copied,
    so that a ``nn.Parameter`` trains: its gradient reaches it.

    Args:
        table: ``[H, 2R + 1]`` floating tensor (an odd number of columns).

    Raises:
        TypeError: if ``table`` is not a floating tensor.
        ValueError: if it is not 2-D with an odd number of columns.

    Example:
        >>> import torch, flexmask as fm
        >>> table = torch.tensor([[-1.0, 0.0, 1.0]])  # R = 1: before, same, after
        >>> mod, q, kv = fm.relative_bias(table), torch.tensor(5), torch.tensor(9)
        >>> float(mod(torch.tensor(0.0), 0, torch.tensor(0), q, kv))  # 4 after: capped at R
        1.0
    """
    if not isinstance(table, Tensor) or not table.dtype.is_floating_point:
        got = table.dtype if isinstance(table, Tensor) else type(table).__name__
        raise TypeError(f"relative_bias(table=...) needs a floating tensor [H, 2R + 1], got {got}.")
    if table.dim() != 2 or table.shape[1] % 2 == 0:
        raise ValueError(
            "relative_bias(table=...) needs a [H, 2R + 1] tensor (an odd number of offsets, the "
            f"middle one for kv_idx == q_idx), got shape {tuple(table.shape)}."
        )
    return _RelativeBias(table)


class _Compose(ScoreMod):
    def __init__(self, mods: tuple[ScoreMod, ...]) -> None:
        self.mods = mods
        self.additive = all(is_additive(mod) for mod in mods)
        self.reads_positions = any(reads_positions(mod) for mod in mods)

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for mod in self.mods if isinstance(mod, ScoreMod) for t in mod.tensors())

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        for mod in self.mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    def __repr__(self) -> str:
        return f"compose({', '.join(map(repr, self.mods))})"


def compose(*mods: object) -> ScoreMod:
    """The score_mods applied in order: ``compose(alibi(8), softcap(30.0))`` adds ALiBi, then
    caps. Plain score_mod functions may be among them.

    Raises:
        TypeError: if one of them is not callable.
        ValueError: if none is given.

    Example:
        >>> import flexmask as fm
        >>> fm.compose(fm.alibi(8), fm.softcap(30.0))
        compose(alibi(8), softcap(30.0))
    """
    if not mods:
        raise ValueError("compose(...) needs at least one score_mod.")
    for i, mod in enumerate(mods):
        if not callable(mod):
            raise TypeError(
                f"compose(...): argument {i} is {type(mod).__name__}, not a score_mod "
                "(score, b, h, q_idx, kv_idx) -> score."
            )
    return _Compose(tuple(mods))  # type: ignore[arg-type]


class _QueriesFrom(ScoreMod):
    """``mod`` with query ``i`` of row ``b`` at position ``start[b] + i``: a call after a KV
    cache holding ``start[b]`` tokens, whose keys are at their absolute positions already."""

    def __init__(self, mod: Callable[..., Tensor], start: Tensor) -> None:
        self.mod, self.start = mod, start
        self.additive = is_additive(mod)

    def tensors(self) -> tuple[Tensor, ...]:
        return self.mod.tensors() if isinstance(self.mod, ScoreMod) else ()

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        return self.mod(score, b, h, q_idx + self.start[b], kv_idx)

    def __repr__(self) -> str:
        return f"{self.mod!r} with queries from positions {self.start.tolist()}"


def queries_from(score_mod: Callable[..., Tensor], start: Tensor) -> ScoreMod:
    """``score_mod`` for a call whose query ``i`` of row ``b`` is at position ``start[b] + i``
    (``start [B]``: the tokens a KV cache held before the call). Without it, a relative bias
    would measure a decode step's distances from position 0."""
    return _QueriesFrom(score_mod, start)


def reads_positions(score_mod: object) -> bool:
    """Whether ``score_mod`` may read the query and key indices: True for a plain function,
    whose body flexmask cannot see."""
    return not isinstance(score_mod, ScoreMod) or score_mod.reads_positions


def is_additive(score_mod: object) -> bool:
    """Whether ``score_mod`` is one of flexmask's that add a term independent of the score
    (``alibi``, ``relative_bias`` and their ``compose``): the sparse path can apply those. A plain
    function cannot say so, and counts as not additive."""
    return isinstance(score_mod, ScoreMod) and score_mod.additive
