"""Fixtures and hypothesis profiles; the helpers that tests share live in tests/helpers/."""

from __future__ import annotations

import pytest
from helpers.models import FAMILIES
from hypothesis import settings

# Property tests draw the same examples on every run (CI stays reproducible); to explore new ones,
# run with --hypothesis-profile=explore (e.g. after changing a loader).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param
