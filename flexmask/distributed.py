"""Context parallelism: attention over a sequence split across the ranks of a process group.

Each rank holds a slice of the sequence's positions (a *sharding*): its queries, keys and values.
``attention`` all-gathers the keys and values (differentiably: the backward pass sums every
rank's gradient of each slice back to the rank that holds it), restores their global order, and
attends the rank's queries to them under the rank's BlockMask, built from tile bounds at the
rank's global query positions (no compile, no ``S x S`` tensor). Flex runs it on CUDA, the sparse
path on CPU, forward and backward, as ``MultiheadFlexAttention(backend="auto")`` chooses.

``Contiguous`` gives rank ``r`` the ``r``-th of ``W`` equal chunks. Under causal or document
masks the last rank then attends to about twice the mean work; ``HeadTail`` gives rank ``r``
chunks ``r`` and ``2W - 1 - r`` of ``2W``, which evens it out (``Sharding.load``).

Memory: each rank holds the whole sequence's keys and values (``O(S_local x S)`` scores at most,
``O(S)`` keys); a ring pass that streams them is the next step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import check_block_sizes, check_int, placed, resolve_batch, resolve_device
from .block import block_mask, from_grids
from .dispatch import BACKENDS, Call, choose
from .evaluation import block_kinds, tile_counts
from .masks import MaskMod, MaskModFn, as_mask, full, shifted
from .masks.leaf import Wrapper, declared
from .runners import RUNNERS, MaskForms, Options
from .sparse import check_qkv

__all__ = ["Contiguous", "HeadTail", "PerDocumentHeadTail", "Sharding", "attention"]


class Sharding:
    """Which global positions each of ``world_size`` ranks holds: ``segments_of(rank)``, runs of
    consecutive positions ``(start, length)``, the same number of positions on every rank."""

    def __init__(self, seq_len: int, world_size: int) -> None:
        self.seq_len = check_int(seq_len, f"{type(self).__name__}(seq_len=...)")
        self.world_size = check_int(world_size, f"{type(self).__name__}(world_size=...)")

    def _split(self, length: int, parts: int, what: str) -> int:
        """``length / parts``, or a ValueError saying why the split is impossible."""
        if length % parts:
            raise ValueError(
                f"{self!r} splits {what} into {parts} equal chunks, but {length} is not a "
                f"multiple of {parts}; pad it (and mask the padding) to a multiple."
            )
        return length // parts

    @property
    def local_len(self) -> int:
        """Positions each rank holds."""
        return self.seq_len // self.world_size

    def segments_of(self, rank: int) -> list[tuple[int, int]]:
        """The runs ``(start, length)`` of global positions rank ``rank`` holds, in its local
        order (ascending)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seq_len={self.seq_len}, world_size={self.world_size})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))

    def _rank(self, rank: object) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"{self!r}: rank must be an int, got {type(rank).__name__}.")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"{self!r}: rank must be in 0..{self.world_size - 1}, got {rank}.")
        return rank

    def positions(self, rank: int) -> Tensor:
        """The global positions rank ``rank`` holds, in its local order (ascending):
        ``LongTensor[local_len]``."""
        return torch.cat([torch.arange(a, a + n) for a, n in self.segments_of(self._rank(rank))])

    def shard(self, t: Tensor, dim: int, rank: int) -> Tensor:
        """Rank ``rank``'s slice of ``t`` along ``dim`` (the whole sequence there)."""
        if not isinstance(t, Tensor):
            raise TypeError(f"{self!r}.shard: t must be a tensor, got {type(t).__name__}.")
        if t.shape[dim] != self.seq_len:
            raise ValueError(
                f"{self!r}.shard: t has {t.shape[dim]} positions along dim {dim}, not "
                f"{self.seq_len}; shard the whole sequence."
            )
        pieces = [t.narrow(dim, a, n) for a, n in self.segments_of(self._rank(rank))]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def unshard(self, t_local: Tensor, dim: int, group: Any = None) -> Tensor:
        """Every rank's slice gathered and put back in global order along ``dim``;
        differentiable (each slice's gradient is summed over the ranks and returned to the rank
        that holds it). Every rank of ``group`` must call it."""
        if not isinstance(t_local, Tensor):
            raise TypeError(f"{self!r}.unshard: expected a tensor, got {type(t_local).__name__}.")
        self._check_group(group)
        if t_local.shape[dim] != self.local_len:
            raise ValueError(
                f"{self!r}.unshard: t_local has {t_local.shape[dim]} positions along dim {dim}, "
                f"not this sharding's {self.local_len} per rank."
            )
        gathered = _AllGather.apply(t_local.movedim(dim, 0), group)  # [W, S_local, ...]
        pieces = {}
        for rank in range(self.world_size):
            at = 0
            for a, n in self.segments_of(rank):
                pieces[a] = gathered[rank, at : at + n]
                at += n
        return torch.cat([pieces[a] for a in sorted(pieces)]).movedim(0, dim)

    def load(self, mask: MaskModFn, *, batch: int | None = None, heads: int = 1) -> Tensor:
        """The allowed ``(q, kv)`` pairs of each rank's queries, summed over batch rows (and
        ``heads`` if the mask depends on the head): ``LongTensor[world_size]``. Counted per tile
        from the mask's structure; only undecided tiles are evaluated, never ``S x S`` at once."""
        m = as_mask(mask, name=f"{self!r}.load(mask)")
        rows = resolve_batch(m, batch) or 1
        segments = [self.segments_of(r) for r in range(self.world_size)]
        tile = math.gcd(*(x for segs in segments for seg in segs for x in seg))
        per_tile = torch.zeros(self.seq_len // tile, dtype=torch.long)
        for b in range(rows):
            for h in range(heads if m.uses_heads else 1):
                counts = tile_counts(m, self.seq_len, self.seq_len, (tile, 128), b=b, h=h)
                per_tile += counts.sum(-1).cpu()
        loads = [sum(int(per_tile[a // tile : (a + n) // tile].sum()) for a, n in segs)
                 for segs in segments]  # fmt: skip
        return torch.tensor(loads) * (1 if m.uses_heads else heads)

    def block_mask(
        self,
        mask: MaskModFn,
        rank: int,
        *,
        batch: int | None = None,
        heads: int | None = None,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """The BlockMask of rank ``rank``'s queries (``local_len``) against every key
        (``seq_len``): ``mask`` at the rank's global query positions, one segment at a time from
        its tile bounds. Its ``mask_mod`` takes local query indices."""
        m = as_mask(mask, name=f"{self!r}.block_mask(mask)")
        q_block, _ = sizes = check_block_sizes(block_size)
        segments = self.segments_of(self._rank(rank))
        if any(n % q_block for _, n in segments):
            lengths = sorted({n for _, n in segments})
            raise ValueError(
                f"{self!r}: its chunks of {', '.join(map(str, lengths))} positions must be whole "
                f"query blocks, but block_size gives {q_block}; use a block_size that divides "
                "them, or a longer sequence."
            )
        dev = resolve_device(m, device)
        m = placed(m, dev).bind(self.seq_len, self.seq_len)  # the global frame, once
        built = [block_mask(shifted(m, a), n, self.seq_len, batch=batch, heads=heads,
                            block_size=sizes, device=dev) for a, n in segments]  # fmt: skip
        if len(built) == 1:
            return built[0]
        kinds = torch.cat([block_kinds(bm) for bm in built], dim=2)
        local = _AtPositions(m, self.positions(rank).to(dev))
        return from_grids(kinds == 2, kinds == 1, local, (self.local_len, self.seq_len), sizes)

    def _check_group(self, group: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                f"{self!r}: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group (torchrun does the set-up) first."
            )
        size = dist.get_world_size(group)
        if size != self.world_size:
            raise ValueError(
                f"{self!r} is for {self.world_size} ranks, but the process group has {size}."
            )


class Contiguous(Sharding):
    """Rank ``r`` holds the ``r``-th of ``world_size`` equal chunks (positions
    ``r * S / W .. (r + 1) * S / W - 1``). Under a causal mask the last rank does about twice
    the mean work; ``HeadTail`` balances it.

    Example:
        >>> import flexmask as fm
        >>> fm.distributed.Contiguous(8, 2).positions(1).tolist()
        [4, 5, 6, 7]
    """

    def __init__(self, seq_len: int, world_size: int) -> None:
        super().__init__(seq_len, world_size)
        self._chunk = self._split(self.seq_len, self.world_size, "the sequence")

    def segments_of(self, rank: int) -> list[tuple[int, int]]:
        return [(rank * self._chunk, self._chunk)]


class HeadTail(Sharding):
    """Rank ``r`` holds chunks ``r`` and ``2W - 1 - r`` of ``2W`` equal chunks: one from the
    head of the sequence, one from its tail, so that under a causal mask every rank attends to
    the same number of pairs (torch's ``_HeadTailLoadBalancer`` splits the same way).

    Example:
        >>> import flexmask as fm
        >>> fm.distributed.HeadTail(8, 2).positions(0).tolist()
        [0, 1, 6, 7]
        >>> fm.distributed.HeadTail(4096, 4).load(fm.causal()).tolist()
        [2097664, 2097664, 2097664, 2097664]
    """

    def __init__(self, seq_len: int, world_size: int) -> None:
        super().__init__(seq_len, world_size)
        self._chunk = self._split(self.seq_len, 2 * self.world_size, "the sequence")

    def segments_of(self, rank: int) -> list[tuple[int, int]]:
        c, last = self._chunk, 2 * self.world_size - 1
        return [(rank * c, c), ((last - rank) * c, c)]


class PerDocumentHeadTail(Sharding):
    """``HeadTail`` inside every document of a packed sequence: rank ``r`` holds chunks ``r``
    and ``2W - 1 - r`` of each document's ``2W``. Under ``packed(lengths) & causal()`` every rank
    then attends to the same number of pairs, however unequal the documents (plain ``HeadTail``
    is off by 1.6x for four unequal documents on four ranks); torch's
    ``_PerDocumentHeadTailLoadBalancer`` splits the same way.

    Example:
        >>> import flexmask as fm
        >>> sharding = fm.distributed.PerDocumentHeadTail([8, 4], 2)
        >>> sharding.positions(0).tolist()
        [0, 1, 6, 7, 8, 11]
        >>> sharding.load(fm.packed([8, 4]) & fm.causal()).tolist()
        [23, 23]
    """

    def __init__(self, lengths: list[int], world_size: int) -> None:
        if not isinstance(lengths, (list, tuple)) or not lengths:
            raise TypeError(
                "PerDocumentHeadTail(lengths=...) needs a non-empty list of document lengths, "
                f"got {lengths!r}."
            )
        self.lengths = [check_int(n, "PerDocumentHeadTail(lengths=[...])") for n in lengths]
        super().__init__(sum(self.lengths), world_size)
        for n in self.lengths:
            self._split(n, 2 * self.world_size, f"a document of {n} tokens")

    def __repr__(self) -> str:
        return f"PerDocumentHeadTail(lengths={self.lengths}, world_size={self.world_size})"

    def segments_of(self, rank: int) -> list[tuple[int, int]]:
        out, start, last = [], 0, 2 * self.world_size - 1
        for n in self.lengths:
            c = n // (2 * self.world_size)
            out += [(start + rank * c, c), (start + (last - rank) * c, c)]
            start += n
        return out


@declared
class _AtPositions(Wrapper):
    """``inner`` with local query ``i`` at global position ``positions[i]`` (a rank's queries)."""

    inner: MaskMod
    positions: Tensor  # [S_local]

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.inner(b, h, self.positions[q_idx], kv_idx)

    def _expr(self) -> str:
        return f"{self.inner!r} at the queries of one rank"


class _AllGather(torch.autograd.Function):
    """``[W, ...]``: every rank's tensor. Backward: the gradients of every rank summed, this
    rank's slice returned (``all_reduce``: gloo has no ``reduce_scatter``)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def rank_of(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the world)."""
    return dist.get_rank(group)


def check_module_call(
    module: Any,
    sharding: object,
    group: Any,
    mask: object,
    context: object,
    cache: object,
    return_qk: bool,
) -> None:
    """What ``MultiheadFlexAttention.forward(..., sharding=...)`` cannot do, refused with why."""
    if not isinstance(sharding, Sharding):
        raise TypeError(
            "forward(sharding=...) must be a flexmask.distributed.Contiguous or HeadTail, got "
            f"{type(sharding).__name__}."
        )
    refused = [
        (isinstance(mask, BlockMask), "BlockMask (pass the mask: each rank builds its own)"),
        (context is not None, "cross-attention (a context)"),
        (cache is not None, "a KV cache"),
        (return_qk, "return_qk"),
        (module.score_mod is not None, "a score_mod"),
        (module.training and module.dropout > 0, "attention dropout (call .eval() or dropout=0)"),
    ]
    for refuse, what in refused:
        if refuse:
            raise ValueError(f"forward(sharding=...) has no {what} yet: context parallelism "
                             "here is sharded self-attention under a mask.")  # fmt: skip
    sharding._check_group(group)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskModFn | None,
    *,
    sharding: Sharding,
    group: Any = None,
    backend: str = "auto",
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
) -> Tensor:
    """This rank's output of attention over a sharded sequence.

    Shapes:
        q ``[B, H, S_local, D]``, k and v ``[B, H_kv, S_local, D]``: this rank's shards
        (``sharding.shard(t, 2, rank)``) -> ``[B, H, S_local, D]``.

    Args:
        mask: a flexmask mask (or mask_mod) in global positions, or None (every key).
        sharding: ``Contiguous`` or ``HeadTail``, for the group's world size.
        group: the process group (default: the world).
        backend: ``"auto"`` (flex on CUDA, the sparse path or SDPA on CPU), ``"flex"``,
            ``"sparse"`` or ``"sdpa"``, as ``MultiheadFlexAttention``.
        block_size, scale: as ``MultiheadFlexAttention``.

    Every rank of the group must call it (keys and values are all-gathered).

    Raises:
        TypeError, ValueError: for bad inputs, before any communication.
    """
    check_qkv(q, k, v, "distributed.attention")
    if not isinstance(sharding, Sharding):
        raise TypeError(
            "distributed.attention(sharding=...) must be a flexmask.distributed.Contiguous or "
            f"HeadTail, got {type(sharding).__name__}."
        )
    if backend not in BACKENDS:
        raise ValueError(f"distributed.attention(backend=...) must be one of {BACKENDS}, "
                         f"got {backend!r}.")  # fmt: skip
    for name, t in (("q", q), ("k", k)):
        if t.shape[2] != sharding.local_len:
            raise ValueError(
                f"distributed.attention: {name} holds {t.shape[2]} positions, but {sharding!r} "
                f"gives each rank {sharding.local_len}; pass this rank's shards."
            )
    sharding._check_group(group)
    m = full() if mask is None else as_mask(mask, name="distributed.attention(mask)")
    rank = dist.get_rank(group)
    bm = sharding.block_mask(
        m, rank,
        batch=q.shape[0] if m.uses_batch else None,
        heads=q.shape[1] if m.uses_heads else None,
        block_size=block_size, device=q.device,
    )  # fmt: skip
    k_all, v_all = (sharding.unshard(t, 2, group) for t in (k, v))
    forms = MaskForms(block=bm)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    call = Call(q=q, s_kv=sharding.seq_len, needs_grad=needs_grad, dropout=False,
                score_mod=False, softmax_only=False, decoding=False, shapes_vary=False)  # fmt: skip
    chosen = choose(backend, call, forms)
    return RUNNERS[chosen](q, k_all, v_all, forms, Options(scale=scale))
