"""Shared test set-up: seeding, device marks, the Triton interpreter on CPU-only machines."""
import atexit
import os
import random
import shutil
import tempfile

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on CPU tensors through the interpreter; must be set before triton
    # is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "GPUQUANT_STANDIN_CACHE" not in os.environ:
    # One Triton cache for every stand-in driver run of this session (tests run it in child
    # processes; pytest-xdist's workers inherit the variable): a kernel compiled for one is
    # a cache hit for the rest, where each would compile it into its own temporary
    # directory. Its entries have empty cubins (gpuquant.backends.triton.standin), so it
    # is this directory, never a real Triton cache; removed at exit.
    _standin_cache = tempfile.mkdtemp(prefix="gpuquant-standin-tests-")
    os.environ["GPUQUANT_STANDIN_CACHE"] = _standin_cache
    atexit.register(shutil.rmtree, _standin_cache, True)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (the CPU path of this logic is tested "
                                       "through the interpreter / NumPy oracle)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs: a seed per test, derived from its name."""
    seed = abs(hash(request.node.nodeid)) % (2 ** 31) if os.environ.get("GPUQUANT_TEST_RANDOM") \
        else (sum(map(ord, request.node.nodeid)) * 2654435761) % (2 ** 31)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: small tensors and images gain nothing from threads, and
    on a loaded 2-core machine two threads per process made such tests several times slower.
    Request it (``usefixtures``, or from an autouse fixture of a directory's conftest)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
