#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`, or `bash benchmarks/gpu_check.sh OUT_DIR`).
# No install and no network: it uses whichever python3 holds a torch that sees CUDA, with this
# repo on PYTHONPATH. It runs `pytest -m gpu`, then benchmarks/gpu.py, and writes summary.md and
# summary.json (with the tests' results and the benchmark's tables) into OUT_DIR. Under 8 minutes:
# the tests get 5, the benchmark 2.5; what did not finish is reported as cut short.
# Without CUDA it says so and exits 0.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/benchmarks/results/gpu-run}"

py=""
for candidate in ${PYTHON:-} python3 python "$repo/.venv/bin/python"; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        py="$candidate"
        break
    fi
done
if [ -z "$py" ]; then
    echo "no CUDA device: gpu checks skipped"
    exit 0
fi

mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"

# Compiling kernels takes most of the time and runs on the CPU: 4 workers where pytest-xdist is.
workers=""
"$py" -c "import xdist" 2>/dev/null && workers="-n 4"
# SIGINT, not SIGTERM: pytest then stops and still writes the report of the tests that ran.
timeout -s INT -k 30 300 "$py" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider \
    -o addopts="" -q -rfE $workers --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout -k 10 150 "$py" benchmarks/gpu.py --out "$out" --budget 90 2>&1 | tee "$out/gpu-bench.log"
bench=${PIPESTATUS[0]}
"$py" benchmarks/gpu_summary.py "$out" --tests-exit "$tests" --bench-exit "$bench"
exit "$tests"
