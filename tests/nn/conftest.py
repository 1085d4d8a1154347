import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every nn test runs single-threaded (tests/conftest.py: one_thread)."""
