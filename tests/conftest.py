"""Fixtures only (helpers live in tests/helpers.py). Tests run real Paddle ops on real files; nothing mocks a
library."""
import os

# Keep runs quiet and single-threaded so two cores are enough for the whole suite.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PADDLE_DISABLE_WARNINGS", "1")

import pytest  # noqa: E402

from helpers import make_parts  # noqa: E402


@pytest.fixture(scope="session")
def demo_file_list(tmp_path_factory) -> str:
    """96 demo records of 32 px in 4 gzip parts, shared by the tests of a session (read-only)."""
    return make_parts(str(tmp_path_factory.mktemp("demo_parts")), 96)
