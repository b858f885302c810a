"""Fixtures and hypothesis profiles; the helpers that tests share live in tests/helpers/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers.models import FAMILIES
from hypothesis import settings

# Property tests draw the same examples on every run (CI stays reproducible); to explore new ones,
# run with --hypothesis-profile=explore (e.g. after changing a loader).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Every test on one thread: tiny models gain nothing from a second, and idle threads spinning
    while they wait for each other cost far more on a busy machine. (Child processes keep theirs.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param
