"""Where every benchmark writes: ``benchmarks/results/NAME.json`` (the rows and the machine's
software) and ``NAME.md`` (the table the closing notes and the README quote)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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
            "threads": torch.get_num_threads(), **meta}  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "".join("---:|" if a == "r" else "---|" for a in align),
    ]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
