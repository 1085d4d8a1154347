"""Triton (3.6, the GPU machines' version) refuses to launch a compiled kernel again when a
module global it read compares unequal to the value it was compiled with: a NaN constant
(NaN != NaN) made every launch after the first fail there, which the interpreter never sees.
Every constexpr global of the Triton backend must equal itself."""
import importlib
import math
import pkgutil

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import gpuquant.backends.triton as tri  # noqa: E402


def _modules():
    for info in pkgutil.iter_modules(tri.__path__):
        yield importlib.import_module(f"{tri.__name__}.{info.name}")


def test_no_triton_global_is_unequal_to_itself():
    seen = 0
    for mod in _modules():
        for name, value in vars(mod).items():
            if isinstance(value, tl.constexpr):
                seen += 1
                v = value.value
                assert v == v, f"{mod.__name__}.{name} = {v!r} != itself: Triton 3.6 refuses relaunch"
                if isinstance(v, float):
                    assert not math.isnan(v)
    assert seen >= 5  # the constants are there: this test looks at the right modules
