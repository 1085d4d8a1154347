"""A deliberately wrong backend for the verify tests: the reference ops, except that conv2d
flips one bit of one output byte (the last element in memory), and so does its fused
``conv2d_add`` (the reference ops composed, then the flip). Registered by the tests with
``gpuquant.backends.register("faulty", "tests.backends.faulty_backend")``."""
from gpuquant.backends import reference
from gpuquant.backends.fused import compose

NAME = "faulty"
DEVICES = frozenset({"cpu"})
PRIORITY = -100  # never chosen automatically


def is_available():
    return True, ""


def _flip_last(y):
    y = y.clone(memory_format=__import__("torch").channels_last)
    flat = y.permute(0, 2, 3, 1).reshape(-1)  # a view of the channels_last memory
    flat[-1] = flat[-1] ^ 1
    return y


def _conv2d(*args, **kwargs):
    return _flip_last(reference.OPS["conv2d"](*args, **kwargs))


def _conv2d_add(*args):
    return _flip_last(compose(reference.OPS)["conv2d_add"](*args))


OPS = dict(reference.OPS)
OPS["conv2d"] = _conv2d
OPS["conv2d_add"] = _conv2d_add
