"""Dense oracles: every mask built from arange, tril, block_diag, one-hot and loops only.

Nothing here calls flexmask; each oracle returns ``BoolTensor[B, q_len, kv_len]`` (True = may
attend) so tests can compare any flexmask output against it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ones(q_len: int, kv_len: int) -> Tensor:
    return torch.ones(q_len, kv_len, dtype=torch.bool)


def full(q_len: int, kv_len: int) -> Tensor:
    return _ones(q_len, kv_len)[None]


def causal(q_len: int, kv_len: int) -> Tensor:
    return _ones(q_len, kv_len).tril()[None]


def sliding_window(q_len: int, kv_len: int, window: int) -> Tensor:
    ones = _ones(q_len, kv_len)
    return (ones.tril() & ~ones.tril(-window))[None]


def local_window(q_len: int, kv_len: int, left: int, right: int) -> Tensor:
    ones = _ones(q_len, kv_len)
    return (ones.tril(right) & ~ones.tril(-left - 1))[None]


def prefix_lm(q_len: int, kv_len: int, prefix: int | list[int]) -> Tensor:
    prefixes = [prefix] if isinstance(prefix, int) else prefix
    rows = [causal(q_len, kv_len)[0] | (torch.arange(kv_len) < p)[None, :] for p in prefixes]
    return torch.stack(rows)


def padding(q_len: int, kv_len: int, lengths: list[int], side: str = "right") -> Tensor:
    out = []
    for n in lengths:
        if side == "right":
            real_q, real_kv = torch.arange(q_len) < n, torch.arange(kv_len) < n
        else:  # left padding counts from the end of the kv_len-long sequence
            real_q, real_kv = torch.arange(q_len) >= kv_len - n, torch.arange(kv_len) >= kv_len - n
        out.append(real_q[:, None] & real_kv[None, :])
    return torch.stack(out)


def key_padding(q_len: int, kv_len: int, real: list[list[int]]) -> Tensor:
    """Only keys are masked: every query sees the real keys (a 2-D mask as Transformers reads
    it, cross-attention)."""
    keys = torch.tensor(real).bool()  # [B, kv_len]
    return keys[:, None, :].expand(len(real), q_len, kv_len).clone()


def sink_tokens(q_len: int, kv_len: int, n: int) -> Tensor:
    return (torch.arange(kv_len) < n)[None, None, :].expand(1, q_len, kv_len).clone()


def key_padding_lengths(q_len: int, kv_len: int, lengths: list[int], side: str = "right") -> Tensor:
    """Keys of row b real when among its ``lengths[b]`` real keys; every query kept."""
    rows = []
    for n in lengths:
        real = [i < n if side == "right" else i >= kv_len - n for i in range(kv_len)]
        rows.append(torch.tensor(real)[None, :].expand(q_len, kv_len))
    return torch.stack(rows)


def chunked_from(q_len: int, kv_len: int, chunk: int, starts: list[int]) -> Tensor:
    """Chunks of row b counted from ``starts[b]``: block-diagonal ones over positions shifted by
    ``(-start) mod chunk`` (the pads before the start get chunks of their own)."""
    out = []
    for s in starts:
        r = (-s) % chunk
        n = max(q_len, kv_len) + r
        blocks = torch.block_diag(*[torch.ones(chunk, chunk)] * (n // chunk + 1)).bool()
        out.append(blocks[r : r + q_len, r : r + kv_len])
    return torch.stack(out)


def documents_of_positions(position_ids: list[int]) -> list[int]:
    """Document ids by walking the positions: a new one where a position does not continue."""
    ids, doc = [], 0
    for i, p in enumerate(position_ids):
        if i and p != position_ids[i - 1] + 1:
            doc += 1
        ids.append(doc)
    return ids


def document(q_len: int, kv_len: int, doc_ids: list[int] | list[list[int]]) -> Tensor:
    rows = doc_ids if isinstance(doc_ids[0], list) else [doc_ids]
    out = []
    for ids in rows:
        onehot = torch.nn.functional.one_hot(torch.tensor(ids)).float()
        same = (onehot @ onehot.T) > 0
        out.append(same[:q_len, :kv_len])
    return torch.stack(out)


def packed(q_len: int, kv_len: int, lengths: list[int]) -> Tensor:
    blocks = torch.block_diag(*[torch.ones(n, n) for n in lengths]).bool()
    return blocks[:q_len, :kv_len][None]


def packed_rows(q_len: int, kv_len: int, lengths: list[list[int]]) -> Tensor:
    """Each batch row its own documents."""
    return torch.cat([packed(q_len, kv_len, row) for row in lengths])


def dilated_window(q_len: int, kv_len: int, window: int, dilation: int) -> Tensor:
    """Band ``|q - kv| <= window`` from tril, keeping every ``dilation``-th diagonal by a loop."""
    ones = _ones(q_len, kv_len)
    band = ones.tril(window) & ~ones.tril(-window - 1)
    keep = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for d in range(-window, window + 1, 1):
        if d % dilation == 0:
            keep |= ones.tril(d) & ~ones.tril(d - 1)  # the diagonal kv - q == d
    return (band & keep)[None]


def global_tokens(q_len: int, kv_len: int, indices: list[int] | list[list[int]]) -> Tensor:
    rows = indices if indices and isinstance(indices[0], list) else [indices]
    out = []
    for row in rows:
        dense = torch.zeros(q_len, kv_len, dtype=torch.bool)
        for i in row:
            if 0 <= i < q_len:
                dense[i, :] = True
            if 0 <= i < kv_len:
                dense[:, i] = True
        out.append(dense)
    return torch.stack(out)


def neighborhood_2d(height: int, width: int, kernel: int, dilation: int = 1) -> Tensor:
    """NATTEN by loops over pixels: within the query's dilation grid, the ``kernel`` grid
    positions centred on it along each axis, the centre moved inside the grid at the borders."""

    def window(p: int, size: int) -> set[int]:
        group = p % dilation
        grid = list(range(group, size, dilation))  # this grid's positions along the axis
        i = grid.index(p)
        half = kernel // 2
        start = min(max(i - half, 0), max(len(grid) - kernel, 0))
        return set(grid[start : start + kernel])

    n = height * width
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        rows, cols = window(q // width, height), window(q % width, width)
        for r in rows:
            for c in cols:
                out[q, r * width + c] = True
    return out[None]


def cu_seqlens(cu_q: list[int], cu_kv: list[int] | None = None, causal: bool = False) -> Tensor:
    """Block-diagonal over the varlen layout by loops; causal aligned bottom-right per block."""
    cu_kv = cu_q if cu_kv is None else cu_kv
    out = torch.zeros(cu_q[-1], cu_kv[-1], dtype=torch.bool)
    for s in range(len(cu_q) - 1):
        n_q, n_kv = cu_q[s + 1] - cu_q[s], cu_kv[s + 1] - cu_kv[s]
        for i in range(n_q):
            for j in range(n_kv):
                if not causal or j <= i + n_kv - n_q:
                    out[cu_q[s] + i, cu_kv[s] + j] = True
    return out[None]


def chunked(q_len: int, kv_len: int, chunk: int) -> Tensor:
    n = max(q_len, kv_len)
    blocks = torch.block_diag(*[torch.ones(chunk, chunk)] * (n // chunk + 1)).bool()
    return blocks[:q_len, :kv_len][None]


def tree(q_len: int, kv_len: int, parents: list[int], context_len: int = 0) -> Tensor:
    out = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for q in range(q_len):
        for kv in range(min(kv_len, context_len)):
            out[q, kv] = kv <= q or q >= context_len
        if q < context_len:
            continue
        node = q - context_len
        while node != -1:  # walk up to the root
            if context_len + node < kv_len:
                out[q, context_len + node] = True
            node = parents[node]
    return out[None]


def render(dense: Tensor) -> str:
    """■/⬚ picture of a 2-D mask, the docstrings' format."""
    return "\n".join(" ".join("■" if x else "⬚" for x in row) for row in dense.tolist())


def block_kinds(dense: Tensor, block_size: int) -> Tensor:
    """0 empty / 1 partial / 2 full per tile of a ``[B, Q, KV]`` mask padded with False."""
    b, q, kv = dense.shape
    nq, nkv = -(-q // block_size), -(-kv // block_size)
    padded = torch.zeros(b, nq * block_size, nkv * block_size, dtype=torch.bool)
    padded[:, :q, :kv] = dense
    tiles = padded.view(b, nq, block_size, nkv, block_size).sum((2, 4))
    return torch.where(tiles == block_size * block_size, 2, (tiles > 0).long())


def assert_same_block_tables(ours, theirs) -> None:
    """Two BlockMasks list the same full and partial blocks for every row (indices in any order:
    torch does not promise one), on the same device."""
    assert ours.shape == theirs.shape and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    for table in ("kv", "full_kv", "q", "full_q"):
        a_num, b_num = getattr(ours, f"{table}_num_blocks"), getattr(theirs, f"{table}_num_blocks")
        assert a_num.device == b_num.device, table
        assert torch.equal(a_num, b_num), table
        a_idx, b_idx = getattr(ours, f"{table}_indices"), getattr(theirs, f"{table}_indices")
        n = a_idx.shape[-1]
        valid = torch.arange(n, device=a_idx.device) < a_num[..., None]
        a_sorted = torch.where(valid, a_idx, n + 1).sort(-1).values
        b_sorted = torch.where(valid, b_idx[..., :n], n + 1).sort(-1).values
        assert torch.equal(a_sorted, b_sorted), f"{table}_indices"


def attention(q: Tensor, k: Tensor, v: Tensor, dense: Tensor | None, scores_fn=None) -> Tensor:
    """Float64 softmax attention by hand; rows that see nothing give zeros.

    q: [B, H, S, D]; k, v: [B, H_kv, S_kv, D]; dense: broadcastable to [B, H, S, S_kv].
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if scores_fn is not None:
        scores = scores_fn(scores)
    if dense is None:
        dense = torch.ones_like(scores, dtype=torch.bool)
    dense = dense.expand_as(scores)
    weights = torch.softmax(scores.masked_fill(~dense, float("-inf")), dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a row that sees nothing: 0/0
    return weights @ v


# -- Transformers' legacy AttentionMaskConverter, from its documented behaviour -------------------
# (transformers.modeling_attn_mask_utils, removed in transformers 5.24): additive float masks,
# 0 = attend, finfo(dtype).min = masked, shape [B, 1, q_len, kv_len]. The queries are the last
# q_len of the kv_len positions (past keys come first).


def legacy_causal_4d(
    batch: int, q_len: int, kv_len: int, sliding_window: int | None = None, dtype=torch.float32
) -> Tensor:
    """``to_causal_4d``: query ``i`` (absolute ``past + i``) sees keys up to itself; with the
    legacy ``sliding_window=w`` it also sees at most ``w`` keys before itself (``w + 1`` in all)."""
    past = kv_len - q_len
    q = torch.arange(q_len)[:, None] + past
    kv = torch.arange(kv_len)[None, :]
    keep = kv <= q
    if sliding_window is not None:
        keep &= q - kv <= sliding_window
    return _additive(keep, dtype).expand(batch, 1, q_len, kv_len)


def legacy_to_4d(
    mask_2d: Tensor,
    q_len: int,
    kv_len: int,
    is_causal: bool = True,
    sliding_window: int | None = None,
    dtype=torch.float32,
) -> Tensor:
    """``to_4d``: the 2-D padding mask masks keys only (every query row, pads included, sees the
    real keys); causal (and windowed) on top when ``is_causal`` and there is more than one query
    or a window."""
    keys = mask_2d.bool()[:, None, None, :].expand(-1, 1, q_len, kv_len)
    keep = keys
    if is_causal and (q_len > 1 or sliding_window is not None):
        keep = keep & (legacy_causal_4d(1, q_len, kv_len, sliding_window, dtype) == 0)
    return _additive(keep, dtype)


def legacy_unmask_unattended(expanded: Tensor, min_value: float) -> Tensor:
    """``_unmask_unattended``: a query row masked everywhere is made to attend everywhere (an old
    SDPA workaround); other rows are left as they are."""
    dead = (expanded == min_value).all(-1, keepdim=True)
    return expanded.masked_fill(dead, 0.0)


def legacy_prepare_4d_causal(mask_2d: Tensor | None, batch: int, q_len: int, past: int,
                             dtype=torch.float32) -> Tensor:  # fmt: skip
    """``_prepare_4d_causal_attention_mask``: ``to_4d`` of the 2-D mask over ``past + q_len``
    keys, or ``to_causal_4d`` without one."""
    if mask_2d is None:
        return legacy_causal_4d(batch, q_len, past + q_len, dtype=dtype)
    return legacy_to_4d(mask_2d, q_len, past + q_len, dtype=dtype)


def _additive(keep: Tensor, dtype) -> Tensor:
    out = torch.zeros(keep.shape, dtype=dtype)
    return out.masked_fill(~keep, torch.finfo(dtype).min)
