import os

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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
