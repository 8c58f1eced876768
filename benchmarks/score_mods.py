"""CPU training (forward + backward) with an additive score_mod under a sliding window: the
sparse path, which adds the mod as a bias on its runs of visited blocks, against the explicit
softmax over every score (``make bench``; ``--quick`` for CI). Writes
``benchmarks/results/score_mods[_quick].{json,md}``: time, GFLOP/s on visited blocks, the
fraction of this machine's fp32 matmul rate, and the peak memory rise of one step.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from _results import save
from harness import Progress, attention_flops, matmul_peak, measure
from memory import honest_peaks, peak_rise_mib

import flexmask as fm
from flexmask.evaluation import block_kinds
from flexmask.runners import softmax_attention

HEADS, HEAD_DIM = 4, 64


def mods() -> dict[str, Callable[[], fm.ScoreMod]]:
    """The mods, made per case (the relative bias's table is a leaf the step differentiates)."""
    return {
        "alibi": lambda: fm.alibi(HEADS),
        "relative_bias (R=128)": lambda: fm.relative_bias(
            torch.zeros(HEADS, 257, requires_grad=True)
        ),
    }


def step(method: str, inputs: list[torch.Tensor], mask: fm.MaskMod, mod: fm.ScoreMod) -> None:
    """One training step of attention alone: forward, then the gradients of q, k, v and of
    what the mod reads (the relative bias's table)."""
    q, k, v = inputs
    n = q.shape[2]
    if method == "sparse":
        out = fm.sparse_attention(q, k, v, fm.block_mask(mask, n, device="cpu"), score_mod=mod)
    else:
        out = softmax_attention(q, k, v, fm.to_dense(mask, n, device="cpu"), score_mod=mod)
    torch.autograd.grad(out.sum(), [*inputs, *mod.tensors()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    args = parser.parse_args()
    honest_peaks("score_mods.py")
    n, window = (1024, 64) if args.quick else (8192, 256)
    mask = fm.sliding_window(window)
    kinds = block_kinds(fm.block_mask(mask, n, device="cpu"))
    visited = int((kinds > 0).sum()) * 128 * 128
    flops = attention_flops(visited, HEAD_DIM, HEADS, backward=True)
    peak = matmul_peak(torch.float32, torch.device("cpu"))
    todo = [(name, method) for name in mods() for method in ("sparse", "explicit softmax")]
    bar, rows = Progress(len(todo)), []
    for name, make_mod in mods().items():
        inputs = [torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3)]
        calls = {m: functools.partial(step, m, inputs, mask, make_mod())
                 for m in ("sparse", "explicit softmax")}  # fmt: skip
        # Apart, not round-robin: the explicit softmax's gigabytes of scores, freed just before,
        # made the sparse step's times spread by half.
        times = {m: measure({m: fn}, warmup=1, repeats=7 if m == "sparse" else 3,
                            dev=torch.device("cpu"))[m] for m, fn in calls.items()}  # fmt: skip
        for method, fn in calls.items():
            bar.step(f"{name} {method}")
            t = times[method]
            rows.append({
                "mod": name, "mask": repr(mask), "tokens": n, "method": method, "ms": t.ms,
                "spread": t.spread, "gflops_visited": flops / t.median_s / 1e9,
                "peak_fraction": flops / t.median_s / 1e9 / peak,
                "peak_rise_mib": peak_rise_mib(fn),
            })  # fmt: skip
        sparse, explicit = rows[-2], rows[-1]
        sparse["explicit_over_sparse"] = explicit["ms"] / sparse["ms"]
        sparse["memory_ratio"] = explicit["peak_rise_mib"] / sparse["peak_rise_mib"]
    save(
        "score_mods" + ("_quick" if args.quick else ""), rows,
        ["score_mod", "mask", "tokens", "method", "ms (fwd+bwd)", "spread", "GFLOP/s visited",
         "of fp32 matmul peak", "peak rise MiB", "explicit / sparse (time, memory)"],
        "llrlrrrrrr",
        lambda r: [r["mod"], r["mask"], str(r["tokens"]), r["method"], f"{r['ms']:.0f}",
                   f"{r['spread']:.0%}", f"{r['gflops_visited']:.0f}", f"{r['peak_fraction']:.0%}",
                   f"{r['peak_rise_mib']:.0f}",
                   f"{r['explicit_over_sparse']:.1f}x, {r['memory_ratio']:.1f}x"
                   if "explicit_over_sparse" in r else ""],
        heads=HEADS, head_dim=HEAD_DIM, batch=1, dtype="float32", window=window,
        matmul_peak_gflops=peak,
    )  # fmt: skip


if __name__ == "__main__":
    main()
