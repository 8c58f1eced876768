"""flexmask inside Hugging Face Transformers: an attention backend, tree inputs, tree verification.

``register()`` adds an attention function *and* a mask function under one name (Transformers
only builds a mask for implementations that have a mask function: without it, ``attention_mask``
arrives as None and causality is silently lost). Then::

    model = AutoModelForCausalLM.from_config(config, attn_implementation="flexmask")
    model(input_ids, attention_mask=am)                   # as with "sdpa": causal + padding
    model(input_ids, position_ids=p, flexmask_mask=m)     # any flexmask mask, this call only

``flexmask_mask`` is in absolute positions: the queries are the last ``q_len`` positions of the
key/value sequence (after a cache, ``q_offset = kv_len - q_len``). Like a 4-D ``attention_mask``
in Transformers, it replaces the model's mask on every layer (sliding layers included).

The attention function honours what Transformers' own eager, SDPA and flex functions honour:
``scaling``, ``dropout``, ``softcap`` (Gemma2), attention sinks (``s_aux``, GPT-OSS; ``sinks``),
``position_bias`` (T5), ``is_causal`` and ``sliding_window`` (where it builds the mask itself). A
2-D padding mask masks keys only, as in Transformers, so cross-attention over a padded encoder
is right. Any other keyword that could change the result is refused with an error naming it,
never ignored.

Needs the ``hf`` extra (``transformers``); imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .candidates import Tree
from .coverage import DenseMask
from .dense import to_hf_4d
from .dispatch import BACKENDS, Call, choose
from .hf_mask_functions import restarted_documents
from .masks import (
    MaskMod,
    as_mask,
    causal,
    full,
    local_window,
    shifted,
    sliding_window,
)
from .runners import RUNNERS, MaskForms, Options, ScoreModFn

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as err:  # pragma: no cover - the hf extra is missing
    raise ImportError(
        "flexmask.hf needs transformers: pip install 'flexmask[hf]' (or transformers)."
    ) from err

from .hf_mask import HFMask, mask_interface  # after the check: it imports transformers too

__all__ = ["HFMask", "TreeVerification", "register", "tree_inputs", "unregister", "verify_tree"]

_REGISTERED: dict[str, str] = {}  # name -> backend, for names flexmask registered
# Transformers' own implementations, as the installed version lists them ("eager" is built into
# every model and has a mask function only); read before flexmask registers anything.
_TRANSFORMERS_NAMES = frozenset(
    {"eager", *AttentionInterface._global_mapping, *AttentionMaskInterface._global_mapping}
)
# Keywords models pass that cannot change attention here: what other kernels use (flash
# attention's varlen tensors: the mask already holds the packing, from position_ids) and
# bookkeeping. Every other keyword is either honoured or refused.
_NO_EFFECT = frozenset({
    "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
    "cache_position", "past_key_values", "past_key_value", "use_cache", "layer_idx",
    "output_hidden_states", "output_router_logits", "num_items_in_batch", "return_dict",
    "kernel_options", "deterministic", "target_dtype", "query_length",
    "encoder_hidden_states",  # BERT passes it along: the keys and values are made from it
})  # fmt: skip


def register(name: str = "flexmask", *, backend: str = "auto") -> str:
    """Register flexmask as a Transformers attention implementation; returns ``name``.

    Args:
        name: the ``attn_implementation`` to use, e.g. ``from_config(..., attn_implementation=
            "flexmask")``; must not be one of Transformers' own.
        backend: ``"flex"`` (compiled FlexAttention on flexmask's BlockMask), ``"sdpa"`` (SDPA
            with flexmask's dense mask), ``"sparse"`` (``flexmask.sparse_attention``: only the
            visited blocks, with backward, for long-sequence training on CPU) or ``"auto"``:
            the policy ``MultiheadFlexAttention`` uses (``flexmask.dispatch.choose``): flex on
            CUDA; on CPU, SDPA for decoding steps and the sparse path or SDPA by cost otherwise
            (never flex, which has no CPU backward and would compile again for every new length
            of Transformers' growing caches).

    Example:
        >>> import flexmask.hf
        >>> flexmask.hf.register("flexmask-doc")
        'flexmask-doc'
        >>> flexmask.hf.unregister("flexmask-doc")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register(name=...) needs a non-empty str, got {name!r}.")
    if name in _TRANSFORMERS_NAMES:
        raise ValueError(
            f"register(name={name!r}) would replace Transformers' own {name!r} attention; "
            "choose another name, e.g. 'flexmask'."
        )
    taken = name in AttentionInterface._global_mapping or name in (
        AttentionMaskInterface._global_mapping
    )
    if taken and name not in _REGISTERED:
        raise ValueError(
            f"register(name={name!r}): {name!r} is already registered by someone else; choose "
            "another name, e.g. 'flexmask'."
        )
    if any(c in name for c in "|:/"):
        raise ValueError(
            f"register(name={name!r}): Transformers reads '|', ':' and '/' in attention names "
            "itself (paged attention, hub kernels); choose a name without them."
        )
    if backend not in BACKENDS:
        raise ValueError(f"register(backend=...) must be one of {BACKENDS}, got {backend!r}.")
    AttentionInterface.register(name, _attention_function(backend))
    AttentionMaskInterface.register(name, mask_interface)
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
# The attention function Transformers calls (its mask function is hf_mask.mask_interface)
# --------------------------------------------------------------------------------------------


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
        f = _Features.read(module, kwargs)
        forms, mask_bias = _layer_forms(attention_mask, f, query, key)
        biases = [b for b in (f.bias, mask_bias) if b is not None]  # T5's, a float 4-D mask's
        options = Options(
            scale=scaling,
            dropout_p=dropout,  # Transformers passes 0 outside training
            score_mod=f.score_mod(),
            sinks=f.sinks,
            bias=biases[0] + biases[1] if len(biases) == 2 else (biases[0] if biases else None),
        )
        call = Call(
            q=query,
            s_kv=key.shape[2],
            needs_grad=torch.is_grad_enabled() and query.requires_grad,
            dropout=dropout > 0,
            score_mod=options.score_mod is not None,
            softmax_only=options.softmax_only,
            decoding=key.shape[2] > query.shape[2],  # past keys in Transformers' cache
            shapes_vary=True,  # its caches grow by a token a step: flex would recompile
        )
        out = RUNNERS[choose(backend, call, forms)](query, key, value, forms, options)
        return out.transpose(1, 2).contiguous(), None  # [B, q_len, H, D], no weights

    return flexmask_attention


@dataclass(frozen=True)
class _Features:
    """What a call asks of attention besides the mask, read from the keywords Transformers
    passes; anything that could change the result and is not honoured here is refused."""

    softcap: float | None
    sinks: Tensor | None  # [H] (s_aux) or broadcastable to [B, H, q_len, 1] (sinks)
    bias: Tensor | None  # additive, broadcastable to [B, H, q_len, kv_len] (T5 position_bias)
    is_causal: bool
    sliding_window: int | None
    override: MaskMod | None  # flexmask_mask
    position_ids: Tensor | None  # [B or 1, q_len]: documents of a packed row, with the override

    @classmethod
    def read(cls, module: torch.nn.Module, kwargs: dict[str, Any]) -> _Features:
        unknown = sorted(set(kwargs) - _NO_EFFECT - {
            "softcap", "s_aux", "sinks", "position_bias", "is_causal", "sliding_window",
            "flexmask_mask", "output_attentions",
        })  # fmt: skip
        if unknown:
            raise ValueError(
                f"flexmask attention was passed {', '.join(map(repr, unknown))}, which it does not "
                "know how to honour; rather than ignore what may change the result, it stops. "
                "Use attn_implementation='eager' or 'sdpa' for this model, or open an issue."
            )
        if kwargs.get("output_attentions"):
            raise ValueError(
                "flexmask attention returns no attention weights (output_attentions=True); use "
                "attn_implementation='eager' to get them."
            )
        if kwargs.get("s_aux") is not None and kwargs.get("sinks") is not None:
            raise ValueError("flexmask attention got both s_aux and sinks; pass one of them.")
        sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
        override = kwargs.get("flexmask_mask")
        is_causal = kwargs.get("is_causal")
        return cls(
            softcap=kwargs.get("softcap"),
            sinks=sinks,
            bias=kwargs.get("position_bias"),
            is_causal=getattr(module, "is_causal", True) if is_causal is None else is_causal,
            sliding_window=kwargs.get("sliding_window"),
            override=None if override is None else as_mask(override, name="flexmask_mask"),
            position_ids=kwargs.get("position_ids"),
        )

    def score_mod(self) -> ScoreModFn | None:
        """Soft-capping as a score_mod (Gemma2: ``cap * tanh(score / cap)`` on scaled scores)."""
        cap = self.softcap
        if cap is None:
            return None

        def softcap(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return cap * torch.tanh(score / cap)

        return softcap


def _layer_forms(
    attention_mask: Any, f: _Features, query: Tensor, key: Tensor
) -> tuple[MaskForms, Tensor | None]:
    """This layer's mask in local coordinates (and the bias an additive float 4-D mask
    carries)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if f.override is not None:  # absolute positions: the queries end where the keys end
        documents = restarted_documents(f.position_ids, q_len, kv_len)  # a packed row
        mask = f.override if documents is None else f.override & documents
        return MaskForms(_local(mask, q_len, kv_len)), None
    if isinstance(attention_mask, HFMask):
        return attention_mask.forms(query, kv_len), None  # causality and windows are in it
    if attention_mask is None:
        mask = causal() if f.is_causal else full()
        if f.sliding_window is not None:
            mask = mask & _window(f.sliding_window, f.is_causal)
        return MaskForms(_local(mask, q_len, kv_len)), None
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
        dense, bias = _dense_4d(attention_mask[..., :kv_len])
        return MaskForms(dense=dense), bias
    raise TypeError(
        f"flexmask attention got an attention_mask of type {type(attention_mask).__name__}; "
        "pass a 2-D padding mask, a 4-D mask, or flexmask_mask=..."
    )


def _local(mask: MaskMod, q_len: int, kv_len: int) -> MaskMod:
    """A mask in absolute positions, seen from queries that are the last ``q_len`` of ``kv_len``
    positions."""
    if kv_len < q_len:
        raise ValueError(
            f"flexmask_mask: {q_len} queries but only {kv_len} keys; the queries must be the last "
            "positions of the key/value sequence."
        )
    return shifted(mask, kv_len - q_len) if kv_len > q_len else mask


def _window(window: int, is_causal: bool) -> MaskMod:
    """Transformers' sliding window overlays: ``q - kv < w`` on causal layers, ``|q - kv| < w``
    on bidirectional ones (the ``sliding_window`` that models pass to attention functions)."""
    return sliding_window(window) if is_causal else local_window(window - 1, window - 1)


def _dense_4d(mask: Tensor) -> tuple[DenseMask, Tensor | None]:
    """A 4-D mask as Transformers models take it: bool (True = attend) or additive float (0 to
    attend, ``finfo.min`` or ``-inf`` to mask, other values added to the scores: returned as a
    bias). Integer masks are refused: 0/1 read as additive would invert them silently."""
    if mask.dtype == torch.bool:
        return DenseMask.of(mask), None
    if not mask.dtype.is_floating_point:
        raise TypeError(
            f"flexmask attention got a 4-D attention_mask of dtype {mask.dtype}; Transformers "
            "reads a 4-D mask as bool (True = attend) or additive float (0 = attend, "
            "finfo(dtype).min = masked), so an integer 0/1 mask is ambiguous. Build it with "
            "flexmask.to_hf_4d(mask, q_len, kv_len, dtype=model.dtype), or pass mask.bool()."
        )
    allowed = mask > torch.finfo(mask.dtype).min
    bias = mask.where(allowed, 0.0)
    return DenseMask.of(allowed), bias if bool(bias.any()) else None


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
