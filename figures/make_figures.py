"""Write every figure the README shows (``make figures``), or check the committed ones are current.

    python figures/make_figures.py            # (re)write figures/*.png
    python figures/make_figures.py --check    # regenerate elsewhere; fail if figures/ is stale

The PNGs are deterministic (no time or version stamps, seeded tensors), so a figure that differs
from a fresh one is stale.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import flexmask as fm

HERE = Path(__file__).resolve().parent
N = 32  # tokens in the small pictures: every token labelled, 2 x 2 blocks of 16
BLOCK = 16
PARENTS = [-1, 0, 1, -1, 3, 3, 0, 6, 2, 4, 5, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
CONTEXT = N - len(PARENTS)  # a tree of 24 candidate tokens after an 8-token context

FACTORIES = {
    "full": fm.full(),
    "causal": fm.causal(),
    "sliding_window": fm.sliding_window(6),
    "local_window": fm.local_window(3, 5),
    "dilated_window": fm.dilated_window(6, 2),
    "sink_tokens": fm.sink_tokens(4),
    "global_tokens": fm.global_tokens([0, 17]),
    "prefix_lm": fm.prefix_lm(10),
    "padding": fm.padding([24]),
    "key_padding": fm.key_padding([24]),
    "document": fm.document([0] * 10 + [1] * 14 + [2] * 8),
    "packed": fm.packed([10, 14, 8]),
    "from_position_ids": fm.from_position_ids([*range(10), *range(14), *range(8)]),
    "from_cu_seqlens": fm.from_cu_seqlens([0, 10, 24, 32], causal=True),
    "chunked": fm.chunked(8),
    "neighborhood_2d": fm.neighborhood_2d(4, 8, 3),  # a 4 x 8 image, 3 x 3 windows
    "tree": fm.tree([-1] + [(i - 1) // 2 for i in range(1, N)]),  # a binary tree, no context
}

COMPOSITIONS = {
    "causal_padding_right": fm.causal() & fm.padding([N, 20]),
    "causal_padding_left": fm.causal() & fm.padding([N, 20], side="left"),
    "window_or_prefix": fm.sliding_window(6) | fm.prefix_lm(8),
    "documents_causal": fm.packed([10, 14, 8]) & fm.causal(),
    "tree_after_context": fm.tree(PARENTS, context_len=CONTEXT),
}


def write_all(out: Path) -> list[Path]:
    written = []
    for name, mask in FACTORIES.items():
        written.append(fm.save_mask_png(mask, out / f"factory_{name}.png", N, block_size=BLOCK))
    for name, mask in COMPOSITIONS.items():
        if mask.batch_size:  # one panel per batch row
            path = fm.save_grid_png(
                mask, out / f"{name}.png", N, block_size=BLOCK, title=repr(mask)
            )
        else:
            path = fm.save_mask_png(mask, out / f"{name}.png", N, block_size=BLOCK)
        written.append(path)
    written.append(
        fm.save_grid_png(
            list(COMPOSITIONS.values())[1:],
            out / "readme_compositions.png",
            N,
            block_size=BLOCK,
            batch=1,
            ncols=4,
        )
    )

    # Long masks: drawn from per-tile counts, never a 131072 x 131072 tensor.
    n = 131072
    docs = fm.packed([n // 4, n // 8, n // 8, n // 2]) & fm.causal()
    written.append(
        fm.save_mask_png(
            docs | (fm.sliding_window(8192) & fm.causal()),
            out / "large_documents_window_131072.png",
            n,
        )
    )
    bm = fm.block_mask(
        fm.sliding_window(512) | fm.prefix_lm(256), 4096, device="cpu", compile=False
    )
    written.append(fm.save_block_mask_png(bm, out / "large_block_mask_4096.png"))

    # The seed picture: attention weights of a MultiheadFlexAttention on a padded causal batch.
    torch.manual_seed(0)
    attn = fm.MultiheadFlexAttention(64, 4, num_kv_heads=2)
    x = torch.randn(2, 24, 64)
    mask = fm.causal() & fm.padding([24, 15])
    q, k, _ = attn.project(x)
    for b in (0, 1):
        path = out / f"scores_causal_padding_b{b}.png"
        written.append(fm.save_scores_png(q, k, path, mask=mask, batch=b, head=0))
    return written


def check(out: Path) -> int:
    """0 when every committed figure equals a fresh one (and none is missing or left over)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in write_all(Path(tmp))}
    committed = {p.name: p.read_bytes() for p in out.glob("*.png")}
    stale = sorted(n for n in fresh if committed.get(n) != fresh[n])
    extra = sorted(set(committed) - set(fresh))
    for name in stale:
        print(f"stale or missing: figures/{name}", file=sys.stderr)
    for name in extra:
        print(f"not written by make figures: figures/{name}", file=sys.stderr)
    if stale or extra:
        print("run `make figures` and commit the result", file=sys.stderr)
        return 1
    print(f"{len(fresh)} figures are current")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if figures/ is stale")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (figures/)")
    args = parser.parse_args()
    if args.check:
        return check(args.out)
    for path in write_all(args.out):
        print(
            path.relative_to(args.out.resolve())
            if path.is_relative_to(args.out.resolve())
            else path
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
