"""For everything pytest collects (tests, README and docstring examples, notebooks): the backend
``auto`` picks is the cost model's, never a measurement of this machine (deterministic, and no
seconds of calibration inside a test). ``tests/test_tuning.py`` turns measuring on itself."""

import os

os.environ.setdefault("FLEXMASK_TUNING", "off")
