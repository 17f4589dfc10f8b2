from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backends import available, make  # noqa: E402


@pytest.fixture(params=["mlx", "torch"])
def backend(request: pytest.FixtureRequest):
    """Runs the requesting test once per backend; a backend that is not installed is skipped."""
    if request.param not in available():
        pytest.skip(f"{request.param} is not installed")
    return make(request.param)
