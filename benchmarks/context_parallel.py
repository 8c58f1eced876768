"""Context parallelism (``flexmask.distributed``): the load balance of each sharding and the
per-rank peak memory of one training step (``make bench-cp``; ``--quick`` for CI). Writes
``benchmarks/results/context_parallel[_quick].{json,md}``.

Load: the allowed ``(q, kv)`` pairs of each rank's queries (``Sharding.load``), max over mean.
Memory: ``world`` gloo processes on this machine each run forward and backward of
``distributed.attention`` on their shard (float32, 8 heads of 64, ``causal()``, the sparse path);
the table shows how far each rank's resident-memory peak rose above what it held before the
step (after a warm-up step), as ``memory.py`` measures it. World size 1 is the whole sequence in
one process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _results import save
from memory import honest_peaks, peak_rise_mib

import flexmask as fm
from flexmask.distributed import Contiguous, HeadTail, PerDocumentHeadTail, Sharding

HEADS, HEAD_DIM = 8, 64


def masks(n: int) -> dict[str, tuple[fm.MaskMod, list[int] | None]]:
    """Each mask with its document lengths (None: not packed)."""
    uneven = [n * 3 // 8, n * 5 // 16, n * 3 // 16, n // 8]  # 4 documents of unequal lengths
    return {
        "causal": (fm.causal(), None),
        "8 equal documents & causal": (fm.packed([n // 8] * 8) & fm.causal(), [n // 8] * 8),
        "4 unequal documents & causal": (fm.packed(uneven) & fm.causal(), uneven),
    }


def load_rows(n: int) -> list[dict]:
    rows = []
    for name, (mask, documents) in masks(n).items():
        for world in (2, 4, 8):
            shardings: list[Sharding] = [Contiguous(n, world), HeadTail(n, world)]
            if documents is not None:
                shardings.append(PerDocumentHeadTail(documents, world))
            for sharding in shardings:
                load = sharding.load(mask).double()
                rows.append({"what": f"load, {name}", "tokens": n, "world": world,
                             "sharding": type(sharding).__name__,
                             "max_over_mean": float(load.max() / load.mean())})  # fmt: skip
    return rows


def _rank(rank: int, world: int, n: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    sharding = HeadTail(n, world)
    q, k, v = (torch.randn(1, HEADS, sharding.local_len, HEAD_DIM, requires_grad=True)
               for _ in range(3))  # fmt: skip

    def step() -> None:
        out = fm.distributed.attention(q, k, v, fm.causal(), sharding=sharding, backend="sparse")
        torch.autograd.grad(out.sum(), (q, k, v))

    mib = peak_rise_mib(step)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(mib))
    dist.destroy_process_group()


def memory_rows(n: int, worlds: list[int]) -> list[dict]:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(world, n, tmp), nprocs=world)
            per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        rows.append({"what": "peak rise per rank, causal fwd+bwd", "tokens": n, "world": world,
                     "sharding": "HeadTail", "mib_per_rank": per_rank})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    args = parser.parse_args()
    honest_peaks("context_parallel.py")
    n = 2048 if args.quick else 16384
    rows = load_rows(n) + memory_rows(n, [1, 2] if args.quick else [1, 2, 4])
    save(
        "context_parallel" + ("_quick" if args.quick else ""), rows,
        ["what", "tokens", "ranks", "sharding", "max / mean load", "peak rise MiB per rank"],
        "lrrlrr",
        lambda r: [r["what"], str(r["tokens"]), str(r["world"]), r["sharding"],
                   f"{r['max_over_mean']:.3f}" if "max_over_mean" in r else "",
                   ", ".join(f"{m:.0f}" for m in r.get("mib_per_rank", []))],
        heads=HEADS, head_dim=HEAD_DIM, dtype="float32",
    )  # fmt: skip


if __name__ == "__main__":
    main()
