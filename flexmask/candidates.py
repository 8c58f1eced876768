"""``Tree``: candidate tokens (speculative decoding, beam-like search) verified in one pass.

Candidates that share a prefix share nodes; the tree is flattened so each node comes after its
parent. In one forward pass over ``context + tree`` each node sees the context and its own
ancestors (``tree(...)`` mask) at position ``context_len + depth``, so every node's logits are
those of its path run alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_int, int_tensor
from .masks import MaskMod, tree

__all__ = ["Tree"]


class Tree:
    """A tree of candidate tokens, flattened so that every parent comes before its children.

    Build it with ``Tree.from_paths`` (candidate sequences merged into a trie, in depth-first
    order so each subtree is contiguous) or ``Tree.from_parents`` (any tree, duplicates allowed).

    Example:
        >>> from flexmask import Tree
        >>> t = Tree.from_paths([[5, 6, 7], [5, 6, 8], [5, 9]])
        >>> t.tokens.tolist(), t.parents.tolist(), t.depth.tolist()
        ([5, 6, 7, 8, 9], [-1, 0, 1, 1, 0], [0, 1, 2, 2, 1])
        >>> t.paths.tolist()
        [[0, 1, 2], [0, 1, 3], [0, 4, -1]]
        >>> t.position_ids(context_len=10).tolist()
        [10, 11, 12, 12, 11]
    """

    def __init__(self, tokens: Tensor, parents: Tensor) -> None:
        self.tokens = tokens  # LongTensor[T]
        self.parents = parents  # LongTensor[T], -1 for roots, parents[i] < i
        depth = torch.zeros_like(parents)
        for i, p in enumerate(parents.tolist()):
            if p >= 0:
                depth[i] = depth[p] + 1
        self.depth = depth

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> Tree:
        """Merge candidate token sequences into a trie (shared prefixes become shared nodes)."""
        call = "Tree.from_paths(paths=...)"
        if isinstance(paths, (str, bytes, Tensor)) or not isinstance(paths, Sequence):
            raise TypeError(f"{call} needs a list of token lists, got {type(paths).__name__}.")
        if not paths:
            raise ValueError(f"{call} needs at least one path, got none.")
        trie: dict[int, dict] = {}
        for i, path in enumerate(paths):
            if isinstance(path, (str, bytes)) or not isinstance(path, Sequence):
                raise TypeError(
                    f"{call}: path {i} must be a non-empty list of ints, got "
                    f"{type(path).__name__} {path!r}."
                )
            if not path:
                raise ValueError(f"{call}: path {i} must be a non-empty list of ints, got [].")
            node = trie
            for tok in path:
                if isinstance(tok, bool) or not isinstance(tok, int):
                    raise TypeError(f"{call}: path {i} holds {tok!r}; tokens are ints >= 0.")
                if not 0 <= tok < 2**63:
                    raise ValueError(f"{call}: path {i} holds {tok!r}; tokens are ints >= 0.")
                node = node.setdefault(tok, {})
        # Depth-first in path order, with an explicit stack: a path may be thousands deep.
        tokens: list[int] = []
        parents: list[int] = []
        stack: list[tuple[int, int, dict[int, dict]]] = [
            (-1, tok, children) for tok, children in reversed(trie.items())
        ]
        while stack:
            parent, tok, children = stack.pop()
            tokens.append(tok)
            parents.append(parent)
            here = len(tokens) - 1
            stack.extend((here, t, c) for t, c in reversed(children.items()))
        return cls(torch.tensor(tokens), torch.tensor(parents))

    @classmethod
    def from_parents(
        cls, parents: Tensor | Sequence[int], tokens: Tensor | Sequence[int] | None = None
    ) -> Tree:
        """Any tree given by parent indices (-1 = root, each parent before its child); identical
        sibling nodes are kept. ``tokens`` default to zeros (a mask-only tree)."""
        _check_no_cycle(parents)
        p = int_tensor(parents, "Tree.from_parents(parents=...)", ranks=(1,))
        tree(p)  # the tree() factory's checks: non-empty, -1 <= parent < child
        if tokens is None:
            toks = torch.zeros_like(p)
        else:
            toks = int_tensor(tokens, "Tree.from_parents(tokens=...)", ranks=(1,))
            if toks.numel() != p.numel():
                raise ValueError(
                    f"Tree.from_parents: {toks.numel()} tokens for {p.numel()} nodes; give one "
                    "token per node."
                )
        return cls(toks.long(), p.long())

    # -- structure ----------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.parents.numel()

    @property
    def leaves(self) -> Tensor:
        """Indices of nodes without children, ``LongTensor[P]``, in node order."""
        has_child = torch.zeros(self.num_nodes, dtype=torch.bool)
        has_child[self.parents[self.parents >= 0]] = True
        return (~has_child).nonzero().flatten()

    @property
    def paths(self) -> Tensor:
        """Node indices of every root-to-leaf path, ``LongTensor[P, max_depth + 1]`` padded with
        -1 (Medusa's retrieve indices)."""
        rows = [self.ancestors(int(leaf)) for leaf in self.leaves]
        width = int(self.depth.max()) + 1
        out = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, nodes in enumerate(rows):
            out[r, : len(nodes)] = torch.tensor(nodes)
        return out

    def ancestors(self, i: int) -> list[int]:
        """Node ``i``'s path from its root: ``[root, ..., parent, i]``."""
        last = self.num_nodes - 1
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"Tree.ancestors(i=...) needs a node in 0..{last}, got {i!r}.")
        if not 0 <= i <= last:
            raise ValueError(f"Tree.ancestors(i=...) needs a node in 0..{last}, got {i!r}.")
        path = [i]
        while (p := int(self.parents[path[-1]])) >= 0:
            path.append(p)
        return path[::-1]

    def position_ids(self, context_len: int = 0) -> Tensor:
        """``context_len + depth``: each node at the position it has on its own path."""
        return check_int(context_len, "Tree.position_ids(context_len=...)", minimum=0) + self.depth

    def mask(self, context_len: int = 0) -> MaskMod:
        """The ``tree(parents, context_len)`` mask: the context causal, each node seeing the
        context, itself and its ancestors."""
        return tree(self.parents, context_len)

    def __repr__(self) -> str:
        return f"Tree(tokens={self.tokens.tolist()}, parents={self.parents.tolist()})"


def _check_no_cycle(parents: object) -> None:
    """A cycle gets its own message (the order check alone would only say "parent >= child")."""
    if isinstance(parents, Tensor):
        values = parents.tolist() if parents.dim() == 1 else None
    elif isinstance(parents, Sequence) and not isinstance(parents, (str, bytes)):
        values = list(parents)
    else:
        values = None
    if not values or not all(isinstance(v, int) and -1 <= v < len(values) for v in values):
        return  # tree() reports the rest
    for start in range(len(values)):
        node, steps = start, 0
        while node != -1 and steps <= len(values):
            node, steps = values[node], steps + 1
        if node != -1:
            raise ValueError(
                f"Tree.from_parents(parents=...) has a cycle through node {start}: following "
                "parents never reaches a root (-1)."
            )
