"""How long drawing a long mask takes, and how much memory: ``make bench-viz``.

Each (mask, tokens) runs in a fresh process so its peak RSS is its own: the figure below is the
peak during the draw minus the process's footprint after imports and a small warm-up draw. Writes
``benchmarks/results/viz_large.json`` and ``.md``.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [16384, 65536, 131072]
MASKS = {
    "causal & padding": "causal() & padding([{n}, {h}])",
    "sliding_window(256)": "sliding_window(256)",
    "8 documents & causal": "packed([{d}] * 8) & causal()",
    "(window | prefix) & padding": "(sliding_window(1024) | prefix_lm(512)) & padding([{n}, {h}])",
}
REPEATS = 3


def one(expr: str, n: int) -> dict[str, float]:
    """Run in a child process: time the draws, report peak RSS over the post-import baseline."""
    import flexmask as fm
    from flexmask.expr import parse_mask

    mask = parse_mask(expr)
    out = Path(tempfile.mkdtemp())
    # Warm up: import matplotlib and fonts, touch the kernels a long draw uses.
    fm.save_mask_png(fm.causal() & fm.padding([8192]), out / "warm.png", 8192)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for i in range(REPEATS):
        start = time.perf_counter()
        fm.save_mask_png(mask, out / f"m{i}.png", n)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
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
        print(f"{result['median_s']:.2f} s, +{result['extra_mib']:.0f} MiB")
        rows.append(
            {"mask": name, "expr": expr if len(expr) < 120 else name, "tokens": n, **result}
        )
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": torch.get_num_threads(),
        "repeats": REPEATS,
    }
    (RESULTS / "viz_large.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| mask | tokens | median s (min–max) | peak RSS MiB | over baseline MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mask']} | {r['tokens']} | {r['median_s']:.2f} ({r['min_s']:.2f}–"
            f"{r['max_s']:.2f}) | {r['peak_mib']:.0f} | {r['extra_mib']:.0f} |"
        )
    (RESULTS / "viz_large.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
