# Every target that needs the environment builds it first, so any target works on a fresh clone.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install figures figures-check test test-slow test-all test-legacy-hf lint format typecheck nb demo bench bench-quick bench-viz bench-hf bench-decode bench-blocks bench-guarantees check clean gpu-check test-torch211 example-cp bench-cp

# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels on a CPU machine.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

figures: $(STAMP)  ## the main job: every picture the README shows, written into figures/
	$(PY) figures/make_figures.py

figures-check: $(STAMP)  ## fail when a committed figure differs from a fresh one
	$(PY) figures/make_figures.py --check

test: $(STAMP)  ## the fast suite: no torch.compile
	$(PY) -m pytest

test-slow: $(STAMP)  ## only the compiled (slow) tests
	$(PY) -m pytest -m "slow and not gpu" tests

test-all: $(STAMP)  ## everything but the GPU tests
	$(PY) -m pytest -m "not gpu"

# transformers 4.57 is the last release with the legacy AttentionMaskConverter; tests/reference.py
# holds an oracle of its behaviour that the main suite uses, checked here against the real class.
LEGACY_HF := .venv-legacy-hf
test-legacy-hf: $(STAMP)  ## the legacy-converter oracle against transformers 4.57's own class
	test -d $(LEGACY_HF) || $(PY) -m pip install --quiet --target $(LEGACY_HF) "transformers==4.57.*"
	PYTHONPATH=$(LEGACY_HF) $(PY) -m pytest -p no:cacheprovider -o addopts="" -q -k oracle_equals tests/test_tree.py

# The oldest torch we claim (pyproject.toml), and the one on the GPU machines: the fast suite on
# it too. PyPI's 2.11 wheel for Linux is a CUDA build; on a machine without a GPU it runs on CPU.
TORCH_OLDEST ?= torch==2.11.0
VENV_OLDEST := .venv-torch211
$(VENV_OLDEST)/.installed: pyproject.toml
	test -x $(VENV_OLDEST)/bin/python || $(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install --quiet "$(TORCH_OLDEST)"
	$(VENV_OLDEST)/bin/python -m pip install --quiet -e ".[dev]"
	touch $@

test-torch211: $(VENV_OLDEST)/.installed  ## the fast suite on torch 2.11
	$(VENV_OLDEST)/bin/python -m pytest

# No venv, no install: the GPU machine has no package registry. It prints a skip line without CUDA.
GPU_OUT ?= benchmarks/results/gpu-run
gpu-check:  ## pytest -m gpu and benchmarks/gpu.py on CUDA; summary.md and summary.json in GPU_OUT
	bash benchmarks/gpu_check.sh "$(GPU_OUT)"

lint: $(STAMP)
	$(PY) -m ruff check flexmask tests benchmarks figures examples
	$(PY) -m ruff format --check flexmask tests benchmarks figures examples

format: $(STAMP)
	$(PY) -m ruff format flexmask tests benchmarks figures examples
	$(PY) -m ruff check --fix flexmask tests benchmarks figures examples

typecheck: $(STAMP)
	$(PY) -m mypy

nb: $(STAMP)  ## run the notebooks (committed without outputs)
	$(PY) -m pytest -p no:cacheprovider -o addopts="" --nbmake notebooks

demo: $(STAMP)  ## every factory's BlockMask described at 4096 tokens, the module on a padded batch
	$(PY) benchmarks/demo.py

bench: $(STAMP)  ## attention fwd and fwd+bwd, BlockMask building, memory: BENCHMARKS.md (~40 min)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/attention.py --backward
	$(PY) benchmarks/block_build.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/memory.py --scale
	$(PY) benchmarks/dispatch.py
	$(PY) benchmarks/guarantees.py
	$(PY) benchmarks/score_mods.py
	$(PY) benchmarks/causal_squares.py
	$(PY) benchmarks/report.py

bench-guarantees: $(STAMP)  ## what zeroing hidden queries/keys (NaN in padding) costs, per call
	$(PY) benchmarks/guarantees.py
	$(PY) benchmarks/guarantees.py --nan

bench-quick: $(STAMP)  ## the same scripts at small sizes, a smoke run (CI; under 3 minutes)
	$(PY) benchmarks/attention.py --quick
	$(PY) benchmarks/attention.py --quick --backward
	$(PY) benchmarks/block_build.py --quick
	$(PY) benchmarks/memory.py --quick
	$(PY) benchmarks/memory.py --quick --scale
	$(PY) benchmarks/dispatch.py --quick
	$(PY) benchmarks/guarantees.py --quick
	$(PY) benchmarks/score_mods.py --quick
	$(PY) benchmarks/causal_squares.py --quick
	$(PY) benchmarks/context_parallel.py --quick
	$(PY) benchmarks/gpu.py --quick --device cpu --out benchmarks/results/gpu_quick  # the script only
	$(PY) benchmarks/hf_decode.py --quick

example-cp: $(STAMP)  ## context parallelism: a tiny transformer trained on 2 gloo ranks = 1 process
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 examples/context_parallel.py

bench-cp: $(STAMP)  ## context parallelism: load balance of the shardings, per-rank peak memory
	$(PY) benchmarks/context_parallel.py

bench-viz: $(STAMP)  ## time and peak memory of drawing 16k-131k token masks
	$(PY) benchmarks/viz_large.py

bench-blocks: $(STAMP)  ## BlockMask building: tile builder vs torch's create_block_mask
	$(PY) benchmarks/block_build.py

bench-decode: $(STAMP)  ## decode-step latency with a KVCache: flex vs SDPA with the dense step mask
	$(PY) benchmarks/decode.py

bench-hf: $(STAMP)  ## Transformers: the parity matrix (15 families) and decode latency against sdpa
	$(PY) benchmarks/hf_parity.py
	$(PY) benchmarks/hf_decode.py

check: lint typecheck test-all nb figures-check

clean:
	rm -rf $(VENV) $(LEGACY_HF) $(VENV_OLDEST) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
