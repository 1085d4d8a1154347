"""Drop-in tests run single-threaded."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """tests/conftest.py: one_thread."""
