"""Argument checks shared by block.py, convert.py and attention.py (errors before tensor work)."""

from __future__ import annotations

import torch

from .masks import MaskMod


def check_lengths(q_len: object, kv_len: object) -> int:
    """Validate ``q_len`` and ``kv_len`` (None means ``q_len``); return ``kv_len``."""
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if value is None and name == "kv_len":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}=... must be an int, got {type(value).__name__} {value!r}.")
        if value <= 0:
            raise ValueError(f"{name}=... must be a positive number of tokens, got {value}.")
    return q_len if kv_len is None else kv_len  # type: ignore[return-value]


def check_count(value: object, name: str, allow_none: bool = True) -> int | None:
    """``batch``/``heads``: a positive int, or None where ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "None or a positive int" if allow_none else "a positive int"
        raise ValueError(f"{name}=... must be {what}, got {value!r}.")
    return value


def resolve_batch(mask: MaskMod, batch: object, default: int | None = 1) -> int | None:
    """The batch size to build for: ``batch``, else the mask's per-batch rows, else ``default``."""
    batch = check_count(batch, "batch")
    rows = mask.batch_size
    if batch is None:
        return rows if rows is not None else default
    if rows is not None and rows != batch:
        raise ValueError(
            f"batch={batch} disagrees with the mask {mask!r}, whose per-batch tensors have "
            f"{rows} rows; pass batch={rows} (or batch=None) or give one entry per batch row."
        )
    return batch


def resolve_device(mask: MaskMod, device: torch.device | str | None) -> torch.device:
    """The device to build on: ``device``, else the mask's, else torch's current accelerator/CPU."""
    held = mask.device
    if device is None:
        return held or torch.device(torch.accelerator.current_accelerator() or "cpu")
    want = torch.device(device)
    if held is not None and not _same_device(held, want):
        raise ValueError(
            f"device={str(want)!r} was asked but the mask {mask!r} holds tensors on "
            f"{str(held)!r}; move it with mask.to({str(want)!r}) or leave device=None."
        )
    return want


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_block_size(block_size: object) -> int:
    """Block sizes must be positive multiples of 16: what FlexAttention's GPU kernels tile by."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"block_size=... must be an int, got {type(block_size).__name__} {block_size!r}."
        )
    if block_size < 16 or block_size % 16:
        raise ValueError(
            f"block_size=... must be a positive multiple of 16 (e.g. 64 or 128), got {block_size}."
        )
    return block_size
