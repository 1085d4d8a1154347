"""Drop-in tests run single-threaded."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small images gain nothing from threads; on a loaded 2-core machine two threads per
    process made model tests several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
