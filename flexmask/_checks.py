"""Every argument check, written once: errors before any tensor work.

Wrong types get a TypeError, wrong values a ValueError, each saying what was expected, what came
and how to fix it. Work whose size cannot fit in memory is refused here too, before allocating.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from .masks import MaskMod

MAX_INDEX = 2**62
"""The largest length, window or offset flexmask takes: far past any sequence, and safe in the
int64 arithmetic of masks (``q_idx - kv_idx < window``)."""


def check_int(value: object, name: str, minimum: int = 1, expected: str | None = None) -> int:
    """An int in ``[minimum, MAX_INDEX]``: TypeError for another type, ValueError for another
    value. ``name`` is the argument as the user wrote it. The message says "must be
    {expected}", or without ``expected`` "needs an int" / "needs a value >= {minimum}"."""
    if isinstance(value, bool) or not isinstance(value, int):
        what = f"must be {expected}" if expected else "needs an int"
        raise TypeError(f"{name} {what}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        what = f"must be {expected}" if expected else f"needs a value >= {minimum}"
        raise ValueError(f"{name} {what}, got {value!r}.")
    if value > MAX_INDEX:
        what = f"must be {expected}" if expected else "needs a value <= 2**62"
        raise ValueError(f"{name} {what}, got {value!r}.")
    return value


def capture(tensor: Tensor) -> Tensor:
    """A private copy of a tensor a mask keeps: detached, so later edits of the caller's tensor
    don't leak in, and never an inference tensor, so a mask made under ``torch.inference_mode``
    still serves training."""
    with torch.inference_mode(False):
        return tensor.detach().clone()


def int_tensor(value: object, call: str, ranks: tuple[int, ...]) -> Tensor:
    """An integer tensor (or list of ints) of one of ``ranks``, captured (see ``capture``)."""
    if isinstance(value, Tensor):
        tensor = value
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:  # an empty list would make a float tensor
            tensor = torch.tensor(value) if len(value) else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            if _all_ints(value):  # ints past int64
                raise ValueError(f"{call} needs integers below 2**63, got {value!r}.") from None
            raise TypeError(f"{call} needs integers, got {value!r} ({err}).") from None
    else:
        raise TypeError(
            f"{call} needs an integer tensor (or a list of ints), got {type(value).__name__}."
        )
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(
            f"{call} needs an integer tensor, got dtype {tensor.dtype}; convert it with "
            ".long() (or pass a list of ints)."
        )
    if tensor.dim() not in ranks:
        shapes = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{call} needs a {shapes} tensor, got shape {tuple(tensor.shape)}.")
    if tensor.is_meta:
        raise ValueError(
            f"{call} got a meta tensor, which holds no values; pass one on 'cpu' or an accelerator."
        )
    return capture(tensor)


def _all_ints(value: object) -> bool:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return all(_all_ints(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def lengths_tensor(value: object, call: str, needs: str) -> Tensor:
    """A non-empty 1-D tensor of counts in ``[0, 2**62]``, captured."""
    tensor = int_tensor(value, call, ranks=(1,))
    if tensor.numel() == 0:
        raise ValueError(f"{call} needs {needs}, got an empty tensor.")
    if int(tensor.min()) < 0:
        raise ValueError(f"{call} needs lengths >= 0, got {tensor.tolist()}.")
    if int(tensor.max()) > MAX_INDEX:
        raise ValueError(f"{call} needs lengths <= 2**62, got {int(tensor.max())}.")
    return tensor


def check_kernel_options(value: object, name: str) -> dict[str, Any] | None:
    """None, or a mapping of flex's kernel option names (str) to values, copied."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(
            f"{name} must be None or a dict of flex_attention's kernel options "
            f"(e.g. {{'BLOCK_M': 64}}), got {value!r}."
        )
    return dict(value)


def check_flag(value: object, name: str) -> bool:
    """A bool (an int or a string is refused: ``boolean=1`` is most likely a mistake)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_float_dtype(value: object, name: str) -> torch.dtype:
    """A floating torch dtype (what masks, caches and attention hold values in)."""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{name} needs a floating dtype, got {value!r}.")
    return value


def check_lengths(q_len: object, kv_len: object) -> int:
    """Validate ``q_len`` and ``kv_len`` (None means ``q_len``); return ``kv_len``."""
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if value is None and name == "kv_len":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}=... must be an int, got {type(value).__name__} {value!r}.")
        if value <= 0:
            raise ValueError(f"{name}=... must be a positive number of tokens, got {value}.")
        if value > MAX_INDEX:
            raise ValueError(f"{name}=... must be at most 2**62 tokens, got {value}.")
    return q_len if kv_len is None else kv_len  # type: ignore[return-value]


def check_count(value: object, name: str, allow_none: bool = True) -> int | None:
    """``batch``/``heads``: a positive int, or None where ``allow_none``."""
    if value is None and allow_none:
        return None
    what = "None or a positive int" if allow_none else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}=... must be {what}, got {type(value).__name__} {value!r}.")
    if value < 1 or value > MAX_INDEX:
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


def as_device(value: object, name: str, allow_meta: bool = False) -> torch.device:
    """``value`` as a torch device that exists on this machine and, unless ``allow_meta``,
    holds values."""
    device = _parse_device(value, name)
    if device.type == "meta" and not allow_meta:
        raise ValueError(
            f"{name} is 'meta', which holds shapes but no values, so no mask can be evaluated "
            "there; use 'cpu' or an accelerator."
        )
    if device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(
                f"{name} is {str(device)!r}, but this machine (torch {torch.__version__}) has no "
                f"{device.type} device; use 'cpu'."
            )
    return device


def _parse_device(value: object, name: str) -> torch.device:
    if not isinstance(value, (str, torch.device)):
        raise TypeError(
            f"{name} must be a torch.device or a str such as 'cpu' or 'cuda', got "
            f"{type(value).__name__} {value!r}."
        )
    try:
        return torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{name} must name a torch device such as 'cpu' or 'cuda:0', got {value!r}."
        ) from None


def resolve_device(mask: MaskMod, device: object) -> torch.device:
    """The device to build on: ``device``, else the mask's, else torch's current accelerator/CPU.
    A mask held elsewhere is moved there by ``placed``."""
    held = mask.device
    if held is not None and held.type == "meta":
        raise ValueError(
            f"the mask {mask!r} holds meta tensors (shapes, no values), so it cannot be "
            "evaluated; build it from tensors on the CPU or an accelerator."
        )
    if device is None:
        return held or torch.device(
            torch.accelerator.current_accelerator(check_available=True) or "cpu"
        )
    return as_device(device, "device=...")


def placed(mask: MaskMod, device: torch.device) -> MaskMod:
    """``mask`` with its tensors on ``device``: the same values, copied there if they are
    elsewhere (a mask made from a Python list holds CPU tensors; its users run on CUDA)."""
    held = mask.device
    return mask if held is None or _same_device(held, device) else mask.to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_block_mask_shape(
    bm: BlockMask, name: str, bsz: int, heads: int, q_len: int, kv_len: int
) -> None:
    """A ready BlockMask fits inputs of ``bsz`` rows, ``heads`` heads, ``q_len x kv_len``
    (batch and heads of 1 broadcast); ``name`` is the argument that gave it."""
    mb, mh = bm.kv_num_blocks.shape[:2]
    if bm.seq_lengths != (q_len, kv_len) or mb not in (1, bsz) or mh not in (1, heads):
        raise ValueError(
            f"{name} has shape {tuple(bm.shape)} but the input needs (B in {{1, {bsz}}}, H in "
            f"{{1, {heads}}}, {q_len}, {kv_len}); build it with flexmask.block_mask(mask, "
            f"q_len={q_len}, kv_len={kv_len}) or pass the mask itself."
        )


def check_block_size(block_size: object) -> int:
    """Block sizes must be positive multiples of 16: what FlexAttention's GPU kernels tile by."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"block_size=... must be an int, got {type(block_size).__name__} {block_size!r}."
        )
    if block_size < 16 or block_size % 16 or block_size > MAX_INDEX:
        raise ValueError(
            f"block_size=... must be a positive multiple of 16 (e.g. 64 or 128), got {block_size}."
        )
    return block_size


def check_block_sizes(block_size: object) -> tuple[int, int]:
    """``block_size`` as ``(q_block, kv_block)``: an int for both, or a pair (as torch's
    ``BLOCK_SIZE``), each a positive multiple of 16."""
    if isinstance(block_size, tuple) and len(block_size) == 2:
        return check_block_size(block_size[0]), check_block_size(block_size[1])
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"block_size=... must be an int or a pair (q_block, kv_block), got "
            f"{type(block_size).__name__} {block_size!r}."
        )
    size = check_block_size(block_size)
    return size, size


# --------------------------------------------------------------------------------------------
# Memory: refuse work that cannot fit, before allocating it
# --------------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CPU: MemAvailable, else all RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no way to tell: let the allocator decide
        return 1 << 62


_ALWAYS_FREE = 1 << 24  # 16 MiB: less than any machine that runs torch has free


def check_memory(nbytes: int, what: str, instead: str, device: torch.device | None = None) -> None:
    """Raise ValueError when ``what`` would need more than the free memory of ``device``.

    Args:
        nbytes: the estimated peak bytes of the work.
        what: the work, e.g. ``"to_dense(q_len=1000000, kv_len=1000000)"``.
        instead: what to do instead, one clause.
    """
    if nbytes <= _ALWAYS_FREE:  # not worth asking the system (a decode step's mask)
        return
    free = free_memory(device or torch.device("cpu"))
    if nbytes > free:
        where = "this machine" if device is None or device.type == "cpu" else str(device)
        raise ValueError(
            f"{what} would take about {format_bytes(nbytes)}, more than the "
            f"{format_bytes(free)} free on {where}; {instead}."
        )


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# MultiheadFlexAttention's arguments and inputs
# --------------------------------------------------------------------------------------------


def check_module_config(
    embed_dim: int, out_dim: int, kdim: int, vdim: int, num_heads: int, num_kv_heads: int,
    dropout: float, backend: str, backends: tuple[str, ...], score_mod: object,
    density: float | None,
) -> None:  # fmt: skip
    """``MultiheadFlexAttention``'s arguments, checked before anything is built."""
    for name, value in (("embed_dim", embed_dim), ("out_dim", out_dim), ("kdim", kdim),
                        ("vdim", vdim), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads)):  # fmt: skip
        check_int(value, f"MultiheadFlexAttention({name}=...)", expected="a positive int")
    if out_dim % num_heads:
        what = "out_dim" if out_dim != embed_dim else "embed_dim"
        raise ValueError(
            f"MultiheadFlexAttention({what}={out_dim}, num_heads={num_heads}): {what} "
            f"must be divisible by num_heads to split it into heads; pick num_heads among "
            f"{[h for h in range(1, min(out_dim, 64) + 1) if out_dim % h == 0]}."
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"MultiheadFlexAttention(num_heads={num_heads}, num_kv_heads={num_kv_heads}): "
            "num_heads must be divisible by num_kv_heads (each key/value head serves a "
            "group of query heads)."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"MultiheadFlexAttention(dropout=...) must be a number in [0, 1), "
                        f"got {dropout!r}.")  # fmt: skip
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"MultiheadFlexAttention(dropout=...) must be in [0, 1), got "
                         f"{dropout!r}.")  # fmt: skip
    if backend not in backends:
        raise ValueError(
            f"MultiheadFlexAttention(backend=...) must be one of {backends}, got {backend!r}."
        )
    if score_mod is not None and not callable(score_mod):
        raise TypeError(
            f"MultiheadFlexAttention(score_mod=...) must be a callable (score, b, h, q_idx, "
            f"kv_idx) -> score, got {type(score_mod).__name__}."
        )
    if density is None:  # measured on this machine (flexmask.tuning)
        return
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(
            "MultiheadFlexAttention(sparse_max_density=...) must be a number in [0, 1], got "
            f"{density!r}."
        )
    if not 0 <= density <= 1:
        raise ValueError(
            "MultiheadFlexAttention(sparse_max_density=...) must be a block density in "
            f"[0, 1] (0: never the sparse path, 1: always), got {density!r}."
        )


def check_module_input(t: object, name: str, width: int, weight: Tensor, x: Tensor) -> None:
    """``forward``'s ``x`` or a context source against its width, the weights' dtype and device,
    and ``x``'s batch."""
    if not isinstance(t, Tensor):
        raise TypeError(f"forward({name}=...) must be a tensor [B, S, {width}], got "
                        f"{type(t).__name__}.")  # fmt: skip
    if t.dim() != 3 or t.shape[-1] != width:
        raise ValueError(
            f"forward({name}=...) must have shape [B, S, {width}] (batch first, width last), "
            f"got {tuple(t.shape)}."
        )
    if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(
            f"forward({name}=...) is {t.dtype} but the module's weights are "
            f"{weight.dtype}; convert one of them, e.g. {name}.to({weight.dtype}) or "
            f"module.to({t.dtype})."
        )
    if t.device != weight.device:
        raise ValueError(
            f"forward({name}=...) is on {t.device} but the module's weights are on "
            f"{weight.device}; move one of them, e.g. {name}.to('{weight.device}')."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(
            f"forward({name}=...) needs at least one sequence of one token, got shape "
            f"{tuple(t.shape)}."
        )
    if t.shape[0] != x.shape[0]:
        raise ValueError(
            f"forward(context=...) has batch {t.shape[0]} but x has batch "
            f"{x.shape[0]}; give one context sequence per query sequence."
        )
