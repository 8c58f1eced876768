"""The sparse-or-dense threshold of ``backend="auto"`` on CPU, measured on the machine that runs it.

Which is faster, the sparse path or SDPA with the dense mask, depends on the CPU (its kernels
and vector units), the dtype, and whether a backward pass follows; a threshold measured on one
machine is wrong on another. ``calibrate`` times both on a ladder of local windows (2048
tokens, 8 heads of 64) whose plan cost runs from sparse to full, and keeps, per dtype and for
inference and training, the cost up to which the sparse path won: the midpoint between the
costliest case it won and the cheapest it lost. That takes about half a minute per dtype (2
cores), most of it flex's.

For inference it also times compiled FlexAttention (``flex_attention`` on the BlockMask) on the
same ladder: on some CPUs (an AMD EPYC with AVX-512 BF16) its kernel beats the sparse path in
float32, on others (an Intel Xeon) it is several times slower. ``auto`` runs flex on CPU only
where it measured at most ``FLEX_MARGIN`` of the sparse path's time, up to the cost where it
still beat dense SDPA. Compiling it costs seconds once per dtype (and per new shape later).

The result is stored per machine (CPU model, core count, torch version) in
``$XDG_CACHE_HOME/flexmask/`` (``~/.cache/flexmask/``). ``auto`` calibrates a dtype on its first
CPU call that needs the threshold, or ``flexmask tune`` does it ahead; ``flexmask tune --show``
prints what was measured. ``FLEXMASK_TUNING=off`` turns measuring off (tests and CI: the choice
is then deterministic): ``auto`` then uses the cost model, ``SPARSE_MAX_DENSITY``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

from .block import block_mask
from .coverage import as_dense_mask
from .dense import to_dense
from .masks import local_window
from .runners import MaskForms, Options, flex, masked_sdpa
from .sparse import sparse_attention
from .sparse_plan import plan

__all__ = ["TUNING_ENV", "calibrate", "cpu_name", "enabled", "measured_flex",
           "measured_max_density", "stored"]  # fmt: skip

TUNING_ENV = "FLEXMASK_TUNING"
TOKENS, HEADS, HEAD_DIM = 2048, 8, 64
WINDOWS = (64, 384, 768, 1152, 2048)  # local_window(w, w): plan costs from about 0.1 to 1
FLEX_MARGIN = 0.9
"""Flex replaces the sparse path on CPU when its median time over the ladder is at most this
fraction of the sparse path's: a clear win, since each new shape costs flex a compile."""
_LOADED: dict[str, Any] = {}


def enabled() -> bool:
    """Whether measuring is on (``FLEXMASK_TUNING`` is not ``off``, ``0`` or ``false``)."""
    return os.environ.get(TUNING_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


FORMAT = 2  # 2: inference times flex too; a file of another format is measured again


@functools.cache  # constant for the process, and read on every CPU dispatch
def machine() -> dict[str, Any]:
    """What a measurement is valid for."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "format": FORMAT}  # fmt: skip


@functools.cache
def _file_name() -> str:
    m = machine()
    name = "".join(c if c.isalnum() else "-" for c in f"{m['cpu']}-{m['cores']}-{m['torch']}")
    return f"dispatch-{name}.json"


def path() -> Path:
    """The file this machine's measurements live in."""
    return Path(_location())


def _location() -> str:
    # plain strings: this runs on every CPU dispatch, and pathlib costs tens of microseconds
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "flexmask", _file_name())


def stored() -> dict[str, Any]:
    """This machine's measurements: ``{dtype: {"inference": {...}, "training": {...}}}`` with each
    mode's ``max_density`` and its timed ``cases``; empty when none."""
    key = _location()
    if key not in _LOADED:
        try:
            data = json.loads(Path(key).read_text())
        except (OSError, ValueError):
            data = {}
        _LOADED[key] = data.get("dtypes", {}) if data.get("machine") == machine() else {}
    return _LOADED[key]


def measured_max_density(dtype: torch.dtype, training: bool, default: float) -> tuple[float, str]:
    """``auto``'s threshold for ``dtype`` and the mode, and where it comes from: measured on this
    machine (calibrating now if it never was), or ``default`` (the cost model) when measuring
    is off."""
    if not enabled():
        return default, f"the cost model ({TUNING_ENV}=off)"
    entry = _measured(dtype)["training" if training else "inference"]
    return entry["max_density"], f"measured on this machine ({_location()})"


def measured_flex(dtype: torch.dtype) -> dict[str, Any] | None:
    """Flex's inference measurement for ``dtype`` when it won on this machine: ``{"vs_sparse":
    its median time over the sparse path's, "max_density": the cost up to which it beat dense
    SDPA}``; None when measuring is off, or flex was not a clear win (``FLEX_MARGIN``)."""
    if not enabled():
        return None
    measured = _measured(dtype)["inference"].get("flex") or {}
    ratio = measured.get("vs_sparse")
    return measured if ratio is not None and ratio <= FLEX_MARGIN else None


def _measured(dtype: torch.dtype) -> dict[str, Any]:
    """This machine's measurements of ``dtype``, calibrating now if it never was."""
    name = str(dtype).removeprefix("torch.")
    if name not in stored():
        calibrate([dtype])
    return stored()[name]


def calibrate(
    dtypes: list[torch.dtype] | None = None, *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Time the sparse path against dense SDPA for each dtype (default float32 and bfloat16),
    inference and training, and compiled flex for inference; store the thresholds, and return
    this machine's measurements."""
    results = dict(stored())
    for dtype in dtypes or [torch.float32, torch.bfloat16]:
        name = str(dtype).removeprefix("torch.")
        entry: dict[str, Any] = {}
        for training in (False, True):
            cases, flex_error = [], None
            for window in WINDOWS:
                mask = local_window(window, window)
                bm = block_mask(mask, TOKENS, device="cpu")
                dense = as_dense_mask(to_dense(mask, TOKENS, device="cpu"))
                q, k, v = _inputs(dtype, training)
                sparse_ms = _time(functools.partial(sparse_attention, q, k, v, bm), training)
                dense_ms = _time(functools.partial(masked_sdpa, q, k, v, dense), training)
                case: dict[str, Any] = {"window": window, "cost": plan(bm).cost,
                                        "sparse_ms": sparse_ms, "dense_ms": dense_ms}  # fmt: skip
                if not training and flex_error is None:  # one failure: no flex here
                    case["flex_ms"], flex_error = _flex_ms(q, k, v, bm)
                cases.append(case)
                if log:
                    timed = f", flex {case['flex_ms']:.1f} ms" if case.get("flex_ms") else ""
                    log(f"{name} {'training' if training else 'inference'} "
                        f"local_window({window}, {window}): cost {plan(bm).cost:.2f}, sparse "
                        f"{sparse_ms:.1f} ms, dense {dense_ms:.1f} ms{timed}")  # fmt: skip
            mode = "training" if training else "inference"
            entry[mode] = {"max_density": threshold(cases), "cases": cases}
            if not training:
                entry[mode]["flex"] = _flex_summary(cases, flex_error)
        results[name] = entry
    _store(results)
    return results


def threshold(cases: list[dict[str, Any]], timed: str = "sparse_ms") -> float:
    """The cost up to which the path ``timed`` (the sparse path, or flex) beat dense SDPA: midway
    between the costliest case it won and the cheapest it lost (0 if it lost the cheapest, 1 if
    it won them all)."""
    ordered = sorted(cases, key=lambda c: c["cost"])
    won = [c[timed] < c["dense_ms"] for c in ordered]
    if all(won):
        return 1.0
    first_loss = won.index(False)
    if first_loss == 0:
        return 0.0
    return (ordered[first_loss - 1]["cost"] + ordered[first_loss]["cost"]) / 2


def _flex_summary(cases: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
    """Flex against the others on the ladder: its median time over the sparse path's and its
    threshold against dense SDPA, or why it could not run."""
    if error is not None or not cases:
        return {"vs_sparse": None, "max_density": 0.0, "error": error}
    ratios = sorted(c["flex_ms"] / c["sparse_ms"] for c in cases)
    return {"vs_sparse": ratios[len(ratios) // 2], "max_density": threshold(cases, "flex_ms"),
            "error": None}  # fmt: skip


def _flex_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMask
             ) -> tuple[float | None, str | None]:  # fmt: skip
    """Compiled flex's forward time on ``bm``, or None and why it failed (no C++ compiler for
    inductor, a kernel torch cannot build here): then auto never picks flex on this CPU."""
    forms = MaskForms(block=bm)  # the runner auto would call, on the same BlockMask
    try:
        return _time(functools.partial(flex, q, k, v, forms, Options()), False), None
    except Exception as error:  # compilers fail in many ways; each means "no flex here"
        first_line = (str(error).splitlines() or [""])[0]
        return None, f"{type(error).__name__}: {first_line}"


def _inputs(dtype: torch.dtype, training: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, HEADS, TOKENS, HEAD_DIM, generator=gen, dtype=dtype)
            .requires_grad_(training) for _ in range(3)]  # fmt: skip


def _time(attend: Callable[[], torch.Tensor], training: bool) -> float:
    """Milliseconds of one call (forward, or forward and backward), the better of two after a
    warm-up; outside inference mode, whatever the caller's."""
    with torch.inference_mode(False), torch.set_grad_enabled(training):
        best = float("inf")
        for i in range(3):
            start = time.perf_counter()
            out = attend()
            if training:
                out.sum().backward()
            if i:
                best = min(best, time.perf_counter() - start)
    return best * 1e3


def _store(results: dict[str, Any]) -> None:
    target = path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({"machine": machine(), "dtypes": results}, indent=1))
        tmp.replace(target)
    except OSError:  # a read-only home: keep the measurements for this process only
        pass
    _LOADED[_location()] = results


@functools.cache  # /proc/cpuinfo costs 0.2 ms a read
def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
