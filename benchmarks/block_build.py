"""BlockMask building: flexmask's tile builder vs torch's create_block_mask (compiled, steady
state; and eager): ``make bench-blocks``. Writes ``benchmarks/results/block_build.{json,md}``.

The tile builder classifies blocks from each mask's structure (``MaskMod.tile_bounds``) and
evaluates the mask only on blocks that stay undecided, so it neither compiles nor materialises
``q_len x kv_len``. Methods run round-robin; medians of ``REPEATS`` after warm-up.
"""

from __future__ import annotations

import argparse
import functools

from _results import save
from harness import Progress, device, measure

import flexmask as fm


def masks(n: int) -> dict[str, fm.MaskMod]:
    return {
        "causal": fm.causal(),
        "sliding_window(256)": fm.sliding_window(256),
        "causal & padding": fm.causal() & fm.padding([n, n // 3]),
        "8 documents & causal": fm.packed([n // 8] * 8) & fm.causal(),
        "(window | prefix) & padding": (fm.sliding_window(512) | fm.prefix_lm(256))
        & fm.padding([n, n // 2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    args = parser.parse_args()
    sizes, warmup, repeats = ([1024], 1, 1) if args.quick else ([4096, 16384], 2, 5)
    dev = device()
    todo = [(n, name, mask) for n in sizes for name, mask in masks(n).items()]
    bar, rows = Progress(len(todo)), []
    for n, name, mask in todo:
        bar.step(f"{n} {name}")
        build = functools.partial(fm.block_mask, mask, n, device=dev, cache=False)
        methods = {
            "tiles": functools.partial(build, method="tiles"),
            "compiled": functools.partial(build, method="create_block_mask", compile=True),
        }
        if n <= 4096:  # eager materialises n x n per batch row (2.6 GiB at 16384)
            methods["eager"] = functools.partial(build, method="create_block_mask", compile=False)
        med = {k: t.ms for k, t in measure(methods, warmup=warmup, repeats=repeats,
                                                dev=dev).items()}  # fmt: skip
        row = {
            "tokens": n,
            "mask": name,
            **{f"{k}_ms": v for k, v in med.items()},
            "compiled_over_tiles": med["compiled"] / med["tiles"],
        }
        rows.append(row)
    save(
        "block_build" + ("_quick" if args.quick else ""), rows,
        ["tokens", "mask", "tiles ms", "compiled create_block_mask ms", "eager ms",
         "compiled / tiles"], "rlrrrr",
        lambda r: [str(r["tokens"]), r["mask"], f"{r['tiles_ms']:.1f}", f"{r['compiled_ms']:.1f}",
                   f"{r['eager_ms']:.1f}" if "eager_ms" in r else "—",
                   f"{r['compiled_over_tiles']:.1f}x"],
        repeats=repeats, device=str(dev),
    )  # fmt: skip


if __name__ == "__main__":
    main()
