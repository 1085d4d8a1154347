"""A deliberately wrong backend for the verify tests: the reference ops, except that conv2d
flips one bit of one output byte (the last element in memory). Registered by the tests with
``gpuquant.backends.register("faulty", "tests.backends.faulty_backend")``."""
from gpuquant.backends import reference

NAME = "faulty"
DEVICES = frozenset({"cpu"})
PRIORITY = -100  # never chosen automatically


def is_available():
    return True, ""


def _conv2d(*args, **kwargs):
    y = reference.OPS["conv2d"](*args, **kwargs).clone(memory_format=__import__("torch").channels_last)
    flat = y.permute(0, 2, 3, 1).reshape(-1)  # a view of the channels_last memory
    flat[-1] = flat[-1] ^ 1
    return y


OPS = dict(reference.OPS)
OPS["conv2d"] = _conv2d
