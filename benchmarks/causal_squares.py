"""What the sparse path's causal squares buy: packed causal documents computed as masked runs
of query blocks (the plan without squares) against one SDPA ``is_causal`` call per group of equal
documents (the plan as built), forward and forward + backward, float32 and bfloat16, in one
process with round-robin timing (``make bench``; ``--quick`` for CI). Writes
``benchmarks/results/causal_squares[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse

import torch
from _results import save
from harness import measure

import flexmask as fm
from flexmask import sparse, sparse_plan

HEADS, HEAD_DIM = 8, 64


def without_squares(bm: object) -> sparse_plan.Plan:
    """``bm``'s plan as it was before causal squares: every block in count runs."""
    real = sparse_plan._causal_squares
    sparse_plan._causal_squares = lambda *args: []
    try:
        return sparse_plan._make_plan(bm)
    finally:
        sparse_plan._causal_squares = real


def case(n: int, docs: int, dtype: torch.dtype, backward: bool, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen, dtype=dtype,
                           requires_grad=backward) for _ in range(3))  # fmt: skip
    grad = torch.randn_like(q)
    mask = fm.packed([n // docs] * docs) & fm.causal()
    with_sq = fm.block_mask(mask, n, cache=False, device="cpu")
    without = fm.block_mask(mask, n, cache=False, device="cpu")
    old_plan = without_squares(without)
    real_plan = sparse.plan  # the sparse path asks sparse.plan for a BlockMask's runs
    sparse.plan = lambda bm: old_plan if bm is without else real_plan(bm)  # type: ignore[assignment]

    def run(bm: object) -> None:
        out = fm.sparse_attention(q, k, v, bm)
        if backward:
            out.backward(grad)

    try:
        with torch.set_grad_enabled(backward):
            methods = {"masked runs": lambda: run(without), "causal squares": lambda: run(with_sq)}
            t = measure(methods, warmup=1, repeats=repeats, dev=torch.device("cpu"))
    finally:
        sparse.plan = real_plan
    return {"tokens": n, "documents": docs, "dtype": str(dtype).removeprefix("torch."),
            "pass": "forward+backward" if backward else "forward",
            "masked_ms": t["masked runs"].ms, "squares_ms": t["causal squares"].ms,
            "speedup": t["masked runs"].median_s / t["causal squares"].median_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    args = parser.parse_args()
    n, repeats = (1024, 1) if args.quick else (8192, 7)
    rows = [case(n, docs, dtype, backward, repeats)
            for dtype in (torch.float32, torch.bfloat16) for docs in (8, 32)
            for backward in (False, True)]  # fmt: skip
    save(
        "causal_squares" + ("_quick" if args.quick else ""), rows,
        ["tokens", "documents", "dtype", "pass", "masked runs ms", "causal squares ms",
         "speed-up"], "rrllrrr",
        lambda r: [str(r["tokens"]), str(r["documents"]), r["dtype"], r["pass"],
                   f"{r['masked_ms']:.1f}", f"{r['squares_ms']:.1f}", f"{r['speedup']:.2f}x"],
        heads=HEADS, head_dim=HEAD_DIM, repeats=repeats,
    )  # fmt: skip


if __name__ == "__main__":
    main()
