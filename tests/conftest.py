import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings

import flexmask as fm

# CI runs every example; locally `HYPOTHESIS_PROFILE=dev` runs fewer.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Slow tests sweep shapes and masks under torch.compile; don't fall back to eager after 8.
torch._dynamo.config.cache_size_limit = 64


@pytest.fixture(autouse=True)
def _fresh_cache():
    fm.clear_cache()
    yield
    fm.clear_cache()


def pytest_collection_modifyitems(config, items):
    # FLEXMASK_GPU_DRY_RUN=1 runs the GPU suite on the CPU, to check the tests themselves.
    if torch.cuda.is_available() or os.environ.get("FLEXMASK_GPU_DRY_RUN") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA (FLEXMASK_GPU_DRY_RUN=1 runs it on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- Skips that must not go unnoticed -------------------------------------------------------------
# With FLEXMASK_MAX_SKIPS set (.ci/run sets it and says why), the run fails when a whole test
# module is skipped (a module-level importorskip, or every test in it skipped) or when more tests
# skip than that number.

_skipped: Counter[str] = Counter()
_ran: Counter[str] = Counter()
_skipped_modules: list[str] = []


def pytest_collectreport(report):
    if report.skipped:
        _skipped_modules.append(report.nodeid)


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0]
    if report.skipped:
        _skipped[module] += 1
    elif report.when == "call":
        _ran[module] += 1


def pytest_sessionfinish(session, exitstatus):
    limit = os.environ.get("FLEXMASK_MAX_SKIPS")
    if limit is None:
        return
    problems = [f"{m}: the whole module was skipped" for m in _skipped_modules]
    problems += [f"{m}: all {n} tests skipped" for m, n in _skipped.items() if not _ran[m]]
    total = sum(_skipped.values())
    if total > int(limit):
        problems.append(f"{total} tests skipped, more than FLEXMASK_MAX_SKIPS={limit}")
    if problems:
        writer = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            writer.write_line(f"skip check failed: {problem}", red=True)
        session.exitstatus = 1
