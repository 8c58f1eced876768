"""The one backend policy: the facts of a call in, a backend out, each rule a named predicate.

``MultiheadFlexAttention`` (with and without a KV cache) and the Transformers adapter both call
``choose``. With ``backend="auto"`` the first rule that answers decides; an explicit backend is
checked against what it can do, and refused with a reason when it cannot. What a rule needs to
decide (the BlockMask and its sparse plan) is built once, in the call's ``MaskForms``, and the
runner reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from . import tuning
from .runners import MaskForms, backward_tiles_refuse
from .sparse_plan import plan

__all__ = ["BACKENDS", "SPARSE_MAX_DENSITY", "Backend", "Call", "choose"]

Backend = Literal["flex", "sdpa", "sparse"]
BACKENDS: tuple[str, ...] = ("auto", *get_args(Backend))
SPARSE_MAX_DENSITY = 0.85
"""The cost model: ``auto`` on CPU runs the sparse path when the BlockMask's visited fraction of
blocks (gathered blocks counted twice, ``flexmask.sparse.Plan.cost``) is at most this, SDPA with
the dense mask above it. Chosen from ``benchmarks/dispatch.py`` on one machine (BENCHMARKS.md),
and used only where measuring is off: otherwise ``flexmask.tuning`` measures the threshold on the
machine that runs (per dtype, inference and training). Override it per module with
``MultiheadFlexAttention(sparse_max_density=...)``."""
FLEX_DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Call:
    """The facts of one attention call that decide its backend."""

    q: Tensor  # [B, H, S, D]: device, dtype, query count
    s_kv: int
    needs_grad: bool  # autograd will run through this call
    dropout: bool  # attention dropout is on
    score_mod: bool  # scores modified element by element (a score_mod, soft-capping)
    softmax_only: bool  # sinks or an additive bias: only the explicit softmax applies them
    decoding: bool  # queries after a KV cache (flexmask's, or Transformers' past keys)
    shapes_vary: bool  # a new shape every call (Transformers' growing caches): flex recompiles
    max_density: float | None = None  # the caller's threshold; None: measured (flexmask.tuning)
    additive_scores: bool = False  # the score_mod adds a bias (alibi, relative_bias): sparse too

    @property
    def on_cpu(self) -> bool:
        return self.q.device.type == "cpu"

    @property
    def plain_scores(self) -> bool:
        """Scores as ``q k^T`` gives them: no score_mod, soft-capping, sinks or bias."""
        return not self.score_mod and not self.softmax_only

    @property
    def sparse_runs(self) -> bool:
        """The sparse path can compute this call: plain scores, or a score_mod it adds as a
        bias on its runs."""
        return self.plain_scores or (self.additive_scores and not self.softmax_only)

    @property
    def flex_runs(self) -> bool:
        """FlexAttention can compute this call: no dropout; on CPU, no backward and one of its
        dtypes; and shapes that stay (each new one is a compile of seconds)."""
        cpu_ok = not self.needs_grad and self.q.dtype in FLEX_DTYPES_CPU and not self.shapes_vary
        return not self.dropout and (not self.on_cpu or cpu_ok)


Rule = Callable[[Call, MaskForms], Backend | None]


def nothing_to_mask(call: Call, forms: MaskForms) -> Backend | None:
    """No mask, or ``full()``: SDPA without a mask."""
    return "sdpa" if forms.none and call.plain_scores else None


def square_causal(call: Call, forms: MaskForms) -> Backend | None:
    """``causal()`` with as many queries as keys: SDPA's ``is_causal`` kernel skips the upper
    triangle and was fastest in every causal case of ``make bench`` (BENCHMARKS.md)."""
    return "sdpa" if call.plain_scores and forms.causal(call.q, call.s_kv) else None


def scores_need_softmax(call: Call, forms: MaskForms) -> Backend | None:
    """Sinks and biases act on the whole row of scores: only the explicit softmax has them."""
    return "sdpa" if call.softmax_only else None


def score_mod_where_flex_runs(call: Call, forms: MaskForms) -> Backend | None:
    """A score_mod runs in flex's kernel where flex can run; else an additive one (ALiBi, a
    relative bias) on CPU goes on to the sparse-or-dense rule (the sparse path adds it as a bias
    on its runs: O(S * window) under a window), and any other in the explicit softmax."""
    if not call.score_mod:
        return None
    if call.flex_runs and not _flex_cannot_train(call, forms):
        return "flex"
    return None if call.on_cpu and call.sparse_runs else "sdpa"


def cpu_decoding(call: Call, forms: MaskForms) -> Backend | None:
    """Decoding on CPU: the dense step mask is only ``S x max_len``, and benchmarks/decode.py
    measured SDPA faster than flex in 11 of 12 decode cases (up to 2.2x), 6% slower in the
    last (``benchmarks/results/decode.md``)."""
    return "sdpa" if call.on_cpu and call.decoding else None


def cpu_flex_where_measured_faster(call: Call, forms: MaskForms) -> Backend | None:
    """On CPU, inference: flex where ``flexmask.tuning`` measured it clearly faster than the
    sparse path on this machine (at most ``FLEX_MARGIN`` of its time) and the cost is at most
    where flex still beat dense SDPA. Not where the caller set the sparse threshold."""
    if not (call.on_cpu and call.flex_runs and call.plain_scores) or call.max_density is not None:
        return None
    cost = plan_cost(call, forms)
    flex = tuning.measured_flex(call.q.dtype) if cost is not None else None
    return "flex" if flex is not None and cost <= flex["max_density"] else None


def cpu_sparse_or_dense(call: Call, forms: MaskForms) -> Backend | None:
    """On CPU, the sparse path where its cost (blocks visited, gathered ones counted twice) is
    at most a threshold measured on this machine for the dtype and mode (``flexmask.tuning``),
    dense SDPA above: the sparse path wins on sparse masks and loses on near-full ones, and
    where the two cross depends on the CPU."""
    if not call.on_cpu:
        return None
    cost = plan_cost(call, forms)
    if cost is None:
        return "sdpa"  # one block: nothing to skip, and planning would cost more than SDPA
    return "sparse" if cost <= sparse_threshold(call)[0] else "sdpa"


def plan_cost(call: Call, forms: MaskForms) -> float | None:
    """The sparse plan's cost (the BlockMask and plan built once, reused by the sparse runner);
    None for a problem within one block."""
    q_block, kv_block = forms.block_sizes
    if call.q.shape[2] <= q_block and call.s_kv <= kv_block:
        return None
    return plan(forms.block_mask(call.q, call.s_kv)).cost


def sparse_threshold(call: Call) -> tuple[float, str]:
    """``cpu_sparse_or_dense``'s threshold for this call, and where it comes from: the caller's,
    else measured on this machine for the dtype and mode, else the cost model."""
    if call.max_density is not None:
        return call.max_density, "given (sparse_max_density)"
    return tuning.measured_max_density(call.q.dtype, call.needs_grad, SPARSE_MAX_DENSITY)


def accelerator(call: Call, forms: MaskForms) -> Backend | None:
    """On an accelerator, flex; SDPA when dropout is on (flex has none), when every call has
    a new shape (Transformers' growing caches), which flex would compile afresh each time, or
    when training with blocks torch's backward kernel cannot take."""
    if call.dropout or call.shapes_vary or _flex_cannot_train(call, forms):
        return "sdpa"
    return "flex"


def _flex_cannot_train(call: Call, forms: MaskForms) -> str | None:
    return backward_tiles_refuse(call.q, forms.block_sizes) if call.needs_grad else None


AUTO: tuple[Rule, ...] = (
    nothing_to_mask,
    square_causal,
    scores_need_softmax,
    cpu_decoding,
    score_mod_where_flex_runs,
    cpu_flex_where_measured_faster,
    cpu_sparse_or_dense,
    accelerator,
)
"""``backend="auto"``'s rules, in order: the first that answers decides."""


def explain(call: Call, forms: MaskForms) -> str:
    """Why ``backend="auto"`` chooses what it does for this call: the deciding rule, its reason,
    and for the sparse-or-dense rule the cost against the threshold and where that comes from."""
    if forms.dense_only:
        return "sdpa: a 4-D tensor mask, which only SDPA takes"
    rule, backend = _deciding_rule(call, forms)
    why = " ".join((rule.__doc__ or "").split())
    measured = rule in (cpu_flex_where_measured_faster, cpu_sparse_or_dense)
    cost = plan_cost(call, forms) if measured else None
    if cost is None:
        return f"{backend}, by {rule.__name__}: {why}"
    if rule is cpu_flex_where_measured_faster:
        flex = tuning.measured_flex(call.q.dtype) or {}
        here = (f"flex measured at {flex['vs_sparse']:.2f}x the sparse path's time and "
                f"faster than dense SDPA up to cost {flex['max_density']:.2f} "
                f"({tuning.path()})")  # fmt: skip
    else:
        threshold, source = sparse_threshold(call)
        here = f"threshold {threshold:.2f} ({source})"
    return f"{backend}, by {rule.__name__}: {why} Here: cost {cost:.2f}, {here}."


def _deciding_rule(call: Call, forms: MaskForms) -> tuple[Rule, Backend]:
    """The first ``AUTO`` rule that answers, and its answer."""
    for rule in AUTO:
        backend = rule(call, forms)
        if backend is not None:
            return rule, backend
    raise AssertionError("unreachable: the last rule always answers")


def choose(requested: str, call: Call, forms: MaskForms) -> Backend:
    """The backend of one call: ``requested`` when it is not ``"auto"`` (after checking that it
    can run), else the first answer of the ``AUTO`` rules.

    Raises:
        ValueError: if the requested backend cannot compute this call, saying why and what to
            use instead.
        TypeError: for a dtype flex does not take on CPU.
    """
    if forms.dense_only:  # whatever was asked: a 4-D tensor mask has no blocks for flex or sparse
        return "sdpa"
    if requested == "auto":
        return _deciding_rule(call, forms)[1]
    if requested == "sparse" and not call.sparse_runs:
        raise ValueError(
            "backend='sparse' runs SDPA on the visited blocks: it adds the additive score_mods "
            "(alibi, relative_bias, their compose) as a bias, but has no other score_mod, "
            "soft-capping, attention sinks or bias; use backend='auto', 'flex' or 'sdpa'."
        )
    if requested == "flex":
        _check_flex(call)
        if reason := _flex_cannot_train(call, forms):
            raise ValueError(
                f"backend='flex' cannot train here: {reason}. Use block_size=128 (or a "
                "multiple of it), float32, backend='auto' (which runs SDPA here), or "
                "torch.no_grad()."
            )
    return requested  # type: ignore[return-value]


def _check_flex(call: Call) -> None:
    if call.on_cpu and call.needs_grad:
        raise ValueError(
            "backend='flex' cannot train on CPU: FlexAttention has no CPU backward pass. "
            "Use backend='auto' or 'sparse' (block-sparse, with backward) or 'sdpa', or "
            "run under torch.no_grad()."
        )
    if call.dropout:
        raise ValueError(
            "backend='flex' has no attention dropout; call .eval(), set dropout=0, or "
            "use backend='auto', 'sparse' or 'sdpa'."
        )
    if call.on_cpu and call.q.dtype not in FLEX_DTYPES_CPU:
        raise TypeError(
            f"backend='flex' on CPU supports {FLEX_DTYPES_CPU}, got {call.q.dtype}; use "
            "backend='sdpa' or 'auto'."
        )
    if call.softmax_only:
        raise ValueError(
            "backend='flex' cannot apply attention sinks or an additive bias here; use "
            "backend='auto' or 'sdpa'."
        )
