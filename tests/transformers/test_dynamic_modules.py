"""The transformer int8 modules inside real models: torch's Transformer layers (kept off
their fused fast path), gradients through a frozen int8 base, non-finite input to the static
path, module dtype casts, calibration on empty batches, conversion errors and dtype
arguments."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpuquant
from gpuquant import backends
from gpuquant.nn.qat.linear_dynamic import DynamicLinear as QATDynamicLinear
from gpuquant.nn.quantized.linear_dynamic import (DynamicLinear, DynamicMultiheadAttention,
                                                  StaticActLinear, WeightOnlyLinear)
from gpuquant.quantization.dynamic import prepare_dynamic_qat, quantize_dynamic
from gpuquant.quantization.smoothquant import (SmoothedLinear, calibrate_linear_inputs,
                                               quantize_static_linear, smooth_quant)

BACKENDS = [b for b in ("reference", "numpy", "triton") if b in backends.available()]
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _slow_path(fn, *args, **kwargs):
    """``fn(*args)`` with torch's Transformer / MHA fast paths switched off: what a model
    whose attention is int8 must compute (a float MultiheadAttention, left float, may still
    take its own fused kernel, so there only the float model is the reference)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _assert_close_to_float(y, ref):
    cos = F.cosine_similarity(y.float().reshape(-1, y.shape[-1]),
                              ref.float().reshape(-1, ref.shape[-1]), dim=1)
    assert float(cos.min()) > 0.999, float(cos.min())


# --------------------------------------------------------------- torch Transformer layers

@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("skip_attention", [False, True])
def test_encoder_layer_batch_first_runs_the_int8_path(norm_first, skip_attention):
    """batch_first=True under no_grad is where torch's layer takes its fused fast path (int8
    buffers as float weights); converted, it must run its ordinary forward, also when only
    the feed-forward Linears are int8 (the attention left float by filter_fn)."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                       norm_first=norm_first).eval()
    keep = (lambda m, n: "self_attn" not in n) if skip_attention else None
    q = quantize_dynamic(layer, inplace=False, filter_fn=keep)
    assert isinstance(q.linear1, DynamicLinear)
    assert isinstance(q.self_attn, nn.MultiheadAttention if skip_attention
                      else DynamicMultiheadAttention)
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    for kw in ({}, {"src_key_padding_mask": pad}, {"src_mask": causal, "is_causal": True}):
        with torch.no_grad():
            y = q(x, **kw)
            _assert_close_to_float(y, layer(x, **kw))
        if not skip_attention:  # no grad and grad enabled: the same (ordinary) path
            assert torch.equal(y, _slow_path(q, x, **kw))
            assert torch.equal(q(x, **kw).detach(), y)


def test_encoder_nested_tensor_fast_path_is_kept_off():
    """TransformerEncoder turns a padded batch into a nested tensor when its first layer
    looks fast-path-able; int8 layers take dense tensors only."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0,
                                                           batch_first=True), 2).eval()
    assert enc.use_nested_tensor
    q = quantize_dynamic(enc, inplace=False)
    assert not q.use_nested_tensor and enc.use_nested_tensor
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}):
            y = q(x, **kw)
            assert not y.is_nested and torch.equal(y, _slow_path(q, x, **kw))
            keep = ~pad if kw else torch.ones(2, 9, dtype=torch.bool)  # torch zeroes the pads
            _assert_close_to_float(y[keep], enc(x, **kw)[keep])


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_decoder(batch_first):
    t = nn.Transformer(32, 4, 2, 1, 64, dropout=0.0, batch_first=batch_first).eval()
    q = quantize_dynamic(t, inplace=False)
    src, tgt = torch.randn(5, 2, 32), torch.randn(3, 2, 32)
    if batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    with torch.no_grad():
        y = q(src, tgt)
        assert torch.equal(y, _slow_path(q, src, tgt))
        _assert_close_to_float(y, t(src, tgt))


def test_static_linear_in_encoder_layer_stays_off_fast_path():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    q = quantize_static_linear(layer, calibrate_linear_inputs(layer, [x]), inplace=False)
    assert isinstance(q.linear1, StaticActLinear)
    with torch.no_grad():
        _assert_close_to_float(q(x), layer(x))


def test_mha_attention_weights_in_input_dtype():
    for dt in (torch.float16, torch.bfloat16):
        mha = nn.MultiheadAttention(16, 2, batch_first=True).eval().to(dt)
        q = quantize_dynamic(mha, inplace=False)
        x = torch.randn(2, 4, 16, dtype=dt)
        with torch.no_grad():
            w, (yq, wq) = mha(x, x, x)[1], q(x, x, x)
            _, wq_heads = q(x, x, x, average_attn_weights=False)
        assert w.dtype == dt and yq.dtype == dt and wq.dtype == dt and wq_heads.dtype == dt
        assert (wq.float() - w.float()).abs().max() < 0.02


def test_mha_masks_of_other_dtypes_or_shapes_are_refused():
    """As torch's MultiheadAttention: bool or float masks only (a byte mask with 1 = masked
    was added to the scores as +1); a key_padding_mask of the wrong shape is named."""
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    q = quantize_dynamic(mha, inplace=False)
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        for bad in (torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.int64)):
            with pytest.raises(TypeError, match="only bool and floating types of attn_mask"):
                q(x, x, x, attn_mask=bad)
        with pytest.raises(TypeError, match="of key_padding_mask"):
            q(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 4\)"):
            q(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        kpm = torch.tensor([[False, False, True, True], [False] * 4])
        y, w = q(x, x, x, key_padding_mask=kpm)
        assert torch.equal(w[0, :, 2:], torch.zeros(4, 2))  # masked keys get no weight


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_bad_shapes_are_named_before_projecting(batch_first, monkeypatch):
    """Inputs torch's MHA refuses gave a size-mismatch RuntimeError, 'too many values to
    unpack' or an IndexError here: each is a ValueError naming the shape received and the
    one expected, raised before any projection runs."""
    torch.manual_seed(21)
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    q = quantize_dynamic(mha, inplace=False)

    def bt(n, length, e=16):  # (batch n, length) in the module's layout
        return torch.randn(n, length, e) if batch_first else torch.randn(length, n, e)
    x, kv, u = bt(2, 3), bt(2, 5), torch.randn(3, 16)
    cases = [
        ((x, x, x), {"attn_mask": torch.zeros(4, 4)},
         r"the shape of the 2-D attn_mask is \(4, 4\), but should be \(3, 3\)"),
        ((x, kv, kv), {"attn_mask": torch.zeros(3, 3)},
         r"2-D attn_mask is \(3, 3\), but should be \(3, 5\)"),
        ((x, x, x), {"attn_mask": torch.zeros(2, 3, 3)},
         r"3-D attn_mask is \(2, 3, 3\), but should be \(4, 3, 3\)"),
        ((x, x, x), {"attn_mask": torch.zeros(1, 1, 3, 3)},
         r"attn_mask must be 2-D .*got a 4-D tensor of shape \(1, 1, 3, 3\)"),
        ((x[None],) * 3, {}, r"query must be unbatched 2-D .* got a 4-D tensor of shape"),
        ((torch.randn(16),) * 3, {}, r"got a 1-D tensor of shape \(16,\)"),
        ((x, bt(3, 5), bt(3, 5)), {}, r"key and value must have the query's batch size 2"),
        ((x, bt(2, 5, 8), bt(2, 5, 8)), {},
         r"key must have embedding dimension 16 .*got shape \((2, 5|5, 2), 8\)"),
        ((x, kv, bt(2, 4)), {}, r"key and value must have the same shape"),
        ((x, kv[0], kv[0]), {}, r"for a 3-D query, key and value must be 3-D too"),
        ((u, u, u), {"attn_mask": torch.zeros(4, 3, 3)},  # unbatched: (num_heads, L, S)
         r"3-D attn_mask is \(4, 3, 3\), but should be \(2, 3, 3\)"),
    ]

    def boom(*a, **k):
        raise AssertionError("projected before the checks")
    monkeypatch.setattr(q.in_proj, "_linear", boom)
    with torch.no_grad():
        for args, kw, msg in cases:
            with pytest.raises(Exception):  # torch refuses each of them too
                mha(*args, **kw)
            with pytest.raises(ValueError, match=msg):
                q(*args, **kw)
    monkeypatch.undo()
    mask = torch.randn(4, 3, 5)  # a valid 3-D mask, (N * num_heads, L, S), as torch's
    with torch.no_grad():
        _assert_close_to_float(q(x, kv, kv, attn_mask=mask)[0],
                               _slow_path(mha, x, kv, kv, attn_mask=mask)[0])


def test_mha_trains_with_torch_attention_dropout(tmp_path):
    """model.train() was refused. With dropout 0 training computes as eval (same output,
    weights and input gradient); with p > 0 the attention weights are dropped after the
    softmax as torch's math path does it (the same draws: the same weights zeroed, the rest
    scaled by 1 / (1 - p)); eval mode never drops; p survives gpuquant.save / load."""
    torch.manual_seed(22)
    q = quantize_dynamic(nn.MultiheadAttention(16, 2, batch_first=True).eval())
    x0 = torch.randn(3, 5, 16)

    def run(train):
        q.train(train)
        x = x0.clone().requires_grad_(True)
        y, w = q(x, x, x)
        (y.pow(2).sum() + w.pow(2).sum()).backward()
        return y.detach(), w.detach(), x.grad
    want = run(False)
    got = run(True)
    assert q.training and q.in_proj.training and q.dropout == 0.0
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    p = 0.25
    drop = nn.MultiheadAttention(16, 2, dropout=p, batch_first=True).train()
    qd = quantize_dynamic(copy.deepcopy(drop)).train()
    assert qd.dropout == p
    with torch.no_grad():
        torch.manual_seed(23)
        w_torch = drop(x0, x0, x0, average_attn_weights=False)[1]
        torch.manual_seed(23)
        w_q = qd(x0, x0, x0, average_attn_weights=False)[1]
        kept = w_q != 0
        assert torch.equal(w_torch != 0, kept) and 0.1 < float((~kept).float().mean()) < 0.4
        w_eval = qd.eval()(x0, x0, x0, average_attn_weights=False)[1]
        torch.testing.assert_close(w_q[kept], (w_eval / (1 - p))[kept])
        assert torch.equal(qd(x0, x0, x0)[0], qd(x0, x0, x0)[0])  # eval: no dropout
    gpuquant.save(nn.Sequential(qd), tmp_path / "mha.safetensors")
    assert gpuquant.load(tmp_path / "mha.safetensors")[0].dropout == p
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\], got 1.5"):
        DynamicMultiheadAttention(16, 2, dropout=1.5)


# --------------------------------------------------------------------------- gradients

def _modules(k=33, n=17):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    smoothed = SmoothedLinear(k, n)
    with torch.no_grad():
        smoothed.weight.copy_(lin.weight)
        smoothed.bias.copy_(lin.bias)
        smoothed.input_smoothing.uniform_(0.5, 2.0)
    return {
        "dynamic": DynamicLinear.from_float_module(lin),
        "dynamic_smoothed": DynamicLinear.from_float_module(smoothed),
        "weight_only": WeightOnlyLinear.from_float_module(lin),
        "static": StaticActLinear.from_float_module(lin, act_absmax=3.0),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dynamic", "dynamic_smoothed", "weight_only", "static"])
def test_straight_through_input_gradient_same_on_every_backend(kind, dtype):
    """grad_x = grad_y @ (weight * weight_scale) in float32, in x's dtype, on every backend;
    the int8 buffers get none; the forward is the no-grad forward, bytes for bytes."""
    m = _modules()[kind].eval()
    assert not list(m.parameters())
    x0 = torch.randn(2, 7, 33).to(dtype)
    g = torch.randn(2, 7, 17).to(dtype)
    want = g.float() @ m.dequantized_weight()
    if m.input_smoothing is not None:  # x * input_smoothing in float32, then the Linear
        want = want * m.input_smoothing
    want = want.to(dtype)
    for be in BACKENDS:
        with backends.use(be):
            x = x0.clone().requires_grad_(True)
            y = m(x)
            with torch.no_grad():
                assert torch.equal(y.detach(), m(x0))
            y.backward(g)
        assert x.grad.dtype == dtype and torch.equal(x.grad, want), be
    assert all(b.grad is None for b in m.buffers())


def test_gradient_reaches_layers_before_a_frozen_int8_base():
    """LoRA-style: a trainable layer feeds a frozen int8 base and an adapter; the base passes
    the gradient straight through (so it is close to the float model's), the same bytes on
    every backend, also through DynamicMultiheadAttention."""
    torch.manual_seed(1)
    up = nn.Linear(8, 16)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    q = quantize_dynamic(copy.deepcopy(mha))
    x = torch.randn(3, 5, 8)

    def grad_of_up(attn):
        up.zero_grad()
        h = up(x)
        attn(h, h, h, need_weights=False)[0].pow(2).sum().backward()
        return up.weight.grad.clone()
    g_float = grad_of_up(mha)
    grads = []
    for be in BACKENDS:
        with backends.use(be):
            grads.append(grad_of_up(q))
    assert all(torch.equal(g, grads[0]) for g in grads)
    assert float((grads[0] - g_float).norm() / g_float.norm()) < 0.05


class _Adapted(nn.Module):
    """LoRA-style: a frozen int8 base plus a trainable low-rank adapter."""

    def __init__(self, base, k, n, rank=4):
        super().__init__()
        self.base = base
        self.down, self.up = nn.Linear(k, rank, bias=False), nn.Linear(rank, n, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("kind", ["dynamic", "dynamic_smoothed", "weight_only", "static"])
def test_adapter_over_int8_base_trains_in_training_mode(kind):
    """model.train() over a frozen int8 Linear (the LoRA use the docs advertise) raised
    "inference module; call .eval()"; the base computes as in eval mode: the same output,
    input gradient and adapter gradients."""
    m = _Adapted(_modules()[kind], 33, 17)
    x0 = torch.randn(2, 5, 33)

    def run():
        m.zero_grad()
        x = x0.clone().requires_grad_(True)
        y = m(x)
        y.pow(2).sum().backward()
        return y.detach(), x.grad, m.down.weight.grad.clone(), m.up.weight.grad.clone()
    want = run() if not m.eval().training else None
    got = run() if m.train().base.training else None
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got, want))


def test_no_grad_forward_builds_no_graph():
    m = _modules()["dynamic"]
    x = torch.randn(4, 33, requires_grad=True)
    with torch.no_grad():
        assert m(x).grad_fn is None
    assert m(x.detach()).grad_fn is None
    assert m(x).grad_fn is not None


# ------------------------------------------------------------- static path, non-finite rows

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN -> int cast
def test_static_act_linear_non_finite_rows_give_nan_on_every_backend():
    torch.manual_seed(2)
    lin = nn.Linear(37, 6)
    s = StaticActLinear.from_float_module(lin, act_absmax=3.0)
    x = torch.randn(5, 37)
    x[1, 5], x[2, 36], x[3, 0] = float("nan"), float("inf"), -float("inf")
    outs = {}
    for be in BACKENDS:
        with backends.use(be):
            xq, xs = s._quantize_static(x)
            outs[be] = (xq, xs, s(x), s(x.to(torch.bfloat16)))
    xq, xs, y, y16 = outs["numpy"]
    assert not bool(xq[1:4].any()) and bool(torch.isnan(xs[1:4]).all())
    assert bool(torch.isnan(y[1:4]).all()) and bool(torch.isnan(y16[1:4]).all())
    assert bool(torch.isfinite(y[[0, 4]]).all())
    for be, got in outs.items():  # exact, NaN where NaN (its sign and payload may differ)
        for a, b in zip(got, outs["numpy"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=be)


# --------------------------------------------------------------------------- dtype casts

@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_bf16"])
def test_module_casts_keep_int8_and_float32_buffers(cast):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16),
                          nn.MultiheadAttention(16, 2, batch_first=True))
    x = torch.randn(2, 3, 8)
    calib = calibrate_linear_inputs(model[:3], [x])
    variants = [quantize_dynamic(model, inplace=False),
                quantize_dynamic(model, inplace=False, weight_only=True),
                quantize_static_linear(model[:3], calib, inplace=False)]
    for q in variants:
        before = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
        c = copy.deepcopy(q)
        c = {"half": c.half, "bfloat16": c.bfloat16, "double": c.double,
             "to_bf16": lambda: c.to(torch.bfloat16)}[cast]()
        after = c.state_dict()
        for k, v in before.items():
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
        xd = x.to({"half": torch.float16, "double": torch.float32}.get(cast, torch.bfloat16))
        with torch.no_grad():
            assert torch.equal(_run(c, xd), _run(q, xd))


def _run(model, x):
    h = model[:3](x)
    return model[3](h, h, h)[0] if len(model) == 4 else h


# --------------------------------------------------------------------------- calibration

def test_calibration_skips_empty_batches():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    data = [torch.randn(4, 16), torch.randn(0, 16), torch.randn(2, 0, 16), torch.randn(3, 16)]
    got = calibrate_linear_inputs(model, data)
    want = calibrate_linear_inputs(model, [data[0], data[3]])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="no Linear ran on the calibration data"):
        calibrate_linear_inputs(model, [torch.randn(0, 16)])


# --------------------------------------------------------------------- conversion errors

def test_nan_weight_is_named_and_nothing_is_swapped():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)),
                      nn.MultiheadAttention(4, 2))
    with torch.no_grad():
        m[1][0].weight[2, 1] = float("nan")
    children = list(m.modules())
    for inplace in (False, True):
        with pytest.raises(ValueError, match=r"quantize_dynamic: 1\.0 \(Linear\): its weight "
                                             r"holds NaN or Inf"):
            quantize_dynamic(m, inplace=inplace)
        assert list(m.modules()) == children  # the same objects: nothing swapped
    m2 = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    with torch.no_grad():
        m2[1].out_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 \(MultiheadAttention\): its weight holds NaN"):
        quantize_dynamic(m2)
    assert type(m2[0]) is nn.Linear
    # excluded by filter_fn: the rest converts
    q = quantize_dynamic(m, inplace=False, filter_fn=lambda mod, n: n != "1.0")
    assert isinstance(q[0], DynamicLinear) and type(q[1][0]) is nn.Linear


def test_qat_conversion_and_static_scale_arguments_are_checked():
    """from_qat_module of a float Linear raised AttributeError ('act_dtype'); several
    values for the one static scale a reshape RuntimeError or 'only one element tensors'."""
    torch.manual_seed(24)
    lin = nn.Linear(4, 2)
    for cls in (DynamicLinear, WeightOnlyLinear):
        with pytest.raises(TypeError, match=rf"{cls.__name__}.from_qat_module needs a "
                                            r"gpuquant\.nn\.qat\.linear_dynamic\.DynamicLinear, "
                                            r"got torch\.nn\.modules\.linear\.Linear"):
            cls.from_qat_module(lin)
        assert isinstance(cls.from_qat_module(QATDynamicLinear.from_float_module(lin)), cls)
    with pytest.raises(ValueError, match=r"act_scale must be exactly one value .*got 2 values"):
        StaticActLinear(4, 2, act_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"act_absmax must be exactly one value .*got 3 values "
                                         r"\(shape \(3,\)\)"):
        StaticActLinear.from_float_module(lin, act_absmax=torch.ones(3))
    # 1e-40: a float32 subnormal, whose float32 reciprocal is inf (0.0 * inf = NaN, which
    # the backends quantized differently)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e-40, torch.tensor([0.0])):
        with pytest.raises(ValueError, match="act_scale must be finite and > 0"):
            StaticActLinear(4, 2, act_scale=bad)
    for bad in (-1.0, float("nan"), torch.tensor([float("inf")])):
        with pytest.raises(ValueError, match="act_absmax must be finite and >= 0"):
            StaticActLinear.from_float_module(lin, act_absmax=bad)
    with pytest.raises(TypeError, match="act_scale must be a number or a one-element tensor"):
        StaticActLinear(4, 2, act_scale="1.0")
    scale = torch.rand(1) + 0.5
    m = StaticActLinear(4, 2, act_scale=scale)
    scale.fill_(7.0)  # the module holds its own copy
    assert m.act_scale.shape == () and float(m.act_scale) < 2
    absmax = torch.rand(1, 1) * 3 + 1
    assert float(StaticActLinear.from_float_module(lin, act_absmax=absmax).act_scale) == float(
        StaticActLinear.from_float_module(lin, act_absmax=float(absmax)).act_scale)


def test_dtype_arguments_shared_by_every_entry_point():
    m = nn.Sequential(nn.Linear(4, 4))
    qat = prepare_dynamic_qat(m, dtype=torch.qint8, inplace=False)[0]
    ref = prepare_dynamic_qat(m, dtype=gpuquant.qint8, inplace=False)[0]
    assert isinstance(qat, QATDynamicLinear) and qat.act_dtype is gpuquant.qint8
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(qat(x), ref(x))
    assert quantize_dynamic(m, dtype="qint8_narrow", inplace=False)[0].act_dtype \
        is gpuquant.qint8_narrow
    s = quantize_static_linear(m, {"0": torch.ones(4)}, dtype=torch.qint8, inplace=False)[0]
    assert isinstance(s, StaticActLinear) and s.act_dtype is gpuquant.qint8
    for fn in (quantize_dynamic, prepare_dynamic_qat):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: dtype must be one of "
                                             r"\['qint8', 'qint8_narrow'\], got quint8"):
            fn(m, dtype=gpuquant.quint8, inplace=False)
        with pytest.raises(ValueError, match=rf"{fn.__name__}: weight_dtype must be one of "
                                             r"\['qint8_narrow', 'qint8'\], got qint4"):
            fn(m, weight_dtype=gpuquant.qint4, inplace=False)
        with pytest.raises(TypeError, match="torch.quint8"):
            fn(m, dtype=torch.quint8, inplace=False)
    with pytest.raises(ValueError, match=r"quantize_static_linear: dtype must be one of"):
        quantize_static_linear(m, {"0": torch.ones(4)}, dtype=gpuquant.quint8)
    # torch.qint8 everywhere a dynamic-path dtype is taken; refusals list only what is taken
    from gpuquant.functional import dynamic as FD
    from gpuquant.nn.qat.linear_dynamic import fake_quant_per_token
    x = torch.randn(3, 4)
    assert QATDynamicLinear(4, 4, act_dtype=torch.qint8).act_dtype is gpuquant.qint8
    assert QATDynamicLinear.from_float_module(nn.Linear(4, 4), act_dtype=torch.qint8).act_dtype \
        is gpuquant.qint8
    assert torch.equal(fake_quant_per_token(x, torch.qint8), fake_quant_per_token(x))
    assert all(torch.equal(a, b) for a, b in zip(FD.quantize_per_token(x, torch.qint8),
                                                 FD.quantize_per_token(x)))
    assert FD.max_in_features(torch.qint8) == FD.max_in_features(gpuquant.qint8)
    with pytest.raises(TypeError, match=r"must be one of \['qint8', 'qint8_narrow'\] \(a "
                                        r"gpuquant dtype, its name, or torch.qint8\), got "
                                        r"torch.quint8"):
        FD.quantize_per_token(x, torch.quint8)
    with pytest.raises(ValueError, match=r"must be one of \['qint8', 'qint8_narrow'\], got "
                                         r"'int3'"):
        QATDynamicLinear(4, 4, act_dtype="int3")


def test_mha_self_attention_batch_first_projects_once(monkeypatch):
    """Self-attention (query is key is value) takes the one packed in-projection GEMM with
    batch_first and unbatched inputs too (their transposed / unsqueezed views are new
    objects): one per-token quantization for the in-projection, not three."""
    import gpuquant.nn.quantized.linear_dynamic as LD
    calls = []
    real = LD.quantize_per_token

    def counting(x, *a, **k):
        calls.append(tuple(x.shape))
        return real(x, *a, **k)
    monkeypatch.setattr(LD, "quantize_per_token", counting)
    for batch_first, shape in ((True, (2, 5, 16)), (False, (5, 2, 16)), (True, (5, 16))):
        mha = nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
        q = quantize_dynamic(mha, inplace=False)
        x = torch.randn(*shape)
        with torch.no_grad():
            calls.clear()
            got = q(x, x, x, need_weights=False)[0]
            n_self = len(calls)
            calls.clear()
            want = q(x, x.clone(), x.clone(), need_weights=False)[0]  # three projections
            n_cross = len(calls)
        assert n_self == 2 and n_cross > n_self, (batch_first, shape, n_self, n_cross)
        assert torch.equal(got, want)


@pytest.mark.parametrize("weight_only", [False, True])
def test_mha_cross_attention_packs_its_projection_weights_once(weight_only, monkeypatch):
    """Cross-attention projects with row slices of the packed in-projection: the same view
    objects each call, so the NumPy backend's prepacked weights are reused (a new view each
    call repacked the weight on every call: 17x a 768-wide projection); an in-place edit of
    the weight is still seen."""
    import gpuquant.backends.numpy.dynamic as ND
    packs = []
    real_get = ND.common.WEIGHTS.get

    def counting_get(w, kind, build):
        return real_get(w, kind, lambda: packs.append(kind) or build())
    monkeypatch.setattr(ND.common.WEIGHTS, "get", counting_get)
    mha = nn.MultiheadAttention(16, 2).eval()
    q = DynamicMultiheadAttention.from_float_module(mha, weight_only=weight_only)
    x, mem = torch.randn(1, 2, 16), torch.randn(5, 2, 16)
    with backends.use("numpy"), torch.no_grad():
        first = q(x, mem, mem, need_weights=False)[0]
        n_first = len(packs)
        again = q(x, mem, mem, need_weights=False)[0]
        assert len(packs) == n_first > 0, (n_first, len(packs))
        assert torch.equal(first, again)
        q.in_proj.weight[16:32].neg_()  # the key rows, edited in place
        edited = q(x, mem, mem, need_weights=False)[0]
    assert not torch.equal(edited, first)
    fresh = copy.deepcopy(q)
    fresh.in_proj._fast.clear()
    with backends.use("numpy"), torch.no_grad():
        assert torch.equal(edited, fresh(x, mem, mem, need_weights=False)[0])


def test_linear_under_several_names_is_converted_once_and_stays_tied():
    """A Linear registered twice (tied encoder / decoder, ``ModuleList([lin] * 3)``) becomes
    one quantized module under every name, in each conversion entry point."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    q = quantize_dynamic(nn.ModuleList([lin] * 3), inplace=False)
    assert all(type(m) is DynamicLinear for m in q) and q[0] is q[1] is q[2]

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = self.enc

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))
    q = quantize_dynamic(Tied(), inplace=False)
    assert type(q.enc) is DynamicLinear and q.dec is q.enc
    p = prepare_dynamic_qat(nn.Sequential(lin, nn.ReLU(), lin), inplace=False)
    assert type(p[0]) is QATDynamicLinear and p[2] is p[0]
    m = Tied()
    x = torch.randn(4, 8)
    absmax = {"enc": x.abs().amax(0) + 1.0}
    s = smooth_quant(copy.deepcopy(m), absmax)
    assert s.dec is s.enc and type(s.enc) is SmoothedLinear
    st = quantize_static_linear(copy.deepcopy(m), absmax)
    assert type(st.enc) is StaticActLinear and st.dec is st.enc


@pytest.mark.parametrize("call,err,msg", [
    (lambda m, a: smooth_quant(m, a, filter_fn=3), TypeError, "filter_fn must be callable"),
    (lambda m, a: smooth_quant(m, a, fold="ln"), TypeError, "fold must be a dict"),
    (lambda m, a: smooth_quant(m, a, inplace=1), TypeError, "inplace must be a bool, got int"),
    (lambda m, a: smooth_quant(m, a, filter_fn=lambda mod, n: 1), TypeError,
     "filter_fn must return a bool"),
    (lambda m, a: quantize_static_linear(m, a, inplace=1), TypeError, "inplace must be a bool"),
    (lambda m, a: calibrate_linear_inputs(m, [torch.randn(2, 4)], filter_fn=3), TypeError,
     "calibrate_linear_inputs: filter_fn must be callable"),
])
def test_smoothquant_arguments_are_checked(call, err, msg):
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(err, match=msg):
        call(m, {"0": torch.ones(4)})


class _TiedHeadLM(nn.Module):
    """An embedding, a final LayerNorm and an LM head tied to the embedding (GPT-2 style)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.norm, self.lm_head = nn.LayerNorm(16), nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.emb.weight
        self.alias = self.fc  # one Linear under two names

    def forward(self, ids):
        return self.lm_head(self.norm(self.fc(self.emb(ids))))


def test_smooth_quant_fold_keeps_tied_weights_and_aliases_right():
    """Folding into a Linear whose weight is tied to an embedding scaled the embedding in
    place too (the model's function changed: 2.9 off on its logits); a Linear listed under
    two names of one group was scaled twice. Now the head takes its own scaled copy, the
    embedding keeps its values, and an aliased Linear is scaled once."""
    m = _TiedHeadLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    emb0 = m.emb.weight.detach().clone()
    with torch.no_grad():
        ref = m(ids)
    smooth_quant(m, calibrate_linear_inputs(m, [ids]), fold={"norm": ["lm_head"]})
    with torch.no_grad():
        out = m(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.emb.weight, emb0) and m.lm_head.weight is not m.emb.weight
    # one Linear under two names of a group: the same result as listed once
    m1 = _TiedHeadLM().eval()
    m1.ln_x = nn.LayerNorm(16)  # (a norm to fold into; the weights are compared directly)
    m2, w0 = copy.deepcopy(m1), m1.fc.weight.detach().clone()
    a = {"fc": torch.rand(16) + 0.5, "alias": torch.rand(16) + 0.5}
    smooth_quant(m1, a, fold={"ln_x": ["fc", "alias"]})
    smooth_quant(m2, {"fc": torch.maximum(a["fc"], a["alias"])}, fold={"ln_x": ["fc"]})
    assert torch.equal(m1.fc.weight, m2.fc.weight) and not torch.equal(m1.fc.weight, w0)
    assert torch.equal(m1.ln_x.weight, m2.ln_x.weight)


class _SharedNorm(nn.Module):
    """Two Linears reading one LayerNorm (a fold group)."""

    def __init__(self):
        super().__init__()
        self.ln, self.q, self.k = nn.LayerNorm(8), nn.Linear(8, 6), nn.Linear(8, 6)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 2.0)
            self.ln.bias.uniform_(-1.0, 1.0)

    def forward(self, x):
        h = self.ln(x)
        return self.q(h) + self.k(h)


def test_smooth_quant_fold_group_excluded_in_part_is_refused():
    """A Linear of a fold group that filter_fn excluded was rescaled anyway (its factor is
    folded into the shared norm): refused, naming the Linears and the norm, with the model
    unchanged; excluding the whole group leaves it (norm included) alone."""
    torch.manual_seed(25)
    m = _SharedNorm()
    x = torch.randn(4, 5, 8) * torch.linspace(0.2, 6.0, 8)
    absmax = calibrate_linear_inputs(m, [x])
    fold = {"ln": ["q", "k"]}
    before = copy.deepcopy(m.state_dict())

    def unchanged(model):
        return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"filter_fn excludes \['k'\] but keeps \['q'\] of "
                                         r"the Linears fed by 'ln'"):
        smooth_quant(m, absmax, fold=fold, filter_fn=lambda mod, n: n != "k")
    assert unchanged(m)
    s = smooth_quant(m, absmax, fold=fold, filter_fn=lambda mod, n: n not in ("q", "k"))
    assert s is m and unchanged(m) and type(m.q) is nn.Linear and type(m.k) is nn.Linear
    s = smooth_quant(copy.deepcopy(m), absmax, fold=fold)  # no filter: the group is folded
    assert not torch.equal(s.ln.weight, m.ln.weight) and type(s.k) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x), rtol=1e-4, atol=1e-4)


def test_qat_and_smoothed_encoder_layers_stay_off_torch_fast_path():
    """torch's fused encoder path (eval, no_grad) reads the Linears' weights directly: a
    dynamic-QAT layer ran float there, a smoothed one lost its 1/s input multiply."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(2, 6, 32) * torch.linspace(0.1, 10, 32)
    qat = prepare_dynamic_qat(copy.deepcopy(layer)).eval()
    with torch.no_grad():
        y_nograd, y_float = qat(x), layer(x)
    y_grad = qat(x).detach()
    assert not torch.equal(y_nograd, y_float)          # fake quant ran
    assert torch.allclose(y_nograd, y_grad, atol=1e-5)  # as in grad mode
    sm = smooth_quant(copy.deepcopy(layer), calibrate_linear_inputs(layer, [x]))
    with torch.no_grad():
        assert torch.allclose(sm(x), y_float, atol=1e-4)


def test_gpuquant_linear_without_activation_is_converted():
    import gpuquant.nn as gnn
    m = quantize_dynamic(nn.Sequential(gnn.Linear(8, 4), gnn.LinearRelu(8, 4)))
    assert type(m[0]) is DynamicLinear and type(m[1]) is gnn.LinearRelu  # fused ReLU: float
    p = prepare_dynamic_qat(nn.Sequential(gnn.Linear(8, 4)))
    assert type(p[0]) is QATDynamicLinear
    assert set(calibrate_linear_inputs(nn.Sequential(gnn.Linear(8, 4)), [torch.randn(2, 8)])) \
        == {"0"}


def test_qat_linear_under_autocast_matches_the_int8_module():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    qat = prepare_dynamic_qat(copy.deepcopy(lin)).eval()
    q = quantize_dynamic(copy.deepcopy(qat))
    x = torch.randn(4, 64)
    with torch.no_grad():
        a = q(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = qat(x)
    assert torch.equal(a, b)  # under autocast the QAT forward is the int8 computation


def test_smooth_quant_fp16_with_extreme_factors_stays_finite():
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).half()
    with torch.no_grad():
        m[1].weight[:, 3] = 1e-6
    x = torch.randn(16, 8).half()
    ax = calibrate_linear_inputs(m, [x])
    for fold in (None, {"0": ["1"]}):
        assert torch.isfinite(smooth_quant(copy.deepcopy(m), ax, alpha=0.0, fold=fold)(x)).all()


def test_linear_subclass_named_alone_selects_only_it():
    class MyLinear(nn.Linear):
        pass
    m = nn.ModuleDict(dict(mine=MyLinear(8, 8), plain=nn.Linear(8, 8),
                           attn=nn.MultiheadAttention(8, 2)))
    quantize_dynamic(m, modules=(MyLinear,))
    assert type(m["mine"]) is DynamicLinear and type(m["plain"]) is nn.Linear
    assert type(m["attn"]) is nn.MultiheadAttention


def test_prepare_dynamic_qat_names_the_module_that_could_overflow():
    with pytest.raises(ValueError, match="prepare_dynamic_qat: 0: .*in_features=200000"):
        prepare_dynamic_qat(nn.Sequential(nn.Linear(200000, 2)))


def test_reference_weight_only_ignores_autocast():
    torch.manual_seed(0)
    q = quantize_dynamic(nn.Linear(64, 32), weight_only=True)
    x = torch.randn(4, 64)
    with backends.use("reference"), torch.no_grad():
        y0 = q(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y1 = q(x)
    assert torch.equal(y0, y1)


def test_filter_fn_may_answer_with_numpy_or_torch_bools():
    import numpy as np
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ax = calibrate_linear_inputs(m, [torch.randn(2, 4)], filter_fn=lambda mod, n: np.bool_(True))
    assert set(ax) == {"0", "1"}
    q = quantize_dynamic(copy.deepcopy(m), filter_fn=lambda mod, n: torch.tensor(n == "0"))
    assert type(q[0]) is DynamicLinear and type(q[1]) is nn.Linear
    with pytest.raises(TypeError, match="filter_fn must return a bool, returned builtins.str"):
        quantize_dynamic(copy.deepcopy(m), filter_fn=lambda mod, n: "yes")


@pytest.mark.parametrize("weight_only", [False, True])
def test_model_wide_fake_quant_switches_reach_dynamic_qat_linears(weight_only):
    """Found by review: gpuquant.quantization.disable_fake_quant(model) on a
    prepare_dynamic_qat model changed nothing (it only looked for FakeQuantBase modules, and
    the dynamic QAT Linear holds its own switch): the model kept fake-quantizing, silently."""
    from gpuquant.quantization import disable_fake_quant, enable_fake_quant
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    qat = prepare_dynamic_qat(copy.deepcopy(float_model), weight_only=weight_only)
    x = torch.randn(3, 16)
    y_fq = qat(x)
    assert not torch.equal(y_fq, float_model(x))
    assert disable_fake_quant(qat) is qat
    assert torch.equal(qat(x), float_model(x))
    assert enable_fake_quant(qat) is qat
    assert torch.equal(qat(x), y_fq)


def test_disable_quantize_on_the_root_keeps_it_float():
    """``disable_quantize()`` on the model passed in keeps it float, as it does on the same
    module under a parent: a root gpuquant.nn.Linear was converted, and a disabled root
    container had its torch.nn.Linear children converted (they carry no flag of their own)."""
    class Net(gpuquant.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.g = gpuquant.nn.Linear(8, 8)

        def forward(self, x):
            return self.g(self.fc(x))
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for convert in (quantize_dynamic, prepare_dynamic_qat,
                    lambda m, **kw: quantize_dynamic(m, weight_only=True, **kw)):
        net = Net().disable_quantize()
        nested = convert(nn.Sequential(net), inplace=False)[0]  # under a parent: float
        assert type(nested.fc) is nn.Linear and type(nested.g) is gpuquant.nn.Linear
        root = convert(net, inplace=False)
        assert type(root) is Net
        assert type(root.fc) is nn.Linear and type(root.g) is gpuquant.nn.Linear
        assert torch.equal(root(x), net(x))
        assert convert(net) is net and type(net.fc) is nn.Linear  # inplace
        lin = gpuquant.nn.Linear(8, 8).disable_quantize()
        assert type(convert(lin, inplace=False)) is gpuquant.nn.Linear
        assert convert(lin) is lin


@pytest.mark.parametrize("fold", [False, True])
def test_smooth_quant_again_balances_what_the_weight_sees(fold):
    """Smoothing an already smoothed Linear takes its factors from the input its weight
    multiplies (the recorded input times its ``input_smoothing``), as quantize_static_linear
    reads it: at alpha 0.5 the first pass leaves max|x'_j| = max|W'_j|, so a second pass
    keeps that balance (factors of 1). It used the raw recorded input and moved the
    outliers into the weight again (a column's max went 2.7 -> 11.9)."""
    torch.manual_seed(0)
    k = 16
    outliers = torch.ones(k)
    outliers[torch.randperm(k)[:3]] = torch.rand(3) * 30 + 10
    data = [torch.randn(32, k) * outliers for _ in range(2)]
    m = nn.Sequential(nn.LayerNorm(k), nn.Linear(k, 8)) if fold else nn.Sequential(
        nn.Linear(k, 8))
    with torch.no_grad():
        if fold:  # a LayerNorm feeding outliers: its affine weight carries them
            m[0].weight.copy_(outliers * (1 + torch.rand(k)))
            m[0].bias.copy_(torch.randn(k))
    x = torch.cat(data)
    ref = m(x)
    lin_name = "1" if fold else "0"
    smooth_quant(m, calibrate_linear_inputs(m, data), alpha=0.5)  # -> SmoothedLinear
    assert type(m[-1]) is SmoothedLinear

    def balance(m):
        lin = m[-1]
        seen = ((m[0](x) if fold else x) * lin.input_smoothing).abs().amax(0)
        return seen, lin.weight.detach().abs().amax(0)
    seen, wmax = balance(m)
    torch.testing.assert_close(seen, wmax, rtol=1e-5, atol=0)
    again = calibrate_linear_inputs(m, data)
    smooth_quant(m, again, alpha=0.5, fold={"0": [lin_name]} if fold else None)
    seen2, wmax2 = balance(m)
    torch.testing.assert_close(seen2, seen, rtol=1e-5, atol=0)
    torch.testing.assert_close(wmax2, wmax, rtol=1e-5, atol=0)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


def test_smooth_quant_fold_refuses_parametrized_modules():
    """A fold group's norm and Linears must hold their tensors: a parametrized Linear
    (``weight_norm``) computes a new weight tensor at every read, so the folded factor was
    written into a temporary while the norm was divided by it (the model's output moved by
    0.67). Refused before any change; outside fold (a SmoothedLinear) it smooths as before."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    x = torch.randn(6, 8) * (torch.rand(8) * 10)
    for wn in ("lin", "norm"):
        m = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
        weight_norm(m[1] if wn == "lin" else m[0])
        ref = m(x)
        before = copy.deepcopy(m.state_dict())
        absmax = calibrate_linear_inputs(m, [x])
        with pytest.raises(ValueError, match=f"{'1' if wn == 'lin' else '0'}.*parametriz"):
            smooth_quant(m, absmax, fold={"0": ["1"]})
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
        assert torch.equal(m(x), ref)
        s = smooth_quant(m, absmax, inplace=False)  # not folded: a SmoothedLinear
        assert type(s[1]) is SmoothedLinear and not parametrize.is_parametrized(s[1])
        torch.testing.assert_close(s(x), ref, rtol=1e-5, atol=1e-5)


def test_prepare_dynamic_qat_leaves_parametrized_linears_float(caplog):
    """The QAT Linear shares its float Linear's parameters; a parametrized Linear's weight
    is computed at each read, so the QAT module held a frozen plain tensor (no parameter,
    not in state_dict, never trained). Such a Linear stays float (logged) and
    ``from_float_module`` refuses it; quantize_dynamic still converts it."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    m = nn.Sequential(weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 8)
    names = {n for n, _ in m.named_parameters()}
    with caplog.at_level("WARNING", logger="gpuquant.quantization"):
        p = prepare_dynamic_qat(m, inplace=False)
    assert "0 (ParametrizedLinear) stays float" in caplog.text
    assert type(p[2]) is QATDynamicLinear and type(p[0]).__name__ == "ParametrizedLinear"
    assert {n for n, _ in p.named_parameters()} == names
    assert set(p.state_dict()) == set(m.state_dict())
    p(x).sum().backward()
    assert all(t.grad is not None for t in p.parameters())
    with pytest.raises(ValueError, match="parametrized"):
        QATDynamicLinear.from_float_module(m[0])
    q = quantize_dynamic(p, inplace=False)
    assert type(q[0]) is DynamicLinear and type(q[2]) is DynamicLinear
    ref = quantize_dynamic(m, inplace=False)
    with torch.no_grad():
        assert torch.equal(q[0](x), ref[0](x))


def test_multihead_attention_subclass_with_its_own_forward_stays_float(caplog):
    """A MultiheadAttention subclass whose forward adds something (here a scale) was
    replaced by DynamicMultiheadAttention, which computes torch's forward: the subclass's
    own computation was dropped silently (its output halved). It stays float, logged, as
    Linear subclasses with their own forward do; a subclass keeping torch's forward is
    converted."""
    class ScaledMHA(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            out, w = super().forward(query, key, value, **kwargs)
            return out * 2.0, w

    class PlainSubclass(nn.MultiheadAttention):
        pass
    torch.manual_seed(0)
    m = nn.ModuleDict(dict(scaled=ScaledMHA(16, 2), plain=PlainSubclass(16, 2))).eval()
    x = torch.randn(5, 3, 16)
    with caplog.at_level("WARNING", logger="gpuquant.quantization"):
        q = quantize_dynamic(m, inplace=False)
    assert type(q["scaled"]) is ScaledMHA and "scaled (MultiheadAttention) stays float" in \
        caplog.text and "ScaledMHA" in caplog.text
    assert type(q["scaled"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        assert torch.equal(q["scaled"](x, x, x)[0], m["scaled"](x, x, x)[0])
    assert type(q["plain"]) is DynamicMultiheadAttention
    assert DynamicMultiheadAttention.supports(m["plain"]) is None
    with pytest.raises(ValueError, match="its forward"):
        DynamicMultiheadAttention.from_float_module(m["scaled"])
