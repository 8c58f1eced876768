"""What flexmask's guarantees cost, measured in one run: attention with and without zeroing the
queries and keys the mask hides from everyone (what keeps NaN in padding out of real rows and
gradients), on the sparse path and on SDPA with the dense mask, forward and forward + backward;
and the one-time cost of finding those queries and keys (``coverage``) next to the sparse
path's plan, per BlockMask. Writes ``benchmarks/results/guarantees[_quick].{json,md}``.

``python benchmarks/guarantees.py [--quick]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from _results import save
from harness import device, measure

import flexmask as fm
from flexmask.coverage import Coverage, DenseMask, coverage
from flexmask.runners import masked_sdpa
from flexmask.sparse_plan import plan

HEADS, HEAD_DIM, BATCH = 8, 64, 2


def cases(n: int) -> dict[str, fm.MaskMod]:
    real = n // 2 + 37  # off the block grid: blocks the kernels compute hold pads too
    return {
        "causal & padding": fm.causal() & fm.padding([n, real]),
        "sliding_window(256) & padding": fm.sliding_window(256) & fm.padding([n, real]),
    }


def run(sizes: list[int], repeats: int, quick: bool, nan: bool) -> None:
    dev = device()
    rows = []
    for n in sizes:
        for name, mask in cases(n).items():
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen).to(dev)
                       for _ in range(3))  # fmt: skip
            if nan:  # what the guarantee is for: NaN in the padding
                for t in (q, k, v):
                    t[1, :, n // 2 + 37 :] = float("nan")
            bm = fm.block_mask(mask, n, device=dev)
            allowed = fm.to_dense(mask, n, device=dev)
            dense = DenseMask.of(allowed)

            for backward in (False, True):
                times = measure(_methods(q, k, v, bm, dense, backward), warmup=1,
                                repeats=repeats, dev=dev)  # fmt: skip
                rows.append({
                    "mask": name, "tokens": n, "pass": "fwd+bwd" if backward else "fwd",
                    **{f"{m} ms": t.ms for m, t in times.items()},
                    "sparse ratio": times["sparse"].ms / times["sparse, nothing zeroed"].ms,
                    "sdpa ratio": times["sdpa"].ms / times["sdpa, nothing zeroed"].ms,
                })  # fmt: skip
            rows[-1]["coverage ms"], rows[-1]["plan ms"] = _once(bm)
    header = ["mask", "tokens", "pass", "sparse ms", "unguarded", "ratio", "sdpa ms",
              "unguarded", "ratio", "coverage ms (once)", "plan ms (once)"]  # fmt: skip
    save(
        "guarantees" + ("_nan" if nan else "") + ("_quick" if quick else ""),
        rows,
        header,
        "lrlrrrrrrrr",
        _cells,
        batch=BATCH,
        heads=HEADS,
        head_dim=HEAD_DIM,
        nan_in_padding=nan,
    )


def _methods(q, k, v, bm, dense, backward: bool) -> dict[str, Callable[[], None]]:
    """Sparse and dense attention, each with and without zeroing what the mask hides."""
    hide = Coverage.hide

    def timed(attend: Callable[..., torch.Tensor], guarded: bool) -> Callable[[], None]:
        def call() -> None:
            Coverage.hide = hide if guarded else lambda self, *qkv: qkv  # type: ignore[method-assign]
            try:
                _attend(attend, q, k, v, backward)
            finally:
                Coverage.hide = hide  # type: ignore[method-assign]

        return call

    def sparse_call(*t: torch.Tensor) -> torch.Tensor:
        return fm.sparse_attention(*t, bm)

    def sdpa_call(*t: torch.Tensor) -> torch.Tensor:
        return masked_sdpa(*t, dense)

    return {
        "sparse": timed(sparse_call, True),
        "sparse, nothing zeroed": timed(sparse_call, False),
        "sdpa": timed(sdpa_call, True),
        "sdpa, nothing zeroed": timed(sdpa_call, False),
    }


def _attend(fn, q, k, v, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            fn(q, k, v)
        return
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    fn(*leaves).sum().backward()


def _once(bm) -> tuple[float, float]:
    """Milliseconds of ``coverage`` and of the sparse plan for a BlockMask seen for the first
    time (both are cached per BlockMask afterwards)."""
    fm.clear_cache()
    start = time.perf_counter()
    coverage(bm)
    mid = time.perf_counter()
    plan(bm)
    end = time.perf_counter()
    return (mid - start) * 1e3, (end - mid) * 1e3


def _cells(r: dict) -> list[str]:
    ms = [r[key] for key in ("sparse ms", "sparse, nothing zeroed ms")]
    dense = [r[key] for key in ("sdpa ms", "sdpa, nothing zeroed ms")]
    return [r["mask"], str(r["tokens"]), r["pass"], *(f"{x:.1f}" for x in ms),
            f"{r['sparse ratio']:.2f}", *(f"{x:.1f}" for x in dense), f"{r['sdpa ratio']:.2f}",
            _opt(r.get("coverage ms")), _opt(r.get("plan ms"))]  # fmt: skip


def _opt(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--nan", action="store_true", help="NaN in the padding of q, k and v")
    args = parser.parse_args()
    run([512] if args.quick else [2048, 8192], 2 if args.quick else 7, args.quick, args.nan)
