"""flexmask inside Hugging Face Transformers: an attention backend, tree inputs, tree verification.

``register()`` adds an attention function *and* a mask function under one name (Transformers
only builds a mask for implementations that have a mask function: without it, ``attention_mask``
arrives as None and causality is silently lost). Then::

    model = AutoModelForCausalLM.from_config(config, attn_implementation="flexmask")
    model(input_ids, attention_mask=am)                   # as with "sdpa": causal + padding
    model(input_ids, position_ids=p, flexmask_mask=m)     # any flexmask mask, this call only

``flexmask_mask`` is in absolute positions: the queries are the last ``q_len`` positions of the
key/value sequence (after a cache, ``q_offset = kv_len - q_len``).

Needs the ``hf`` extra (``transformers``); imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .attention import dense_mask_for, flex_attend, masked_sdpa
from .convert import from_hf_attention_mask, to_hf_4d
from .masks import MaskMod, as_mask, causal, full, shifted
from .sparse import sparse_attention
from .tree import Tree

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
    )
except ImportError as err:  # pragma: no cover - the hf extra is missing
    raise ImportError(
        "flexmask.hf needs transformers: pip install 'flexmask[hf]' (or transformers)."
    ) from err

__all__ = ["HFMask", "TreeVerification", "register", "tree_inputs", "unregister", "verify_tree"]

BACKENDS = ("auto", "flex", "sdpa", "sparse")
_REGISTERED: dict[str, str] = {}  # name -> backend, for names flexmask registered


@dataclass(frozen=True)
class HFMask:
    """What flexmask's mask function hands its attention function: the layer's mask in local
    coordinates (queries ``0..q_len-1``, keys ``0..kv_len-1``)."""

    mask: MaskMod
    shape: tuple[int, int, int, int]  # (batch, 1, q_len, kv_len), like a 4-D mask


def register(name: str = "flexmask", *, backend: str = "auto") -> str:
    """Register flexmask as a Transformers attention implementation; returns ``name``.

    Args:
        name: the ``attn_implementation`` to use, e.g. ``from_config(..., attn_implementation=
            "flexmask")``; must not be one of Transformers' own.
        backend: ``"flex"`` (compiled FlexAttention on flexmask's BlockMask), ``"sdpa"`` (SDPA
            with flexmask's dense mask), ``"sparse"`` (``flexmask.sparse_attention``: only the
            visited blocks, with backward, for long-sequence training on CPU) or ``"auto"``:
            flex on CUDA, SDPA on CPU, where flex has no backward and compiles again for every
            new length while generating.

    Example:
        >>> import flexmask.hf
        >>> flexmask.hf.register("flexmask-doc")
        'flexmask-doc'
        >>> flexmask.hf.unregister("flexmask-doc")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register(name=...) needs a non-empty str, got {name!r}.")
    if name in AttentionInterface._global_mapping and name not in _REGISTERED:
        raise ValueError(
            f"register(name={name!r}) would replace Transformers' own {name!r} attention; "
            "choose another name, e.g. 'flexmask'."
        )
    if backend not in BACKENDS:
        raise ValueError(f"register(backend=...) must be one of {BACKENDS}, got {backend!r}.")
    AttentionInterface.register(name, _attention_function(backend))
    AttentionMaskInterface.register(name, _mask_function)
    _REGISTERED[name] = backend
    return name


def unregister(name: str = "flexmask") -> None:
    """Remove an implementation ``register`` added (Transformers' own are never touched)."""
    if name not in _REGISTERED:
        raise ValueError(
            f"unregister({name!r}): flexmask registered no such name; it registered "
            f"{sorted(_REGISTERED) or 'none'}."
        )
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    del _REGISTERED[name]


# --------------------------------------------------------------------------------------------
# The mask function and the attention function Transformers calls
# --------------------------------------------------------------------------------------------


def _mask_function(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: Tensor | None = None,
    cache_position: Tensor | None = None,
    **kwargs: Any,
) -> HFMask:
    """Transformers' mask-interface call, answered with a flexmask mask (no tensor work here)."""
    if q_length is None:  # transformers < 5.4 passed the query positions instead
        if cache_position is None:
            raise TypeError("flexmask mask function: got neither q_length nor cache_position.")
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    if kv_length is None:
        raise TypeError("flexmask mask function: Transformers passed no kv_length.")
    q_offset = int(q_offset)
    if mask_function is causal_mask_function:  # the common cases, as structured masks
        mask: MaskMod = causal()
    elif mask_function is bidirectional_mask_function:
        mask = full()
    else:
        mask = as_mask(mask_function, name="Transformers' mask_function")
    if attention_mask is not None and not bool(attention_mask.all()):
        frame = max(q_offset + q_length, kv_offset + kv_length)  # every position, absolute
        am = attention_mask[:, :frame]
        if am.shape[1] < frame:  # a static cache longer than the tokens seen: the rest is empty
            am = torch.nn.functional.pad(am, (0, frame - am.shape[1]), value=False)
        mask = mask & from_hf_attention_mask(am)
    if q_offset or kv_offset:
        mask = shifted(mask, q_offset, kv_offset)
    return HFMask(mask, (batch_size, 1, q_length, kv_length))


def _attention_function(backend: str) -> Callable[..., tuple[Tensor, None]]:
    def flexmask_attention(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        # query: [B, H, q_len, D]; key, value: [B, H_kv, kv_len, D]
        q_len, kv_len = query.shape[2], key.shape[2]
        override = kwargs.get("flexmask_mask")
        if override is not None:  # absolute positions: the queries end where the keys end
            mask = _local(as_mask(override, name="flexmask_mask"), q_len, kv_len)
        elif isinstance(attention_mask, HFMask):
            mask = attention_mask.mask
        elif attention_mask is None:
            mask = _local(causal() if getattr(module, "is_causal", True) else full(), q_len, kv_len)
        elif isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
            dense = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            out = masked_sdpa(
                query, key, value, dense[..., :kv_len], dropout_p=dropout, scale=scaling
            )
            return out.transpose(1, 2).contiguous(), None
        else:
            raise TypeError(
                f"flexmask attention got an attention_mask of type "
                f"{type(attention_mask).__name__}; pass a 2-D padding mask, a 4-D mask, or "
                "flexmask_mask=..."
            )
        use_flex = backend == "flex" or (backend == "auto" and query.device.type == "cuda")
        if backend == "sparse":
            p = dropout if module.training else 0.0
            out = sparse_attention(query, key, value, mask, scale=scaling, dropout_p=p)
        elif use_flex and not (module.training and dropout):
            out = flex_attend(query, key, value, mask, scale=scaling)
        else:
            out = masked_sdpa(query, key, value, dense_mask_for(mask, query, key),
                              dropout_p=dropout, scale=scaling)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None  # [B, q_len, H, D], no weights

    return flexmask_attention


def _local(mask: MaskMod, q_len: int, kv_len: int) -> MaskMod:
    if kv_len < q_len:
        raise ValueError(
            f"flexmask_mask: {q_len} queries but only {kv_len} keys; the queries must be the last "
            "positions of the key/value sequence."
        )
    return shifted(mask, kv_len - q_len) if kv_len > q_len else mask


# --------------------------------------------------------------------------------------------
# Trees of candidates
# --------------------------------------------------------------------------------------------


def tree_inputs(
    context_ids: Tensor, tree: Tree, *, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor | MaskMod]:
    """Model inputs that run ``context + tree`` in one forward pass.

    Returns ``input_ids`` and ``position_ids`` (``[1, C + T]``; a node's position is
    ``C + depth``), ``attention_mask`` (the 4-D additive mask, for eager and SDPA attention) and
    ``flexmask_mask`` (the same mask for the flexmask backend).

    Example:
        >>> import torch, flexmask as fm
        >>> from flexmask.hf import tree_inputs
        >>> x = tree_inputs(torch.tensor([1, 2]), fm.Tree.from_paths([[3, 4], [5]]))
        >>> x["input_ids"].tolist(), x["position_ids"].tolist(), x["attention_mask"].shape
        ([[1, 2, 3, 4, 5]], [[0, 1, 2, 3, 2]], torch.Size([1, 1, 5, 5]))
    """
    ctx = _context(context_ids, "tree_inputs")
    if not isinstance(tree, Tree):
        raise TypeError(f"tree_inputs(tree=...) needs a flexmask.Tree, got {type(tree).__name__}.")
    c = ctx.numel()
    n = c + tree.num_nodes
    mask = tree.mask(c)
    dev = ctx.device
    return {
        "input_ids": torch.cat([ctx, tree.tokens.to(dev)])[None],
        "position_ids": torch.cat([torch.arange(c, device=dev), tree.position_ids(c).to(dev)])[
            None
        ],
        "attention_mask": to_hf_4d(mask, n, dtype=dtype, device=dev),
        "flexmask_mask": mask.to(dev),
    }


@dataclass(frozen=True)
class TreeVerification:
    """What one pass over ``context + tree`` says under greedy decoding."""

    path: list[int]  # accepted nodes, root first (empty: the first token was already wrong)
    tokens: list[int]  # their tokens
    next_token: int  # the model's greedy token after the accepted path
    logits: Tensor  # [T, vocab]: node i's logits (the prediction after node i)
    context_logits: Tensor  # [vocab]: the prediction after the context (for the roots)


def verify_tree(model: torch.nn.Module, context_ids: Tensor, tree: Tree) -> TreeVerification:
    """Verify every candidate path of ``tree`` after ``context_ids`` in one forward pass.

    A node is accepted when its token is the model's greedy prediction after its parent (after
    the context, for a root) and its parent is accepted; the answer is the longest accepted path
    (the first in node order among equally long ones) and the token the model predicts after it.
    Equal to running each path alone, without the cost.

    Raises:
        ValueError: if the context is empty or the tree's positions exceed the model's maximum.
    """
    ctx = _context(context_ids, "verify_tree")
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    deepest = ctx.numel() + int(tree.depth.max())
    if limit is not None and deepest >= limit:
        raise ValueError(
            f"verify_tree: the deepest node sits at position {deepest} but the model has "
            f"{limit} positions; shorten the context or the candidates."
        )
    dtype = next(model.parameters()).dtype
    inputs = tree_inputs(ctx, tree, dtype=dtype)
    kwargs: dict[str, Any] = {
        "input_ids": inputs["input_ids"],
        "position_ids": inputs["position_ids"],
    }
    if getattr(config, "_attn_implementation", None) in _REGISTERED:
        kwargs["flexmask_mask"] = inputs["flexmask_mask"]
    else:
        kwargs["attention_mask"] = inputs["attention_mask"]
    with torch.no_grad():
        logits = model(**kwargs).logits[0]  # [C + T, vocab]
    c = ctx.numel()
    after = logits.argmax(-1)
    ok = [False] * tree.num_nodes
    best = -1
    for i, (tok, parent) in enumerate(
        zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True)
    ):
        expected = after[c - 1] if parent < 0 else after[c + parent]
        ok[i] = int(expected) == tok and (parent < 0 or ok[parent])
        if ok[i] and (best < 0 or tree.depth[i] > tree.depth[best]):
            best = i
    path = tree.ancestors(best) if best >= 0 else []
    return TreeVerification(
        path=path,
        tokens=[int(tree.tokens[i]) for i in path],
        next_token=int(after[c + best] if best >= 0 else after[c - 1]),
        logits=logits[c:],
        context_logits=logits[c - 1],
    )


def _context(context_ids: Tensor, fn: str) -> Tensor:
    if not isinstance(context_ids, Tensor) or context_ids.dtype.is_floating_point:
        raise TypeError(f"{fn}(context_ids=...) needs an integer tensor of token ids.")
    ctx = context_ids[0] if context_ids.dim() == 2 and context_ids.shape[0] == 1 else context_ids
    if ctx.dim() != 1 or ctx.numel() == 0:
        raise ValueError(
            f"{fn}(context_ids=...) needs a non-empty [C] or [1, C] tensor, got shape "
            f"{tuple(context_ids.shape)}."
        )
    return ctx.long()
