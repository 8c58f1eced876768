"""``MultiheadFlexAttention``: projections, one dispatch call, a runner, the KV cache append."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from . import distributed, score_mods
from ._checks import (
    check_block_mask_shape,
    check_block_sizes,
    check_flag,
    check_kernel_options,
    check_module_config,
    check_module_input,
)
from .cache import KVCache
from .dispatch import BACKENDS, Backend, Call, choose
from .dispatch import explain as explain_choice
from .distributed import Sharding
from .masks import MaskMod, MaskModFn, as_mask, full
from .rotary import check_rope_theta, rotate, token_positions
from .runners import RUNNERS, MaskForms, Options, ScoreModFn
from .score_mods import is_additive

__all__ = ["MultiheadFlexAttention", "ScoreModFn"]


class MultiheadFlexAttention(nn.Module):
    """Multi-head attention (batch first) whose mask is a flexmask expression or a BlockMask.

    Projections are ``q_proj: E -> H*D``, ``k_proj: kdim -> H_kv*D``, ``v_proj: vdim -> H_kv*D``
    and ``out_proj: H*D -> H*D`` with ``H*D = out_dim`` (default ``embed_dim``); grouped-query
    attention when ``num_kv_heads < num_heads``.

    Backends:
        ``"flex"``: compiled ``flex_attention`` (compiled once per process) on the BlockMask;
        inference only on CPU.
        ``"sparse"``: ``sparse_attention``, SDPA over the BlockMask's visited blocks only;
        trains on CPU (a ``score_mod`` only if additive: ``alibi``, ``relative_bias``).
        ``"sdpa"``: ``scaled_dot_product_attention`` with the dense boolean mask (its
        ``is_causal`` kernel for a square ``causal()``; an explicit softmax when a ``score_mod``
        is given).
        ``"auto"``: per call, by ``flexmask.dispatch.choose`` (the one policy, also the
        Transformers adapter's): no mask -> SDPA; ``causal()`` on a square problem -> SDPA
        ``is_causal``; decoding on CPU -> SDPA; with a ``score_mod``: flex where it runs, else
        (training on CPU) sparse or SDPA as below for an additive one, else SDPA; other masks
        on CPU -> flex for inference where ``flexmask.tuning`` measured it clearly faster than
        the sparse path on this machine, else sparse when the fraction of blocks visited
        (gathered ones counted twice) is at most ``sparse_max_density``, else SDPA; on CUDA ->
        flex.
        ``backend_for`` says which, for an input.

    Fully masked query rows (padding, or a ``score_mod`` sending a whole row to ``-inf``) give
    zeros and zero gradients on every backend, never NaN, also when the inputs hold NaN at the
    positions the mask hides from every query.

    Inside ``torch.compile``: the projections are compiled with the model; the attention step
    between them (mask, backend, kernel, cache) runs outside the graph through
    ``torch.compiler.disable``, one graph break per call, so that a new mask at the same shapes
    (new lengths, document ids, tree parents) never recompiles the model. FlexAttention itself
    is compiled once per process.

    Args:
        embed_dim: width ``E`` of the inputs ``x``.
        num_heads: query heads ``H``; must divide ``out_dim``.
        out_dim: the width the heads split and the output's (default ``embed_dim``); the
            FlexAttention blog's ``d_out``.
        kdim, vdim: widths of the keys' and values' source in cross-attention (default
            ``embed_dim``, as ``nn.MultiheadAttention``); with ``vdim != kdim`` the context is a
            pair ``(keys_source, values_source)``.
        num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
        bias: add biases to the projections.
        out_bias: give ``out_proj`` a bias (default: ``bias``); the blog's module is
            ``MultiheadFlexAttention(d_in, n_heads, out_dim=d_out, bias=False, out_bias=True)``.
        dropout: attention-probability dropout while training.
        rope_theta: rotary position embeddings on queries and keys (Llama's rotate-half
            convention over the whole head dim, base ``rope_theta``, e.g. 10000.0); None for
            none. Positions come from ``forward(positions=...)``.
        score_mod: optional ``(score, b, h, q_idx, kv_idx) -> score`` (ALiBi, soft-capping, ...).
        block_size: BlockMask tile size for masks the module builds itself: an int, or
            ``(q_block, kv_block)``.
        backend: ``"auto"``, ``"flex"``, ``"sparse"`` or ``"sdpa"``.
        sparse_max_density: ``"auto"``'s threshold on CPU between the sparse path and dense
            SDPA; default None: measured on this machine per dtype, for inference and training
            (``flexmask.tuning``; ``SPARSE_MAX_DENSITY`` where measuring is off).
        kernel_options: passed to ``flex_attention`` when flex runs (tile sizes, stages; see
            torch's ``FlexKernelOptions``); the other backends have no kernel options.

    Example:
        >>> import torch, flexmask as fm
        >>> attn = fm.MultiheadFlexAttention(32, 4, backend="sdpa")
        >>> x = torch.randn(2, 10, 32)
        >>> attn(x, mask=fm.causal() & fm.padding([10, 6])).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        out_dim: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        num_kv_heads: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        dropout: float = 0.0,
        rope_theta: float | None = None,
        score_mod: ScoreModFn | None = None,
        block_size: int | tuple[int, int] = 128,
        backend: str = "auto",
        sparse_max_density: float | None = None,
        kernel_options: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        out_dim = embed_dim if out_dim is None else out_dim
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        check_module_config(embed_dim, out_dim, kdim, vdim, num_heads, num_kv_heads, dropout,
                            backend, BACKENDS, score_mod, sparse_max_density)  # fmt: skip
        out_bias = bias if out_bias is None else out_bias
        for name, flag in (("bias", bias), ("out_bias", out_bias)):
            check_flag(flag, f"MultiheadFlexAttention({name}=...)")
        self.embed_dim, self.out_dim, self.kdim, self.vdim = embed_dim, out_dim, kdim, vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = out_dim // num_heads
        self.rope_theta = check_rope_theta(rope_theta, self.head_dim)
        self.dropout = dropout
        self.score_mod = score_mod
        self.block_size = check_block_sizes(block_size)
        self.backend = backend
        self.sparse_max_density = sparse_max_density
        self.kernel_options = check_kernel_options(
            kernel_options, "MultiheadFlexAttention(kernel_options=...)"
        )
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, out_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(out_dim, out_dim, bias=out_bias, **kw)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        widths = "".join(f", {n}={w}" for n, w in (("out_dim", self.out_dim), ("kdim", self.kdim),
                         ("vdim", self.vdim)) if w != self.embed_dim)  # fmt: skip
        return (f"embed_dim={self.embed_dim}{widths}, num_heads={self.num_heads}{kv}, "
                f"backend={self.backend!r}")  # fmt: skip

    def project(
        self, x: Tensor, context: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries from ``x``, keys and values from ``context`` (default ``x``; a pair gives the
        keys' and the values' sources apart).

        Shapes:
            x: ``[B, S, E]``, context: ``[B, S_kv, kdim]`` (or ``[B, S_kv, kdim]`` and
            ``[B, S_kv, vdim]``) -> q: ``[B, H, S, D]``, k and v: ``[B, H_kv, S_kv, D]``.
        """
        k_src, v_src = self._sources(x, context)
        bsz, s_q, _ = x.shape
        s_kv = k_src.shape[1]
        q = self.q_proj(x).view(bsz, s_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(k_src).view(bsz, s_kv, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(v_src).view(bsz, s_kv, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _sources(
        self, x: Tensor, context: Tensor | tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """The keys' and the values' sources, checked against the module's widths."""
        weight = self.q_proj.weight
        check_module_input(x, "x", self.embed_dim, weight, x)
        if context is None:
            if (self.kdim, self.vdim) != (self.embed_dim, self.embed_dim):
                raise ValueError(
                    f"self-attention projects x ({self.embed_dim} wide) to keys and values, but "
                    f"this module has kdim={self.kdim}, vdim={self.vdim}: give a context."
                )
            return x, x
        if isinstance(context, tuple):
            if len(context) != 2:
                raise ValueError(
                    f"forward(context=...) as a tuple must be (keys_source, values_source), got "
                    f"{len(context)} items."
                )
            k_src, v_src = context
        elif self.kdim != self.vdim:
            raise ValueError(
                f"this module's keys and values come from sources of different widths (kdim="
                f"{self.kdim}, vdim={self.vdim}): pass context=(keys_source, values_source)."
            )
        else:
            k_src = v_src = context
        check_module_input(k_src, "context", self.kdim, weight, x)
        check_module_input(v_src, "context", self.vdim, weight, x)
        if k_src.shape[1] != v_src.shape[1]:
            raise ValueError(
                f"forward(context=...): the keys' source has {k_src.shape[1]} tokens and the "
                f"values' {v_src.shape[1]}; give one value per key."
            )
        return k_src, v_src

    def forward(
        self,
        x: Tensor,
        context: Tensor | MaskModFn | BlockMask | None = None,
        *,
        mask: MaskModFn | BlockMask | None = None,
        cache: KVCache | None = None,
        lengths: Tensor | None = None,
        padding_side: str = "right",
        positions: Tensor | None = None,
        return_qk: bool = False,
        sharding: Sharding | None = None,
        group: Any = None,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Attend ``x`` to itself, or to ``context`` (cross-attention), under ``mask``.

        Shapes:
            x: ``[B, S, E]``; context: ``[B, S_kv, E]``; returns ``[B, S, E]``.

        Args:
            x: queries (and keys/values for self-attention).
            context: keys/values for cross-attention (a tensor). A mask or BlockMask in this
                place is taken as the mask (``attn(x, block_mask)``, as the FlexAttention blog
                writes it): a context is always a tensor, so the two cannot be confused.
            mask: a flexmask mask or mask_mod callable (the module builds its BlockMask or
                dense mask for this shape and device, cached while the mask cannot have
                changed; a plain callable is evaluated afresh on every call), a ready
                ``BlockMask`` (its shape is checked against the input), or None for no mask
                (every key visible).
            cache: a ``KVCache``: this call's keys and values are appended to it and the queries
                attend to everything cached. Query ``i`` of row ``b`` is position
                ``cache.lengths[b] + i`` and ``mask`` is evaluated in those absolute positions
                (prefill and decode, one token or a tree of candidates, are the same call). A
                call that raises leaves the cache exactly as it was.
            lengths: with a cache, the real tokens of each row in this call (``[B]``, default
                ``S``): prompts of different lengths; each row's cache advances by its own
                count (pads never enter it) and padded queries get zeros.
            padding_side: where this call's pads are with ``lengths``: ``"right"`` (after the
                tokens) or ``"left"`` (before them, as tokenizers pad for generation).
            positions: with ``rope_theta``, each token's position, ``[S]`` or ``[B, S]`` (default
                ``arange(S)``; with a cache, row ``b``'s real tokens continue from
                ``cache.lengths[b]``). A tree of candidates passes ``tree.position_ids(...)``.
            return_qk: also return the queries and keys (``[B, H, S, D]`` and ``[B, H_kv,
                S_kv, D]``) as the scores see them, to draw them (``save_scores_png``).
            sharding: context parallelism (``flexmask.distributed``): ``x`` is this rank's
                shard of the sequence, ``mask`` is in global positions, and every rank of
                ``group`` calls the module (``distributed.attention``). Rotary positions default
                to the rank's global positions.

        Returns:
            The output ``[B, S, E]``; with ``return_qk``, ``(output, q, k)``.

        Raises:
            TypeError, ValueError: for bad input (shapes, dtypes, devices, a mask for another
                batch, a cache that does not fit, a mask given twice), before the cache is
                touched.
        """
        if context is not None and not isinstance(context, (Tensor, tuple)):
            if mask is not None:
                raise TypeError(
                    f"forward(x, {type(context).__name__}, mask=...) gives two masks: a mask in "
                    "the context's place is taken as the mask; pass one of them."
                )
            if not (isinstance(context, BlockMask) or callable(context)):
                raise TypeError(
                    "forward(context=...) must be a tensor [B, S_kv, E] (or, in its place, a "
                    f"mask or BlockMask), got {type(context).__name__}."
                )
            mask, context = context, None
        if return_qk and cache is not None:
            raise ValueError(
                "forward(return_qk=True) with a cache is not supported: the scores there see the "
                "cached keys too; call project(x) and read cache.k for them."
            )
        if positions is not None and self.score_mod is not None \
                and score_mods.reads_positions(self.score_mod):  # fmt: skip
            raise ValueError(
                f"forward(positions=...) places tokens for the rotary embeddings, but the "
                f"score_mod {self.score_mod!r} reads query and key indices, which stay the "
                "tokens' slots (a tree's candidates share positions, not slots): its distances "
                "would be wrong. Use rotary positions without a positional score_mod."
            )
        if sharding is not None:
            distributed.check_module_call(self, sharding, group, mask, context, cache, return_qk)
            if positions is None and self.rope_theta is not None:
                positions = sharding.positions(distributed.rank_of(group)).to(x.device)
        q, k, v = self.project(x, context)
        if self.rope_theta is not None:
            if context is not None:
                raise ValueError(
                    "rotary embeddings (rope_theta) place queries and keys in one sequence; "
                    "cross-attention has two. Use a module without rope_theta for it."
                )
            at = token_positions(positions, x, cache, lengths, padding_side)
            q, k = rotate(q, k, at, self.rope_theta)
        elif positions is not None:
            raise ValueError(
                "forward(positions=...) is for rotary embeddings, and this module has none "
                "(rope_theta=None); build it with rope_theta=10000.0, or drop positions."
            )
        if sharding is not None:
            assert not isinstance(mask, BlockMask)  # refused above: it has no global positions
            out = distributed.attention(q, k, v, mask, sharding=sharding, group=group,
                                        backend=self.backend,
                                        block_size=self.block_size)  # fmt: skip
        else:
            out = self._attend(q, k, v, mask, cache, lengths, padding_side, context is not None)
        bsz, s_q, _ = x.shape
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, s_q, self.out_dim))
        return (out, q, k) if return_qk else out

    @torch.compiler.disable
    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: MaskModFn | BlockMask | None,
        cache: KVCache | None,
        lengths: Tensor | None,
        padding_side: str,
        cross: bool,
    ) -> Tensor:
        """Everything between the projections (q ``[B, H, S, D]``, k and v ``[B, H_kv, S_kv,
        D]`` -> ``[B, H, S, D]``). Outside compiled graphs: dynamo would guard on the mask
        object and recompile for every new one."""
        if padding_side not in ("right", "left"):
            raise ValueError(
                f"forward(padding_side=...) must be 'right' or 'left', got {padding_side!r}."
            )
        if mask is not None and not isinstance(mask, BlockMask):
            mask = as_mask(mask, name="forward(mask=...)")
        if cache is not None:
            return self._attend_cached(q, k, v, mask, cache, lengths, padding_side, cross)
        if lengths is not None:
            raise ValueError("forward(lengths=...) counts tokens written to a cache; pass cache=.")
        forms = _forms(mask, q, k.shape[2], self.num_heads, self.block_size)
        backend = choose(self.backend, self._call(q, k.shape[2], decoding=False), forms)
        return RUNNERS[backend](q, k, v, forms, self._options())

    def _attend_cached(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: MaskMod | BlockMask | None,
        cache: KVCache,
        lengths: Tensor | None,
        padding_side: str,
        cross: bool,
    ) -> Tensor:
        # Everything that can fail runs before the cache is written (the step mask is built
        # first); the kernel runs inside cache.appended, which restores the cache if it raises.
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"forward(cache=...) must be a flexmask.KVCache, got {type(cache).__name__}."
            )
        if cross:
            raise ValueError("forward(cache=...) caches self-attention keys; it takes no context.")
        bsz, _, s_q, _ = q.shape
        cache.check_compatible(bsz, self.num_kv_heads, self.head_dim, q)
        counts = _real_counts(lengths, bsz, s_q, q.device)
        cache.check_room(s_q)
        rotate = padding_side == "left" and lengths is not None
        if rotate:  # each row's real tokens to the front: run right-padded, rotate back
            shift = (s_q - counts)[:, None]
            ar = torch.arange(s_q, device=q.device)
            q, k, v = (_rotate(t, (ar + shift) % s_q) for t in (q, k, v))
        if isinstance(mask, BlockMask):
            forms = _forms(mask, q, cache.max_len, self.num_heads, self.block_size)
        else:  # a new step mask every call: built, never cached
            step = cache.step(mask or full(), counts)
            forms = MaskForms(step, block_size=self.block_size, keep=False)
        backend = choose(self.backend, self._call(q, cache.max_len, decoding=True), forms)
        forms.prepare(backend, q, cache.max_len)
        options = self._options(queries_from=cache.lengths.clone())
        with cache.appended(k, v, counts):
            out = RUNNERS[backend](q, cache.k, cache.v, forms, options)
        return _rotate(out, (ar - shift) % s_q) if rotate else out

    def backend_for(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: MaskModFn | BlockMask | None = None,
        explain: bool = False,
    ) -> Backend | str:
        """The backend ``forward(x, context, mask=mask)`` runs now (without a cache): ``"flex"``,
        ``"sparse"`` or ``"sdpa"`` (what ``backend=`` takes); with ``explain``, a sentence
        saying why (the deciding rule; on CPU the mask's cost against the threshold, and
        whether that was measured). Depends on autograd being on and on ``train()``/``eval()``."""
        k_src, _ = self._sources(x, context)
        s_kv = k_src.shape[1]
        if mask is not None and not isinstance(mask, BlockMask):
            mask = as_mask(mask, name="backend_for(mask=...)")
        q = torch.empty(x.shape[0], self.num_heads, x.shape[1], 0, device=x.device,
                        dtype=self.q_proj.weight.dtype, requires_grad=x.requires_grad)  # fmt: skip
        call = self._call(q, s_kv, decoding=False)
        forms = _forms(mask, q, s_kv, self.num_heads, self.block_size)
        backend = choose(self.backend, call, forms)
        if not explain:
            return backend
        return explain_choice(call, forms) if self.backend == "auto" else f"{backend}, as asked"

    def _call(self, q: Tensor, s_kv: int, *, decoding: bool) -> Call:
        """The facts of this call for ``dispatch.choose``."""
        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        return Call(q=q, s_kv=s_kv, needs_grad=needs_grad,
                    dropout=self.training and self.dropout > 0,
                    score_mod=self.score_mod is not None, softmax_only=False,
                    additive_scores=is_additive(self.score_mod),
                    decoding=decoding, shapes_vary=False,
                    max_density=self.sparse_max_density)  # fmt: skip

    def _options(self, queries_from: Tensor | None = None) -> Options:
        """The call's options; after a KV cache holding ``queries_from [B]`` tokens, the
        score_mod sees each query at its position in the cache, as the keys are."""
        score_mod = self.score_mod
        if score_mod is not None and queries_from is not None:
            score_mod = score_mods.queries_from(score_mod, queries_from)
        return Options(dropout_p=self.dropout if self.training else 0.0, score_mod=score_mod,
                       kernel_options=self.kernel_options)  # fmt: skip


def _real_counts(lengths: Tensor | None, bsz: int, s_q: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((bsz,), s_q, dtype=torch.long, device=device)
    if (
        not isinstance(lengths, Tensor)
        or lengths.dtype.is_floating_point
        or lengths.dtype.is_complex
        or lengths.dtype == torch.bool
    ):
        raise TypeError(
            f"forward(lengths=...) must be an integer tensor of shape [{bsz}] (real tokens per "
            f"row), got {lengths!r}."
        )
    if lengths.shape != (bsz,) or lengths.is_meta:
        raise ValueError(
            f"forward(lengths=...) must be an integer tensor of shape [{bsz}] (real tokens per "
            f"row), got shape {tuple(lengths.shape)} on {lengths.device}."
        )
    if int(lengths.min()) < 0 or int(lengths.max()) > s_q:
        got = lengths.tolist()
        raise ValueError(
            f"forward(lengths=...) must lie in 0..{s_q} (this call's tokens), got {got}."
        )
    return lengths.to(device).long()


def _forms(
    mask: MaskMod | BlockMask | None,
    q: Tensor,
    s_kv: int,
    num_heads: int,
    block_size: tuple[int, int],
) -> MaskForms:
    """The call's ``MaskForms``; a ready BlockMask is checked against the input's shape."""
    if not isinstance(mask, BlockMask):
        return MaskForms(mask, block_size=block_size)
    check_block_mask_shape(mask, "forward(mask=BlockMask)", q.shape[0], num_heads, q.shape[2], s_kv)
    return MaskForms(block=mask)


def _rotate(t: Tensor, index: Tensor) -> Tensor:
    """``t [B, H, S, D]`` with positions taken from ``index [B, S]`` along S."""
    return t.gather(2, index[:, None, :, None].expand_as(t))
