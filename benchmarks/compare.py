"""Did a change make flexmask slower? The quick attention benchmarks of a base commit and of the
working tree, run in turns in one invocation (so the machine's drift hits both alike), each
case's median over the turns, and the ratio working tree / base for flexmask's own methods.

``python benchmarks/compare.py --base <commit> [--turns 2]``; writes
``benchmarks/results/compare_quick.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import save

ROOT = Path(__file__).resolve().parent.parent
RUNS = [["attention.py", "--quick"], ["attention.py", "--quick", "--backward"]]
RESULTS = ["attention_forward_quick.json", "attention_backward_quick.json"]
METHODS = ("sparse", "auto")  # flexmask's; the peers are the same code in both trees


def _times(tree: Path) -> dict[tuple[str, ...], float]:
    """Run the quick benchmarks in ``tree``; ``(file, family, tokens, dtype, method) -> ms``."""
    for args in RUNS:
        subprocess.run([sys.executable, str(tree / "benchmarks" / args[0]), *args[1:]],
                       cwd=tree, check=True, env=_env(tree), capture_output=True)  # fmt: skip
    out = {}
    for name in RESULTS:
        for row in json.loads((tree / "benchmarks" / "results" / name).read_text())["rows"]:
            if row["method"] in METHODS:
                key = (name.split("_")[1], row["family"], str(row["tokens"]), row["dtype"],
                       row["method"])  # fmt: skip
                out[key] = row["ms"]
    return out


def _env(tree: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(tree)}  # this tree's flexmask, not the installed one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--turns", type=int, default=2, help="runs of each tree, in turns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            runs: dict[str, list[dict[tuple[str, ...], float]]] = {"base": [], "now": []}
            for _ in range(args.turns):
                runs["base"].append(_times(base))
                runs["now"].append(_times(ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False, capture_output=True)  # fmt: skip
    rows = []
    for key in sorted(set(runs["base"][0]) & set(runs["now"][0])):
        before = statistics.median(r[key] for r in runs["base"])
        after = statistics.median(r[key] for r in runs["now"])
        rows.append({"pass": key[0], "family": key[1], "tokens": int(key[2]), "dtype": key[3],
                     "method": key[4], "base_ms": before, "now_ms": after,
                     "ratio": after / before})  # fmt: skip
    save("compare_quick", rows, ["pass", "family", "tokens", "dtype", "method", "base ms",
                                 "now ms", "now / base"], "llrllrrr",
         lambda r: [r["pass"], r["family"], str(r["tokens"]), r["dtype"], r["method"],
                    f"{r['base_ms']:.1f}", f"{r['now_ms']:.1f}", f"{r['ratio']:.2f}"],
         base=args.base, turns=args.turns)  # fmt: skip
    ratios = [r["ratio"] for r in rows]
    print(f"median now / base over {len(ratios)} cases: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
