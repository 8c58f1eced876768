"""Peak memory of building BlockMasks and of attention with backward (``make bench``; ``--quick``
for CI). Writes ``benchmarks/results/memory[_quick].{json,md}``.

Each measurement runs once to warm up (compiling, caches), then the process's peak resident
memory is reset (Linux ``/proc/self/clear_refs``) and the call is run again: the table shows
how far the peak rose above the memory held before the call. Host memory, so it runs on CPU
even where a GPU exists (GPU memory would be ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _results import save
from harness import Progress
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import flexmask as fm
from flexmask.coverage import as_dense_mask
from flexmask.runners import masked_sdpa

STATUS = Path("/proc/self/status")


def _kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M)
    assert match, f"{field} missing from {STATUS}"
    return int(match.group(1))


def honest_peaks(script: str) -> None:
    """Make this process's peaks measurable, or exit saying why: Linux only (``/proc``), and a
    fixed glibc mmap threshold (set by re-executing the script, which child processes inherit):
    big buffers are mapped and unmapped, never kept by malloc for reuse, so a measured call's
    peak shows its own allocations."""
    if not STATUS.exists():
        raise SystemExit(f"{script} reads /proc/self/status for peak memory: Linux only")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def peak_rise_mib(fn: Callable[[], object]) -> float:
    """MiB the resident-memory peak rises above the current resident memory while ``fn`` runs
    (its result is dropped afterwards)."""
    fn()  # warm-up: compiled code, caches, allocator pools
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _kib("VmRSS")
    result = fn()
    peak = _kib("VmHWM")
    del result
    return (peak - before) / 1024


def cases(quick: bool) -> list[tuple[str, str, int, Callable[[], object], int]]:
    """(what, method, tokens, call, visited blocks)."""
    compiled = torch.compile(create_block_mask)
    out = []
    for n in [2048] if quick else [4096, 16384, 65536]:
        for name, mask in builds(n).items():
            blocks = visited_blocks(fm.block_mask(mask, n, device="cpu", cache=False))
            what = f"build {name}"
            tiles = functools.partial(fm.block_mask, mask, n, device="cpu", cache=False,
                                      method="tiles")  # fmt: skip
            out.append((what, "tiles", n, tiles, blocks))
            torch_args = (mask, None, None, n, n, "cpu")
            if n <= 16384:
                call = functools.partial(compiled, *torch_args)
                out.append((what, "compiled create_block_mask", n, call, blocks))
            if n <= 4096:  # eager materialises n x n
                call = functools.partial(create_block_mask, *torch_args)
                out.append((what, "eager create_block_mask", n, call, blocks))
    n = 1024 if quick else 8192
    for name, mask in builds(n).items():
        if name == "causal":
            continue
        bm = fm.block_mask(mask, n, device="cpu")
        dense = as_dense_mask(fm.to_dense(mask, n, device="cpu"))
        what, blocks = f"attention fwd+bwd {name}", visited_blocks(bm)
        sparse = functools.partial(fm.sparse_attention, mask=bm)
        out.append((what, "sparse", n, functools.partial(_train, n, sparse), blocks))
        sdpa = functools.partial(masked_sdpa, dense=dense)
        out.append((what, "sdpa dense", n, functools.partial(_train, n, sdpa), blocks))
    return out


def scale_cases(quick: bool) -> list[tuple[str, str, int, Callable[[], object], int]]:
    """Training under sliding_window(256) on the sparse path as the sequence grows: its peak
    should grow as S x window, not S²."""
    out = []
    for n in [2048, 4096] if quick else [8192, 16384, 32768]:
        bm = fm.block_mask(fm.sliding_window(256), n, device="cpu")
        sparse = functools.partial(fm.sparse_attention, mask=bm)
        out.append(("attention fwd+bwd sliding_window(256)", "sparse", n,
                    functools.partial(_train, n, sparse), visited_blocks(bm)))  # fmt: skip
    return out


def builds(n: int) -> dict[str, fm.MaskMod]:
    return {
        "causal": fm.causal(),
        "sliding_window(256)": fm.sliding_window(256),
        "8 documents & causal": fm.packed([n // 8] * 8) & fm.causal(),
    }


def visited_blocks(bm: BlockMask) -> int:
    return int((fm.evaluation.block_kinds(bm) > 0).sum())


def _train(n: int, attend: Callable) -> None:
    q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
    attend(q, k, v).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    parser.add_argument("--scale", action="store_true",
                        help="training under a window, 8k-32k tokens: memory_scale.*")  # fmt: skip
    args = parser.parse_args()
    honest_peaks("memory.py")
    torch._dynamo.config.recompile_limit = 64  # one compiled builder per mask here
    todo = scale_cases(args.quick) if args.scale else cases(args.quick)
    bar, rows = Progress(len(todo)), []
    for what, method, n, fn, blocks in todo:
        bar.step(f"{what} {method} {n}")
        mib = peak_rise_mib(fn)
        rows.append({"what": what, "method": method, "tokens": n, "visited_blocks": blocks,
                     "peak_rise_mib": mib, "kib_per_block": mib * 1024 / blocks})  # fmt: skip
    if args.scale:
        first = rows[0]
        for r in rows:  # growth against the shortest: S x window grows as S
            r["growth"] = r["peak_rise_mib"] / first["peak_rise_mib"]
            r["tokens_ratio"] = r["tokens"] / first["tokens"]
    name = "memory_scale" if args.scale else "memory"
    growth = ["peak growth (tokens growth)"] if args.scale else []
    save(
        name + ("_quick" if args.quick else ""), rows,
        ["what", "tokens", "visited blocks", "method", "peak rise MiB", "KiB per visited block",
         *growth],
        "lrrlrr" + "r" * len(growth),
        lambda r: [r["what"], str(r["tokens"]), str(r["visited_blocks"]), r["method"],
                   f"{r['peak_rise_mib']:.1f}", f"{r['kib_per_block']:.1f}",
                   *([f"{r['growth']:.2f}x ({r['tokens_ratio']:.0f}x)"] if args.scale else [])],
    )  # fmt: skip


if __name__ == "__main__":
    main()
