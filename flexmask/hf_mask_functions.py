"""Transformers' mask functions, read as flexmask masks.

Transformers hands a mask interface a ``mask_function`` built by the factories of
``transformers.masking_utils``: ``and_masks``/``or_masks`` of ``causal_mask_function``, sliding
window overlays, packed-sequence and padding functions. Taken as an opaque callable, such a mask
is evaluated on every (query, key) pair of every call and never cached. ``translate`` recognises
each factory by its code object, reads its arguments from the closure, and builds the same mask
from flexmask's factories: exact tile bounds, cached by value. What it does not recognise (a
model's own mask function, blockwise overlays) it leaves alone, and the
adapter evaluates it as a plain callable: slower, never wrong.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import transformers.masking_utils as mu
from torch import Tensor

from ._checks import MAX_INDEX
from ._lru import LRU
from .masks import (
    MaskMod,
    causal,
    chunked,
    document,
    from_hf_attention_mask,
    full,
    local_window,
    sliding_window,
)

__all__ = ["restarted_documents", "translate"]


def _factories() -> dict[Any, str]:
    """The code object of each closure factory this Transformers version has -> its kind."""
    ones, zeros = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long)
    makers: dict[str, Callable[[], Callable[..., Any]]] = {
        "and": lambda: mu.and_masks(mu.causal_mask_function),
        "or": lambda: mu.or_masks(mu.causal_mask_function),
        "window overlay": lambda: mu.sliding_window_overlay(1),
        "bidirectional window overlay": lambda: mu.sliding_window_bidirectional_overlay(1),
        "chunked overlay": lambda: mu.chunked_overlay(2, zeros[0]),
        "padding": lambda: mu.padding_mask_function(ones),
        "packed": lambda: mu.packed_sequence_mask_function(zeros),
        "remap": lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, zeros),
    }
    codes = {}
    for kind, make in makers.items():
        try:
            codes[make().__code__] = kind
        except AttributeError:  # a factory this Transformers version does not have
            continue
    return codes


_KINDS = _factories()
# Masks that depend on kv_idx - q_idx alone: the same inside a document whatever its start.
_RELATIVE = re.compile(
    r"(causal\(\)|full\(\)|sliding_window\(\d+\)|local_window\(\d+, \d+\)|[ &|~()])+"
)


def translate(mask_function: Callable[..., Any]) -> MaskMod | None:
    """The flexmask mask equal to Transformers' ``mask_function``, or None if flexmask cannot
    see inside it."""
    return _translate(mask_function, in_documents=False)


def _kind(fn: Any) -> str | None:
    return _KINDS.get(getattr(fn, "__code__", None))


def _cells(fn: Callable[..., Any]) -> dict[str, Any]:
    names = fn.__code__.co_freevars
    return dict(zip(names, (c.cell_contents for c in fn.__closure__ or ()), strict=True))


def _translate(fn: Callable[..., Any], in_documents: bool) -> MaskMod | None:
    if fn is mu.causal_mask_function:
        return causal()
    if fn is mu.bidirectional_mask_function:
        return full()
    kind = _kind(fn)
    if kind is None:
        return None
    cells = _cells(fn)
    if kind in ("and", "or"):
        children = list(cells["mask_functions"])
        # remap_positions_for_packed_sequence is only sound next to the packed-sequence mask
        in_documents |= kind == "and" and any(_kind(c) == "packed" for c in children)
        parts: list[MaskMod] = []
        windows = [c for c in children if _kind(c) == "window overlay"]
        if kind == "and" and windows and mu.causal_mask_function in children:
            # Transformers' sliding window, causal & (kv > q - w): one leaf, its usual name
            w = min(_cells(c)["sliding_window"] for c in windows)
            if not isinstance(w, int) or w < 1:
                return None
            parts.append(sliding_window(w))
            children = [
                c for c in children if c not in windows and c is not mu.causal_mask_function
            ]
        for child in children:
            part = _translate(child, in_documents)
            if part is None:
                return None
            parts.append(part)
        if kind == "and":  # full() & m is m (bidirectional_mask_function & a window)
            parts = [p for p in parts if p != full()] or [full()]
        if not parts:  # or_masks() keeps nothing
            return ~full()
        return functools.reduce(operator.and_ if kind == "and" else operator.or_, parts)
    if kind == "window overlay":  # kv > q - w, with no bound above
        w = cells["sliding_window"]
        return local_window(w - 1, MAX_INDEX) if isinstance(w, int) and w >= 1 else None
    if kind == "bidirectional window overlay":  # |q - kv| <= w
        w = cells["sliding_window"]
        return local_window(w, w) if isinstance(w, int) and w >= 0 else None
    if kind == "chunked overlay":  # chunks counted from each row's left padding
        chunk, start = cells["chunk_size"], cells["left_padding"]
        if not isinstance(chunk, int) or chunk < 1 or not isinstance(start, torch.Tensor):
            return None
        return chunked(chunk, start=start.reshape(-1))
    if kind == "padding":  # keys only, as Transformers reads a 2-D mask
        return from_hf_attention_mask(cells["padding_mask"], keys_only=True)
    if kind == "packed":
        return document(cells["packed_sequence_mask"])
    # "remap": the inner mask evaluated at each token's position in its document. Inside one
    # document, positions rise by one with the index, so a mask of kv - q alone is unchanged.
    inner = _translate(cells["mask_function"], in_documents)
    if in_documents and inner is not None and _RELATIVE.fullmatch(repr(inner)):
        return inner
    return None


_DOCUMENTS = LRU("hf_documents", 8)  # one document mask per position_ids tensor, for all layers


def restarted_documents(position_ids: Tensor | None, q_len: int, kv_len: int) -> MaskMod | None:
    """The documents of a packed prefill under ``flexmask_mask``: a new one wherever a position
    id returns to 0, as packed datasets write them; None when no row restarts (or after a cache,
    where the keys' positions are not given).

    Not Transformers' own test (any step other than +1 starts a document), which would cut a
    tree of candidates, whose position ids repeat and fall back, into pieces.
    """
    if position_ids is None or q_len != kv_len or position_ids.shape[-1] != q_len:
        return None
    key = (id(position_ids), position_ids._version)
    hit = _DOCUMENTS.get_recent(key)
    if isinstance(hit, tuple) and hit[0] is position_ids:  # the entry holds the tensor: id is sound
        return hit[1]
    starts = position_ids.reshape(-1, q_len) == 0
    mask = document(starts.long().cumsum(-1)) if bool(starts[:, 1:].any()) else None
    _DOCUMENTS.put(key, (position_ids, mask))
    return mask
