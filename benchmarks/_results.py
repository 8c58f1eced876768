"""Where every benchmark writes: ``benchmarks/results/NAME.json`` (the rows and the machine's
software) and ``NAME.md`` (the table the closing notes and the README quote)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flexmask.tuning import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def save(
    name: str,
    rows: list[dict[str, Any]],
    header: list[str],
    align: str,
    cells: Callable[[dict[str, Any]], list[str]],
    **meta: Any,
) -> None:
    """Write ``NAME.json`` and ``NAME.md`` (one column per ``header`` entry, ``align`` a string
    of ``l``/``r`` per column), and print the table."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": cpu_name(),
            "cpu_flags": cpu_flags(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **meta}  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "".join("---:|" if a == "r" else "---|" for a in align),
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_fp16", "asimd", "sve")  # fmt: skip
"""The CPU features that decide which kernels run (and so which backend is fastest)."""


def cpu_flags() -> list[str]:
    """Which of ``MATMUL_FLAGS`` this CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in MATMUL_FLAGS if f in have]
    except OSError:
        pass
    return []
