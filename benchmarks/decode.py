"""Decode-step latency with a KVCache: compiled flex on the step's BlockMask vs SDPA with the dense
step mask, on the same module and cache: ``make bench-decode``.

One step = one new token per row attending to ``cached`` keys (fp32, 8 heads of 64, GQA off),
for causal and sliding_window(256), batch 1 and 8. Methods run round-robin so drift hits both;
medians over ``REPEATS`` steps after warm-up. Writes ``benchmarks/results/decode.{json,md}``.
"""

from __future__ import annotations

import statistics
import time

import torch
from _results import save

import flexmask as fm

CACHED = [1024, 4096, 16384]
BATCHES = [1, 8]
MASKS = {"causal": fm.causal(), "sliding_window(256)": fm.sliding_window(256)}
EMBED, HEADS, REPEATS, WARMUP = 512, 8, 15, 3


def step_time(
    attn: fm.MultiheadFlexAttention, cache: fm.KVCache, mask: fm.MaskMod, n: int
) -> float:
    x = torch.randn(cache.batch, 1, EMBED)
    cache.lengths.fill_(n)  # the cache holds n tokens; the step writes position n
    start = time.perf_counter()
    attn(x, mask=mask, cache=cache)
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for batch in BATCHES:
        for n in CACHED:
            cache = fm.KVCache(batch, n + 128, HEADS, EMBED // HEADS)
            cache.k.normal_()
            cache.v.normal_()
            for name, mask in MASKS.items():
                modules = {
                    b: fm.MultiheadFlexAttention(EMBED, HEADS, backend=b).eval()
                    for b in ("flex", "sdpa")
                }
                times: dict[str, list[float]] = {b: [] for b in modules}
                with torch.no_grad():
                    for _ in range(WARMUP):  # compiles flex for this shape
                        for m in modules.values():
                            step_time(m, cache, mask, n)
                    for _ in range(REPEATS):  # round-robin
                        for b, m in modules.items():
                            times[b].append(step_time(m, cache, mask, n))
                med = {b: statistics.median(t) * 1e3 for b, t in times.items()}
                row = {
                    "batch": batch,
                    "cached": n,
                    "mask": name,
                    "flex_ms": med["flex"],
                    "sdpa_ms": med["sdpa"],
                    "sdpa_over_flex": med["sdpa"] / med["flex"],
                    "spread_ms": {b: [min(t) * 1e3, max(t) * 1e3] for b, t in times.items()},
                }
                rows.append(row)
                print(
                    f"B={batch} cached={n:>5} {name:<20} flex {med['flex']:7.2f} ms  "
                    f"sdpa {med['sdpa']:7.2f} ms  sdpa/flex {row['sdpa_over_flex']:.2f}"
                )
    save(
        "decode", rows,
        ["batch", "cached tokens", "mask", "flex ms", "SDPA (dense mask) ms", "SDPA / flex"],
        "rrlrrr",
        lambda r: [str(r["batch"]), str(r["cached"]), r["mask"], f"{r['flex_ms']:.2f}",
                   f"{r['sdpa_ms']:.2f}", f"{r['sdpa_over_flex']:.2f}"],
        repeats=REPEATS, embed=EMBED, heads=HEADS,
    )  # fmt: skip


if __name__ == "__main__":
    main()
