"""`make demo`: every factory's BlockMask at a realistic size, described; then the module at work.

Builds each mask at 4096 tokens with the compiled builder (a few seconds each on first use),
prints ``describe`` for it, then runs ``MultiheadFlexAttention`` on a right-padded causal batch and
checks padded rows are zeros. Run: ``make demo`` (or ``python benchmarks/demo.py --tokens 1024``).
"""

from __future__ import annotations

import argparse
import time

import torch

import flexmask as fm


def factories(n: int) -> list[fm.MaskMod]:
    docs = [n // 8] * 7 + [n - 7 * (n // 8)]
    tree_nodes = 64
    parents = [-1] + [(i - 1) // 4 for i in range(1, tree_nodes)]  # a 4-ary candidate tree
    return [
        fm.full(),
        fm.causal(),
        fm.sliding_window(256),
        fm.prefix_lm(n // 4),
        fm.causal() & fm.padding([n, n // 2 + 3]),
        fm.causal() & fm.padding([n, n // 2 + 3], side="left"),
        fm.document(torch.repeat_interleave(torch.arange(8), torch.tensor(docs))) & fm.causal(),
        fm.packed(docs),
        fm.chunked(1024) & fm.causal(),
        fm.tree(parents, context_len=n - tree_nodes),
        (fm.sliding_window(256) | fm.chunked(512)) & fm.padding([n, n - 100]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    n = args.tokens

    for mask in factories(n):
        start = time.perf_counter()
        stats = fm.describe(mask, n, device="cpu")
        print(f"{stats}\n  built and described in {time.perf_counter() - start:.2f} s\n")

    torch.manual_seed(0)
    batch, embed, heads = 2, 256, 8
    lengths = [n, n // 3]
    attn = fm.MultiheadFlexAttention(embed, heads, num_kv_heads=2, bias=False).eval()
    x = torch.randn(batch, n, embed)
    mask = fm.causal() & fm.padding(lengths)
    with torch.no_grad():
        start = time.perf_counter()
        y = attn(x, mask=mask)  # CPU inference: compiled flex on the cached BlockMask
        first = time.perf_counter() - start
        start = time.perf_counter()
        y = attn(x, mask=mask)
        again = time.perf_counter() - start
    pad_rows = y[1, lengths[1] :]
    print(f"MultiheadFlexAttention({embed}, {heads}, num_kv_heads=2) on {tuple(x.shape)} "
          f"under {mask!r}")  # fmt: skip
    print(f"  first call {first:.2f} s (compiles flex), second call {again:.3f} s")
    print(f"  NaN anywhere: {bool(y.isnan().any())}; padded rows all zero: "
          f"{bool((pad_rows == 0).all())} ({pad_rows.shape[0]} rows)")  # fmt: skip


if __name__ == "__main__":
    main()
