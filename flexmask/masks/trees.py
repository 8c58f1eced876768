"""Trees of candidate tokens: ``tree`` (each node sees the context and its ancestors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_int, check_memory, int_tensor
from .base import MaskMod
from .leaf import Leaf, declared, fmt_tensor
from .tiles import Tiles

__all__ = ["tree"]


@declared
class _Tree(Leaf):
    parents: Tensor  # [T]: -1 for a root, else an earlier node
    context_len: int
    ancestors: Tensor  # [T, T] bool: ancestors[i, j] = j is i or an ancestor of i
    ctx: Tensor  # context_len as a 0-d tensor: a new context length never recompiles

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
        return f"tree(parents={fmt_tensor(self.parents)}{ctx})"

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
    p = int_tensor(parents, call, ranks=(1,))
    context_len = check_int(context_len, "tree(context_len=...)", minimum=0)
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
