"""Memoised state that must not go stale (Triton interpreter on CPU against the NumPy
oracle): derived weights after ``w.data = new``, a Requant's left-shift flag after
``dataclasses.replace`` or reassigned shifts, a quantized conv module whose geometry is
edited after its first call; and the Triton concat of 5-D tensors."""
import dataclasses

import pytest
import torch

import gpuquant.functional as GF
from gpuquant import qint8
from gpuquant.backends import get_backend, use
from gpuquant.functional.requant import make_requant


@pytest.fixture
def ops():
    if "triton" not in __import__("gpuquant").backends.available():
        pytest.skip("the Triton backend cannot run here")
    return get_backend("triton").OPS, get_backend("numpy").OPS


def _rq(n):
    return make_requant(0.02, torch.rand(n, dtype=torch.float64) * 0.01 + 0.001, 0.5, 0, qint8)


def test_derived_weight_follows_a_data_reassignment(ops):
    T, N = ops
    rq = _rq(24)
    x = torch.randint(-128, 128, (5, 48), dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 48), dtype=torch.int8)
    T["linear"](x, 3, w, None, rq)  # memoises w's folded zero-point bias (colsum)
    w.data = torch.randint(-127, 128, (24, 48), dtype=torch.int8)  # same id, same version
    assert torch.equal(T["linear"](x, 3, w, None, rq), N["linear"](x, 3, w, None, rq))


def test_left_shift_flag_follows_replaced_or_reassigned_shifts(ops):
    T, N = ops
    x = torch.randint(-3, 4, (7, 24), dtype=torch.int8)
    w = torch.randint(-3, 4, (9, 24), dtype=torch.int8)
    rq = _rq(9)
    assert rq.may_left_shift() is False
    mult, shift = torch.full((9,), 2 ** 30, dtype=torch.int32), torch.full((9,), -3, dtype=torch.int32)
    neg = dataclasses.replace(rq, multiplier=mult, rshift=shift)  # passes left_shift=False
    assert neg.may_left_shift()
    assert torch.equal(T["linear"](x, 1, w, None, neg), N["linear"](x, 1, w, None, neg))
    rq.multiplier, rq.rshift = mult.clone(), shift.clone()  # reassigned on the object
    assert rq.may_left_shift()
    assert torch.equal(T["linear"](x, 1, w, None, rq), N["linear"](x, 1, w, None, rq))


def test_conv_module_geometry_edited_after_its_first_call():
    import gpuquant.nn.quantized as nnq
    m = nnq.Conv2d(8, 16, 3, padding=1).eval()
    x = torch.randint(-128, 128, (1, 8, 6, 6), dtype=torch.int8)
    x = x.contiguous(memory_format=torch.channels_last)
    with use("numpy"):
        assert m(x).shape == (1, 16, 6, 6)
        m.padding, m.stride = (0, 0), (2, 2)
        assert m(x).shape == (1, 16, 2, 2)


def test_concat_of_5d_tensors(ops):
    a = torch.randint(-128, 128, (1, 2, 3, 2, 2), dtype=torch.int8)
    b = torch.randint(-128, 128, (1, 2, 1, 2, 2), dtype=torch.int8)
    outs = {}
    for be in ("triton", "numpy"):
        with use(be):
            outs[be] = GF.concat([a, b], [0, 0], [None, None], 2, qint8)
    assert outs["triton"].shape == (1, 2, 4, 2, 2)
    assert torch.equal(outs["triton"], outs["numpy"])
