"""Rotary position embeddings (RoPE) for ``MultiheadFlexAttention(rope_theta=...)``: Llama's
rotate-half convention over the whole head dim, and the positions a call's tokens take."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cache import KVCache

__all__ = ["check_rope_theta", "rotate", "token_positions"]


def check_rope_theta(theta: object, head_dim: int) -> float | None:
    if theta is None:
        return None
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"MultiheadFlexAttention(rope_theta=...) must be a number or None, got "
                        f"{theta!r}.")  # fmt: skip
    if not (math.isfinite(theta) and theta > 1):
        raise ValueError(f"MultiheadFlexAttention(rope_theta=...) must be above 1, got {theta!r}.")
    if head_dim % 2:
        raise ValueError(
            f"rotary embeddings rotate pairs of dimensions: the head dim must be even, got "
            f"{head_dim}."
        )
    return float(theta)


def token_positions(
    positions: Tensor | None, x: Tensor, cache: KVCache | None, lengths: Tensor | None, side: str
) -> Tensor:
    """Each token's position ``[B or 1, S]``: given, or counted from the cache's length (left
    pads before a row's real tokens get the positions before them, which nothing reads)."""
    bsz, s_q, _ = x.shape
    if positions is not None:
        if not isinstance(positions, Tensor) or positions.dtype.is_floating_point:
            raise TypeError("forward(positions=...) must be an integer tensor [S] or [B, S].")
        if positions.shape not in ((s_q,), (bsz, s_q), (1, s_q)):
            raise ValueError(
                f"forward(positions=...) must be [S] or [B, S] = [{s_q}] or [{bsz}, {s_q}], got "
                f"{tuple(positions.shape)}."
            )
        return positions.to(x.device).long().reshape(-1, s_q)
    at = torch.arange(s_q, device=x.device)[None]
    if cache is None:
        return at
    start = cache.lengths.to(x.device)[:, None]
    if side == "left" and lengths is not None:
        start = start - (s_q - lengths.to(x.device).long()[:, None])
    return start + at


def rotate(q: Tensor, k: Tensor, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """Rotary embeddings on ``q [B, H, S, D]`` and ``k [B, H_kv, S, D]`` at ``positions [B or 1,
    S]``: Llama's rotate-half (``t * cos + rotate_half(t) * sin``, frequencies
    ``theta^(-2i/D)``), computed in float32, the angles once for both."""
    d = q.shape[-1]
    inv_freq = theta ** -(torch.arange(0, d, 2, device=q.device, dtype=torch.float32) / d)
    angles = positions[:, None, :, None].float() * inv_freq  # [B, 1, S, D/2]
    cos, sin = (torch.cat([f, f], dim=-1) for f in (angles.cos(), angles.sin()))

    def turned(t: Tensor) -> Tensor:
        half = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], dim=-1)
        return (t.float() * cos + half.float() * sin).to(t.dtype)

    return turned(q), turned(k)
