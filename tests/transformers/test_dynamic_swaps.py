"""What the dynamic swaps (quantize_dynamic, prepare_dynamic_qat, smooth_quant) keep of the
modules they replace: hooks, pruning, lazy Linears, SmoothQuant's factors under casts, and
the served attention's constructor (torch's argument order)."""
import copy
import logging

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune

from gpuquant.nn.qat.linear_dynamic import DynamicLinear as QATDynamicLinear
from gpuquant.nn.qat.linear_dynamic import DynamicMultiheadAttention as QATMHA
from gpuquant.nn.quantized.linear_dynamic import DynamicLinear, DynamicMultiheadAttention
from gpuquant.quantization.dynamic import prepare_dynamic_qat, quantize_dynamic
from gpuquant.quantization.smoothquant import calibrate_linear_inputs, smooth_quant


def _hooked_model(calls):
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))

    def pre(mod, args, kwargs):
        calls.append(("pre", type(mod).__name__))
        return (args[0] * 2,), kwargs

    def post(mod, args, out):
        calls.append(("post", type(mod).__name__))
        return out + 1.0

    m[0].register_forward_pre_hook(pre, with_kwargs=True)
    m[2].register_forward_hook(post)
    m[2].register_full_backward_hook(lambda mod, gi, go: calls.append(("bwd", type(mod).__name__)))
    return m


@pytest.mark.parametrize("swap", ["quantize_dynamic", "weight_only", "prepare_dynamic_qat"])
def test_swaps_carry_forward_and_backward_hooks(swap):
    """torch.ao's swap_module carries forward hooks; gpuquant dropped every hook silently (a
    hook editing inputs or outputs stopped applying). Now the replacement runs them, with
    their flags, and the full backward hook too; the output equals the unhooked swap's with
    the hooks' edits applied."""
    torch.manual_seed(0)
    calls = []
    m = _hooked_model(calls)
    plain = copy.deepcopy(m)
    for mod in plain:
        mod._forward_pre_hooks.clear(), mod._forward_hooks.clear(), mod._backward_hooks.clear()
    conv = {"quantize_dynamic": lambda mm: quantize_dynamic(mm),
            "weight_only": lambda mm: quantize_dynamic(mm, weight_only=True),
            "prepare_dynamic_qat": lambda mm: prepare_dynamic_qat(mm)}[swap]
    q, q_plain = conv(m), conv(plain)
    want = {"prepare_dynamic_qat": QATDynamicLinear}.get(swap, nn.Module)
    assert isinstance(q[0], want) and type(q[0]) is not nn.Linear
    x = torch.randn(5, 8, requires_grad=True)
    y = q(x)
    assert calls == [("pre", type(q[0]).__name__), ("post", type(q[2]).__name__)]
    torch.testing.assert_close(y, q_plain(x * 2) + 1.0, rtol=0, atol=0)
    y.sum().backward()
    assert calls[-1] == ("bwd", type(q[2]).__name__)


def test_swap_refuses_an_old_style_backward_hook_and_leaves_the_model():
    m = nn.Sequential(nn.Linear(8, 4))
    m[0].register_backward_hook(lambda mod, gi, go: None)
    with pytest.raises(ValueError, match=r"quantize_dynamic: 0 \(Linear\) has a backward hook "
                                         r"from register_backward_hook"):
        quantize_dynamic(m)
    assert type(m[0]) is nn.Linear


def test_pruned_linear_quantizes_its_pruned_weight_and_stays_float_in_qat(caplog):
    """A pruned Linear's weight is computed by a pre-hook (weight_orig * weight_mask): the
    QAT Linear took that non-leaf tensor (lost weight_orig from the parameters; the second
    step failed with torch's 'backward through the graph a second time'). prepare_dynamic_qat
    now leaves it float, logged; quantize_dynamic quantizes the pruned weight and does not
    carry the pruning hook (its float weight is gone)."""
    def pruned():  # (a pruned module does not deepcopy: its weight is no graph leaf)
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 4))
        prune.l1_unstructured(m[0], "weight", amount=0.5)
        return m

    with caplog.at_level(logging.WARNING, logger="gpuquant.quantization"):
        qat = prepare_dynamic_qat(pruned())
    assert type(qat[0]) is nn.Linear and "computed at each forward" in caplog.text
    m, q = pruned(), quantize_dynamic(pruned())
    assert isinstance(q[0], DynamicLinear) and not q[0]._forward_pre_hooks
    assert torch.equal(q[0].weight == 0, m[0].weight_mask == 0)  # the pruned half is 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(q(x), m(x), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match=r"computed at each forward"):
        QATDynamicLinear.from_float_module(m[0])


@pytest.mark.parametrize("swap", [quantize_dynamic, prepare_dynamic_qat])
def test_lazy_linear_refused_naming_it(swap):
    m = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match=rf"{swap.__name__}: 0 \(LazyLinear\) is lazy and not "
                                         rf"yet initialized"):
        swap(m)
    m(torch.randn(2, 5))  # initialized: converts
    assert type(swap(m)[0]) is not nn.Linear


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
def test_smoothing_factors_stay_float32_under_casts(cast):
    """model.half() cast SmoothedLinear's 1/s (clamped to 1e5) to float16, where 7e4 is Inf:
    the smoothed fp16 model, and the int8 one built from it, gave Inf / NaN."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    x[:, 3] *= 1e-6  # a near-silent channel: 1/s ~ 7e4
    sm = smooth_quant(copy.deepcopy(m), calibrate_linear_inputs(m, [x]), alpha=0.85)
    factors = sm[0].input_smoothing.clone()
    assert float(factors.max()) > 65504
    qat = prepare_dynamic_qat(copy.deepcopy(sm))
    for model in (sm, qat):
        model.to(cast)
        assert model[0].input_smoothing.dtype == torch.float32
        assert torch.equal(model[0].input_smoothing, factors)
        assert model[0].weight.dtype == cast
        with torch.no_grad():
            y = model(x.to(cast))
        assert y.dtype == cast and bool(torch.isfinite(y).all())
    with torch.no_grad():
        assert bool(torch.isfinite(quantize_dynamic(sm)(x.to(cast))).all())


def test_served_attention_takes_torchs_argument_order():
    """The served DynamicMultiheadAttention took (embed_dim, num_heads, batch_first, bias,
    ..., dropout): Served(16, 4, 0.1) built batch_first=True, dropout 0. Both gpuquant
    attentions now take torch's first four positionally and the rest by keyword, and the
    served one refuses non-bool flags."""
    for cls in (nn.MultiheadAttention, QATMHA, DynamicMultiheadAttention):
        a = cls(16, 4, 0.1, False, batch_first=True)
        assert (a.dropout, a.batch_first) == (0.1, True), cls
        assert a.in_proj_bias is None if cls is nn.MultiheadAttention \
            else a.in_proj.bias is None
        if cls is not nn.MultiheadAttention:  # torch's 5th is add_bias_kv: keyword-only here
            with pytest.raises(TypeError, match="positional"):
                cls(16, 4, 0.1, False, True)
    for kw in ({"batch_first": 1}, {"bias": "yes"}, {"weight_only": None}):
        (k, v), = kw.items()
        with pytest.raises(TypeError, match=rf"{k} must be a bool, got {type(v).__name__}"):
            DynamicMultiheadAttention(16, 4, **kw)


def test_empty_linear_refused_naming_it():
    for kw in ({}, {"weight_only": True}):
        with pytest.raises(ValueError, match=r"^quantize_dynamic: 1: in_features must be an int "
                                             r">= 1, got 0$"):
            quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.Linear(0, 3)), **kw)


def test_a_second_call_on_a_converted_model_is_warned():
    """TRANSFORMERS.md's block ran quantize_dynamic(model) then quantize_dynamic(model,
    weight_only=True) on one model: the first converts in place, the second found nothing
    to swap and returned the W8A8 model without a word (found running the docs)."""
    import warnings
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_dynamic(model)
    for again in (lambda: quantize_dynamic(model, weight_only=True),
                  lambda: prepare_dynamic_qat(model)):
        with pytest.warns(UserWarning, match=r"nothing to swap: 2 module\(s\) of the model are "
                                             r"int8 already.*copy.deepcopy"):
            again()
    with warnings.catch_warnings():  # a model with no Linear at all: nothing to say
        warnings.simplefilter("error")
        quantize_dynamic(nn.Sequential(nn.ReLU()))
