"""BlockMask building: flexmask's tile builder vs torch's create_block_mask (compiled, steady
state; and eager): ``make bench-blocks``. Writes ``benchmarks/results/block_build.{json,md}``.

The tile builder classifies blocks from each mask's structure (``MaskMod.tile_bounds``) and
evaluates the mask only on blocks that stay undecided, so it neither compiles nor materialises
``q_len x kv_len``. Methods run round-robin; medians of ``REPEATS`` after warm-up.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

from _results import save

import flexmask as fm

SIZES = [4096, 16384]
REPEATS, WARMUP = 5, 2


def masks(n: int) -> dict[str, fm.MaskMod]:
    return {
        "causal": fm.causal(),
        "sliding_window(256)": fm.sliding_window(256),
        "causal & padding": fm.causal() & fm.padding([n, n // 3]),
        "8 documents & causal": fm.packed([n // 8] * 8) & fm.causal(),
        "(window | prefix) & padding": (fm.sliding_window(512) | fm.prefix_lm(256))
        & fm.padding([n, n // 2]),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    rows = []
    for n in SIZES:
        for name, mask in masks(n).items():
            build = functools.partial(fm.block_mask, mask, n, device="cpu", cache=False)
            methods = {
                "tiles": functools.partial(build, method="tiles"),
                "compiled": functools.partial(build, method="create_block_mask", compile=True),
            }
            if n <= 4096:  # eager materialises n x n per batch row (2.6 GiB at 16384)
                methods["eager"] = functools.partial(
                    build, method="create_block_mask", compile=False
                )
            times: dict[str, list[float]] = {k: [] for k in methods}
            for _ in range(WARMUP):  # compiles the builder for this mask structure
                for fn in methods.values():
                    fn()
            for _ in range(REPEATS):
                for k, fn in methods.items():
                    times[k].append(timed(fn))
            med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
            row = {
                "tokens": n,
                "mask": name,
                **{f"{k}_ms": v for k, v in med.items()},
                "compiled_over_tiles": med["compiled"] / med["tiles"],
            }
            rows.append(row)
            print(
                f"{n:>6} {name:<28} tiles {med['tiles']:8.1f} ms  "
                f"compiled {med['compiled']:8.1f} ms  "
                f"eager {med.get('eager', float('nan')):8.1f} ms  "
                f"compiled/tiles {row['compiled_over_tiles']:.1f}x"
            )
    save(
        "block_build", rows,
        ["tokens", "mask", "tiles ms", "compiled create_block_mask ms", "eager ms",
         "compiled / tiles"], "rlrrrr",
        lambda r: [str(r["tokens"]), r["mask"], f"{r['tiles_ms']:.1f}", f"{r['compiled_ms']:.1f}",
                   f"{r['eager_ms']:.1f}" if "eager_ms" in r else "—",
                   f"{r['compiled_over_tiles']:.1f}x"],
        repeats=REPEATS,
    )  # fmt: skip


if __name__ == "__main__":
    main()
