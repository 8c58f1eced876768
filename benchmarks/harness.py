"""The timing harness every benchmark shares: warm-up, repetitions run round-robin across the
methods of one case (so drift on a shared machine hits them all alike), median and spread, a
progress bar on stderr, the matmul peak of this run, and plots under ``figures/bench/``."""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

FIGURES = Path(__file__).resolve().parent.parent / "figures" / "bench"


@dataclass(frozen=True)
class Timing:
    median_s: float
    spread: float  # (max - min) / median over the repetitions

    @property
    def ms(self) -> float:
        return self.median_s * 1e3


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(
    methods: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    dev: torch.device,
    budget_s: float = 0.0,
    max_repeats: int = 25,
) -> dict[str, Timing]:
    """Time each method ``repeats`` times after ``warmup`` calls (compiling, caching), in rounds
    that run every method once, so that drift hits them all alike; each round in a new (seeded)
    order, so that no method always runs right after the same neighbour (one that leaves threads
    spinning or memory to give back would otherwise tax it every time). With ``budget_s``, as
    many rounds as fit in it (at least ``repeats``, at most ``max_repeats``)."""
    for i in range(warmup):
        start = time.perf_counter()
        for fn in methods.values():
            fn()
        if i == warmup - 1 and budget_s:  # fast cases get more rounds: their noise is larger
            rounds = budget_s / max(time.perf_counter() - start, 1e-9)
            repeats = max(repeats, min(max_repeats, int(rounds)))
    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(repeats):
        for name in random.Random(rep).sample(list(methods), len(methods)):
            fn = methods[name]
            _sync(dev)
            start = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = Timing(med, (max(ts) - min(ts)) / med)
    return out


class Progress:
    """``[#####.....] 12/40 label`` on stderr, rewritten in place."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        filled = 30 * self.done // max(1, self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (30 - filled)
        print(f"\r[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label:<50.50}", end="",
              file=sys.stderr, flush=True)  # fmt: skip
        if self.done == self.total:
            print(file=sys.stderr)


def matmul_peak(dtype: torch.dtype, dev: torch.device, n: int = 2048) -> float:
    """GFLOP/s of one ``n x n`` matmul in ``dtype``: the roofline the attention numbers are read
    against (measured in the same run, since the shared machine drifts)."""
    a = torch.randn(n, n, dtype=dtype, device=dev)
    t = measure({"mm": lambda: a @ a}, warmup=2, repeats=5, dev=dev)["mm"]
    return 2 * n**3 / t.median_s / 1e9


def attention_flops(visited_elements: int, head_dim: int, heads: int, backward: bool) -> float:
    """FLOPs of ``QK^T`` and ``PV`` over ``visited_elements`` query-key pairs per head; with the
    backward pass x3.5 (seven matmuls, the scores recomputed, against the forward's two)."""
    fwd = 4.0 * visited_elements * head_dim * heads
    return fwd * 3.5 if backward else fwd


def save_plot(name: str, panels: dict[str, dict[str, list[tuple[float, float]]]], *,
              xlabel: str, ylabel: str, logx: bool = True, lines: bool = True) -> Path:  # fmt: skip
    """One PNG with a panel per key of ``panels``, one line per method: ``[(x, y), ...]``."""
    from matplotlib.figure import Figure

    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (title, by_method) in zip(axes, panels.items(), strict=False):
        for method, points in sorted(by_method.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", linestyle="-" if lines else "none", label=method)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=90)
    return path
