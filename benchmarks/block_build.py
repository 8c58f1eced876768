"""BlockMask building: flexmask's tile builder vs torch's create_block_mask (compiled, steady
state; and eager): ``make bench-blocks``. Writes ``benchmarks/results/block_build.{json,md}``.

The tile builder classifies blocks from each mask's structure (``MaskMod.tile_bounds``) and
evaluates the mask only on blocks that stay undecided, so it neither compiles nor materialises
``q_len x kv_len``. Methods run round-robin; medians of ``REPEATS`` after warm-up.
"""

from __future__ import annotations

import argparse
import functools

import torch
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
        # the peers' masks (issue 14)
        "local_window(256, 256)": fm.local_window(256, 256),
        "dilated_window(512, 4)": fm.dilated_window(512, 4),
        "(window | 4 sinks) & causal": (fm.sliding_window(256) | fm.sink_tokens(4)) & fm.causal(),
        "local_window | 3 global tokens": fm.local_window(256, 256)
        | fm.global_tokens([0, n // 2, n - 1]),
        "key_padding": fm.key_padding([n, n // 3]),
        "from_position_ids (8 docs) & causal": fm.from_position_ids(torch.arange(n) % (n // 8))
        & fm.causal(),
        "from_cu_seqlens(3 seqs, causal)": fm.from_cu_seqlens([0, n // 4, n // 2, n], causal=True),
        "packed [B, N] & causal": fm.packed([[n // 2, n // 2], [n // 4, n - n // 4]]) & fm.causal(),
        "chunked(1024, start=[B]) & causal": fm.chunked(1024, start=[0, 100]) & fm.causal(),
    }


def images(largest: int) -> list[tuple[int, str, fm.MaskMod]]:
    """neighborhood_2d on square images: 256 x 256 (65,536 tokens) in the full run."""
    side = 256 if largest >= 16384 else 32
    return [(side * side, f"neighborhood_2d({side}, {side}, 7)", fm.neighborhood_2d(side, side, 7))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    args = parser.parse_args()
    sizes, warmup, repeats = ([1024], 1, 1) if args.quick else ([4096, 16384], 2, 5)
    dev = device()
    todo = [(n, name, mask) for n in sizes for name, mask in masks(n).items()] + images(sizes[-1])
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
        rounds = (1, 1) if n > 16384 else (warmup, repeats)  # compiled: seconds per build there
        med = {k: t.ms for k, t in measure(methods, warmup=rounds[0], repeats=rounds[1],
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
