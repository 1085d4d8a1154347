"""The dynamic Linears' memoised decode path (``forward`` after a first full call): the same
bytes as the full call, and every change that must end it does."""
import copy
import io
import pickle

import pytest
import torch

from gpuquant import backends
from gpuquant.nn.quantized.linear_dynamic import DynamicLinear, StaticActLinear, WeightOnlyLinear

CLASSES = [DynamicLinear, WeightOnlyLinear]


def _full(mod, x):
    """The call without the memo (every check, the functional front end)."""
    return mod._linear(x)


def _mod(cls, k=40, n=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return cls.from_float_module(torch.nn.Linear(k, n, bias=bias)).eval()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("backend", ["numpy", "reference", "triton"])
def test_memoised_calls_equal_full_calls(cls, backend):
    mod = _mod(cls)
    with backends.use(backend), torch.no_grad():
        for shape, dtype in [((3, 40), torch.float32), ((2, 5, 40), torch.bfloat16),
                             ((1, 40), torch.float16), ((3, 40), torch.float32)]:
            for _ in range(2):  # the second call of each kind runs memoised
                x = torch.randn(shape).to(dtype)
                y = mod(x)
                ref = _full(mod, x)
                assert y.dtype == ref.dtype == dtype and y.shape == shape[:-1] + (24,)
                assert torch.equal(y, ref)
        # a non-contiguous input
        x = torch.randn(40, 6).t()
        assert torch.equal(mod(x), _full(mod, x))
    assert len(mod._fast) == 3  # one memo per (dtype, device, backend)


@pytest.mark.parametrize("cls", CLASSES)
def test_buffer_edits_end_the_memo(cls):
    mod = _mod(cls)
    x = torch.randn(4, 40)
    with torch.no_grad():
        y0 = mod(x)
        mod(x)
        with torch.no_grad():
            mod.weight_scale.mul_(2)  # in place
        y1 = mod(x)
        assert torch.equal(y1, _full(mod, x)) and not torch.equal(y1, y0)
        mod.bias = torch.zeros(24)  # assigned anew
        y2 = mod(x)
        assert torch.equal(y2, _full(mod, x)) and not torch.equal(y2, y1)
        mod.weight[0, 0] = 17 if mod.weight[0, 0] != 17 else -17
        assert torch.equal(mod(x), _full(mod, x))


def test_act_dtype_and_quantize_enabled_are_honoured():
    import gpuquant
    mod = _mod(DynamicLinear)
    x = torch.randn(6, 40) * 3
    x[:, 0] = -x.abs().max(dim=1).values  # the row minimum at -absmax: -128 vs -127 matters
    with torch.no_grad():
        mod(x)
        mod(x)
        mod.act_dtype = gpuquant.qint8_narrow
        assert torch.equal(mod(x), _full(mod, x))
        mod.set_quantize_enabled(False)
        assert torch.equal(mod(x), _full(mod, x))  # the float debug mode


@pytest.mark.parametrize("cls", CLASSES)
def test_backend_choice_is_part_of_the_key(cls, monkeypatch):
    op = "linear_weight_only" if cls is WeightOnlyLinear else "linear_dynamic"
    calls = {"numpy": 0, "triton": 0}
    for name in calls:
        ops = backends.get_backend(name).OPS

        def spy(*a, real=ops[op], name=name):
            calls[name] += 1
            return real(*a)
        monkeypatch.setitem(ops, op, spy)
    mod = _mod(cls)
    x = torch.randn(2, 40)
    with torch.no_grad():
        for name in ("numpy", "triton", "numpy", "triton"):
            before = dict(calls)
            with backends.use(name):
                mod(x)
                mod(x)
            assert calls[name] == before[name] + 2 and sum(calls.values()) == sum(
                before.values()) + 2, (name, calls)
    assert len(mod._fast) == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_gradient_takes_the_full_path_and_training_computes_as_eval(cls):
    mod = _mod(cls)
    x = torch.randn(3, 40)
    with torch.no_grad():
        want = mod(x)
        mod(x)
    xg = x.clone().requires_grad_(True)
    mod(xg).sum().backward()
    assert xg.grad is not None and torch.equal(
        xg.grad, torch.ones(3, 24) @ mod.dequantized_weight())
    mod.train()  # (adapters over a frozen int8 base): the same forward, memo or not
    with torch.no_grad():
        assert torch.equal(mod(x), want) and torch.equal(mod(x), want)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_inputs_still_raise_after_memo(cls):
    mod = _mod(cls)
    with torch.no_grad():
        mod(torch.randn(2, 40))
        mod(torch.randn(2, 40))
        with pytest.raises(ValueError, match=r"\(\.\.\., 40\)"):
            mod(torch.randn(2, 39))
        with pytest.raises(ValueError):
            mod(torch.randn(()))
        with pytest.raises(TypeError):
            mod(torch.randn(2, 40).double())
        assert mod(torch.randn(0, 40)).shape == (0, 24)


@pytest.mark.parametrize("cls", CLASSES)
def test_pickle_copy_and_save_after_memo(cls):
    mod = _mod(cls)
    x = torch.randn(2, 40)
    with torch.no_grad():
        y = mod(x)
        mod(x)
        for other in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
            assert torch.equal(other(x), y)
            other.weight_scale.mul_(2)
            assert torch.equal(mod(x), y)  # the original's memo is its own
        buf = io.BytesIO()
        torch.save(mod, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_static_act_linear_keeps_its_own_path():
    torch.manual_seed(0)
    mod = StaticActLinear.from_float_module(torch.nn.Linear(40, 24), act_absmax=3.0).eval()
    x = torch.randn(3, 40)
    with torch.no_grad():
        mod(x)
        assert mod._fast == {}
        assert torch.equal(mod(x), _full(mod, x))


@pytest.mark.parametrize("cls", CLASSES)
def test_module_built_under_inference_mode(cls):
    """Inference tensors have no version counter: the memo still works (identity only)."""
    x = torch.randn(3, 40)
    with torch.inference_mode():
        mod = _mod(cls)
        y = mod(x)
        assert torch.equal(mod(x), y) and len(mod._fast) == 1
        assert torch.equal(y, _full(mod, x))


@pytest.mark.parametrize("cls", CLASSES)
def test_no_memo_for_strided_buffers(cls):
    """A memo of a contiguous copy could go stale (edits the version stamp cannot see):
    strided buffers take the full path every call."""
    mod = _mod(cls)
    mod.weight_scale = torch.stack([mod.weight_scale, mod.weight_scale], 1)[:, 0]
    assert not mod.weight_scale.is_contiguous()
    x = torch.randn(2, 40)
    with torch.no_grad():
        mod(x)
        mod(x)
    assert mod._fast == {}
    assert torch.equal(mod(x), _full(mod, x))


@pytest.mark.parametrize("cls", CLASSES)
def test_memo_lets_go_of_replaced_buffers(cls):
    """A module moved (or given new buffers) must not keep its old buffers alive through
    the memo's closures."""
    import gc
    import weakref
    mod = _mod(cls)
    x = torch.randn(2, 40)
    with torch.no_grad():
        mod(x)
        mod(x)
    old = weakref.ref(mod.weight)
    mod._apply(lambda t: t.clone())  # what .to() / .cuda() do, on the CPU
    gc.collect()
    assert old() is None and mod._fast == {}
    with torch.no_grad():
        mod(x)
        mod(x)
        old = weakref.ref(mod.weight_scale)
        mod.weight_scale = mod.weight_scale * 1.0  # assigned anew
        mod(x)
    gc.collect()
    assert old() is None
