"""How long drawing a long mask takes, and how much memory: ``make bench-viz``.

Each (mask, tokens) runs in a fresh process, so its memory is its own: ``extra`` is the peak RSS
during the draws minus the footprint after importing torch, matplotlib and flexmask (``base``).
``cold`` is the first draw in the process (what one ``flexmask render`` pays), then ``REPEATS``
warm draws. Writes ``benchmarks/results/viz_large.json`` and ``.md``.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import save

SIZES = [16384, 65536, 131072]
MASKS = {
    "causal & padding": "causal() & padding([{n}, {h}])",
    "sliding_window(256)": "sliding_window(256)",
    "8 documents & causal": "packed([{d}] * 8) & causal()",
    "(window | prefix) & padding": "(sliding_window(1024) | prefix_lm(512)) & padding([{n}, {h}])",
}
REPEATS = 3


def one(expr: str, n: int) -> dict[str, float]:
    """Run in a child process: the first (cold) draw, then warm ones; peak RSS over imports."""
    import matplotlib.figure  # noqa: F401  (imported by the first draw anyway: count it in the base)

    import flexmask as fm
    from flexmask.expr import parse_mask

    mask = parse_mask(expr)
    out = Path(tempfile.mkdtemp())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    fm.save_mask_png(mask, out / "cold.png", n)  # first draw: fonts, kernels, allocations
    cold = time.perf_counter() - start
    times = []
    for i in range(REPEATS):
        start = time.perf_counter()
        fm.save_mask_png(mask, out / f"m{i}.png", n)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "cold_s": cold,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "base_mib": base,
        "peak_mib": peak,
        "extra_mib": peak - base,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]))))
        return
    rows = []
    total = len(SIZES) * len(MASKS)
    for i, (n, (name, template)) in enumerate((n, item) for n in SIZES for item in MASKS.items()):
        expr = template.replace("[{d}] * 8", str([n // 8] * 8)).format(n=n, h=n // 3, d=n // 8)
        print(f"[{i + 1}/{total}] {name} at {n} tokens ...", end=" ", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", expr, str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"cold {result['cold_s']:.2f} s, warm {result['median_s']:.2f} s, "
            f"+{result['extra_mib']:.0f} MiB"
        )
        rows.append(
            {"mask": name, "expr": expr if len(expr) < 120 else name, "tokens": n, **result}
        )
    save(
        "viz_large", rows,
        ["mask", "tokens", "cold s", "warm s, median (min–max)", "base MiB", "peak MiB",
         "extra MiB"], "lrrrrrr",
        lambda r: [r["mask"], str(r["tokens"]), f"{r['cold_s']:.2f}",
                   f"{r['median_s']:.2f} ({r['min_s']:.2f}–{r['max_s']:.2f})",
                   f"{r['base_mib']:.0f}", f"{r['peak_mib']:.0f}", f"{r['extra_mib']:.0f}"],
        repeats=REPEATS,
    )  # fmt: skip


if __name__ == "__main__":
    main()
