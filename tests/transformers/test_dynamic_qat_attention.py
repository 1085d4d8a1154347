"""QAT for torch.nn.MultiheadAttention: prepare_dynamic_qat swaps it for the QAT
DynamicMultiheadAttention (fake-quantized projections sharing the MHA's parameters), which
trains and converts to the served int8 attention; under autocast the two agree bit for bit."""
import copy
import logging

import pytest
import torch
import torch.nn as nn

from gpuquant import backends
from gpuquant.nn.qat.linear_dynamic import DynamicLinear as QATDynamicLinear
from gpuquant.nn.qat.linear_dynamic import DynamicMultiheadAttention as QATMHA
from gpuquant.nn.quantized.linear_dynamic import (DynamicLinear, DynamicMultiheadAttention,
                                                  WeightOnlyLinear)
from gpuquant.quantization.dynamic import prepare_dynamic_qat, quantize_dynamic


def _encoder(batch_first=True, dropout=0.0):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=batch_first)


def test_prepare_swaps_mha_sharing_its_parameters():
    layer = _encoder()
    mha = layer.self_attn
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    qat = prepare_dynamic_qat(layer)
    a = qat.self_attn
    assert type(a) is QATMHA and a.training
    assert type(a.in_proj) is QATDynamicLinear and type(a.out_proj) is QATDynamicLinear
    shared = [a.in_proj.weight, a.in_proj.bias, a.out_proj.weight, a.out_proj.bias]
    assert all(s is p for s, p in zip(shared, params))
    assert a.in_proj_bias is mha.in_proj_bias and a.in_proj_weight is None
    assert {id(p) for p in qat.parameters()} >= {id(p) for p in params}


@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_qat_attention_trains_and_converts(weight_only, batch_first):
    """Gradients reach the MHA's own parameters; an optimizer made for the float layer trains
    the QAT one; quantize_dynamic converts the QAT attention with its projections' mode; under
    autocast the QAT output equals the converted layer's bit for bit; without it they agree
    to the quantization's rounding (a token's rounding may flip by one step)."""
    layer = _encoder(batch_first)
    mha = layer.self_attn
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    qat = prepare_dynamic_qat(layer, weight_only=weight_only)
    x = torch.randn(3, 6, 32) if batch_first else torch.randn(6, 3, 32)
    for _ in range(2):
        opt.zero_grad()
        qat(x).square().mean().backward()
        assert mha.in_proj_weight.grad.abs().sum() > 0
        assert mha.out_proj.weight.grad.abs().sum() > 0
        before = mha.in_proj_weight.detach().clone()
        opt.step()
        assert not torch.equal(before, mha.in_proj_weight)
    qat.eval()
    served = quantize_dynamic(copy.deepcopy(qat))
    a = served.self_attn
    assert type(a) is DynamicMultiheadAttention and a.batch_first == batch_first
    assert type(a.in_proj) is (WeightOnlyLinear if weight_only else DynamicLinear)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(qat(x), served(x))
        y_qat, y_served = qat(x), served(x)
    assert torch.nn.functional.cosine_similarity(y_qat.flatten(), y_served.flatten(), 0) > 0.999


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_qat_cross_attention_with_masks_matches_served_under_autocast(backend):
    """Cross-attention (q / k / v from slices of the packed in-projection), an attention mask
    and a key-padding mask: the QAT attention under autocast is the served one's output and
    weights, bit for bit, on each backend."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    qat = QATMHA.from_float_module(mha).eval()
    served = DynamicMultiheadAttention.from_qat_module(qat).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.rand(5, 7) < 0.2
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 6] = True
    with backends.use(backend), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o1, w1 = qat(q, kv, kv, attn_mask=mask, key_padding_mask=kpm)
        o2, w2 = served(q, kv, kv, attn_mask=mask, key_padding_mask=kpm)
    assert torch.equal(o1, o2) and torch.equal(w1, w2)


def test_qat_attention_selection_and_bad_input(caplog):
    """filter_fn and modules select MHAs as quantize_dynamic does; an MHA the served module
    cannot take stays float (logged); the constructors refuse other modules."""
    m = nn.ModuleDict(dict(a=nn.MultiheadAttention(16, 2), b=nn.MultiheadAttention(16, 2),
                           odd=nn.MultiheadAttention(16, 2, kdim=8, vdim=8)))
    with caplog.at_level(logging.WARNING, logger="gpuquant.quantization"):
        p = prepare_dynamic_qat(m, inplace=False, filter_fn=lambda mod, name: name != "b")
    assert type(p["a"]) is QATMHA and type(p["b"]) is nn.MultiheadAttention
    assert type(p["odd"]) is nn.MultiheadAttention and "kdim" in caplog.text
    only_mha = prepare_dynamic_qat(nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 4)),
                                   modules=(nn.MultiheadAttention,))
    assert type(only_mha[0]) is QATMHA and type(only_mha[1]) is nn.Linear
    with pytest.raises(TypeError, match="not a torch.nn.MultiheadAttention"):
        QATMHA.from_float_module(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="kdim"):
        QATMHA.from_float_module(m["odd"])
    with pytest.raises(TypeError, match="QAT DynamicMultiheadAttention"):
        DynamicMultiheadAttention.from_qat_module(m["a"])
    with pytest.raises(ValueError, match="prepare_dynamic_qat: a: .*in_features=200000"):
        prepare_dynamic_qat(nn.ModuleDict(dict(a=nn.MultiheadAttention(200000, 1,
                                                                       device="meta"))))
    fresh = QATMHA(16, 2, batch_first=True, weight_only=True)
    assert fresh.in_proj.weight.shape == (48, 16) and fresh.in_proj.weight_only
    out, w = fresh(torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 16) and w.shape == (2, 3, 3)


def test_qat_attention_state_dict_has_torch_keys():
    """Checkpoints move between the float and the QAT model (torch's MHA key names)."""
    layer = _encoder()
    float_sd = copy.deepcopy(layer.state_dict())
    qat = prepare_dynamic_qat(copy.deepcopy(layer))
    sd = qat.state_dict()
    assert set(sd) == set(float_sd)
    with torch.no_grad():
        qat.self_attn.in_proj.weight.add_(1.0)
    fresh = _encoder()
    fresh.load_state_dict(qat.state_dict())  # strict
    assert torch.equal(fresh.self_attn.in_proj_weight, qat.self_attn.in_proj.weight)
    qat.load_state_dict(float_sd)  # strict, the other way
    assert torch.equal(qat.self_attn.in_proj.weight, layer.self_attn.in_proj_weight)
    assert torch.equal(qat.self_attn.in_proj.bias, layer.self_attn.in_proj_bias)


def test_qat_attention_without_bias_unbatched_and_causal():
    """An MHA without biases keeps torch's keys (no bias entries); unbatched input and
    is_causal go through the shared forward; QAT == served under autocast."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, bias=False, batch_first=True)
    keys = set(mha.state_dict())
    qat = QATMHA.from_float_module(mha)
    assert set(qat.state_dict()) == keys and qat.in_proj.bias is None
    x = torch.randn(5, 16, requires_grad=True)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    out, _ = qat(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    out.sum().backward()
    assert out.shape == (5, 16) and mha.in_proj_weight.grad.abs().sum() > 0
    served = DynamicMultiheadAttention.from_qat_module(qat.eval()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = qat(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
        b, _ = served(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    assert torch.equal(a, b)
