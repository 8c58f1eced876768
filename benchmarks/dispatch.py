"""Where the sparse path stops paying on CPU: ``sparse_attention`` against SDPA with the dense
mask over masks from sparse to nearly full, forward and forward + backward, in the same run
(``make bench``; ``--quick`` for CI). Writes ``benchmarks/results/dispatch[_quick].{json,md}``.

``MultiheadFlexAttention(backend="auto")`` picks the sparse path when the plan's cost (block
density, gathered blocks counted twice) is at most ``SPARSE_MAX_DENSITY``; the last column shows
what it picks, next to the measured ratio that should justify it.
"""

from __future__ import annotations

import argparse

import torch
from _results import save
from harness import Progress, device, measure

import flexmask as fm
from flexmask.coverage import as_dense_mask
from flexmask.dispatch import SPARSE_MAX_DENSITY
from flexmask.runners import masked_sdpa
from flexmask.sparse_plan import plan


def masks(n: int) -> dict[str, fm.MaskMod]:
    return {
        "chunked(S/4) | sliding_window(S/8)": fm.chunked(n // 4) | fm.sliding_window(n // 8),
        "sliding_window(S/2)": fm.sliding_window(n // 2),
        "chunked(S/2)": fm.chunked(n // 2),
        "causal & padding": fm.causal() & fm.padding([n]),
        "prefix_lm(S/2)": fm.prefix_lm(n // 2),
        "prefix_lm(3S/4)": fm.prefix_lm(3 * n // 4),
        "~sliding_window(S/4)": ~fm.sliding_window(n // 4),
        "~chunked(S/16)": ~fm.chunked(n // 16),
        "~sliding_window(S/16)": ~fm.sliding_window(n // 16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    args = parser.parse_args()
    n, warmup, repeats = (512, 1, 1) if args.quick else (4096, 1, 3)
    dev = device()
    todo = [(name, mask, grad) for grad in (False, True) for name, mask in masks(n).items()]
    bar, rows = Progress(len(todo)), []
    for name, mask, grad in todo:
        bar.step(f"{name} {'fwd+bwd' if grad else 'fwd'}")
        q, k, v = (torch.randn(1, 8, n, 64, device=dev, requires_grad=grad) for _ in range(3))
        bm = fm.block_mask(mask, n, device=dev)
        dense = as_dense_mask(fm.to_dense(mask, n, device=dev))  # found once, as the module
        grad_out = torch.randn_like(q)

        def run(attend, grad=grad, grad_out=grad_out):
            return (lambda: attend().backward(grad_out)) if grad else attend

        methods = {
            "sparse": run(lambda q=q, k=k, v=v, bm=bm: fm.sparse_attention(q, k, v, bm)),
            "dense": run(lambda q=q, k=k, v=v, dense=dense: masked_sdpa(q, k, v, dense)),
        }
        with torch.set_grad_enabled(grad):
            t = measure(methods, warmup=warmup, repeats=repeats, dev=dev)
        runs = plan(bm)
        rows.append({
            "mask": name, "pass": "fwd+bwd" if grad else "fwd", "density": runs.density,
            "gathered": runs.gathered, "cost": runs.cost, "sparse_ms": t["sparse"].ms,
            "dense_ms": t["dense"].ms, "dense_over_sparse": t["dense"].ms / t["sparse"].ms,
            "auto": "sparse" if runs.cost <= SPARSE_MAX_DENSITY else "sdpa dense",
        })  # fmt: skip
    save(
        "dispatch" + ("_quick" if args.quick else ""), rows,
        ["mask", "pass", "block density", "gathered", "cost", "sparse ms", "SDPA dense ms",
         "dense / sparse", "auto picks"], "llrrrrrrl",
        lambda r: [r["mask"], r["pass"], f"{r['density']:.3f}", f"{r['gathered']:.2f}",
                   f"{r['cost']:.2f}", f"{r['sparse_ms']:.0f}", f"{r['dense_ms']:.0f}",
                   f"{r['dense_over_sparse']:.2f}", r["auto"]],
        tokens=n, threshold=SPARSE_MAX_DENSITY, device=str(dev),
    )  # fmt: skip


if __name__ == "__main__":
    main()
