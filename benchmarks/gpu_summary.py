"""The GPU check's summary: ``summary.md`` and ``summary.json`` in the check's folder, from the
tests' JUnit report (``gpu-tests.xml``) and the benchmark's ``gpu.json``/``gpu.md``."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def test_results(xml: Path) -> dict:
    """Counts and every failure's first line; an absent report means the run was cut short."""
    if not xml.exists():
        return {"report": "missing: the test run was cut short before pytest wrote it"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures.append({"test": case.get("name"), "message": (message or [""])[0][:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tests-exit", type=int, required=True)
    ap.add_argument("--bench-exit", type=int, required=True)
    args = ap.parse_args()
    tests = test_results(args.out / "gpu-tests.xml")
    bench_json = args.out / "gpu.json"
    bench = json.loads(bench_json.read_text()) if bench_json.exists() else None
    cut = {124: " (cut at its time limit)", 130: " (interrupted at its time limit)"}
    summary = {"tests_exit": args.tests_exit, "bench_exit": args.bench_exit, "tests": tests,
               "bench": bench}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = ["# GPU check", "", f"pytest -m gpu: exit {args.tests_exit}"
             f"{cut.get(args.tests_exit, '')}; benchmark: exit {args.bench_exit}"
             f"{cut.get(args.bench_exit, '')}.", ""]  # fmt: skip
    if "report" in tests:
        lines.append(f"Tests: report {tests['report']}.")
    else:
        lines.append(f"Tests: {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped.")  # fmt: skip
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failures"]]
    bench_md = args.out / "gpu.md"
    lines += ["", bench_md.read_text() if bench_md.exists() else "No benchmark results."]
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
