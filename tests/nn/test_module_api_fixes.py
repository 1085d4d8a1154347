"""Module-flow edges found by probing: two QuantStubs on slices of one input, a module under
two names of one parent, conversion errors naming the module, MaxPool2d(return_indices)."""
import copy

import pytest
import torch

import gpuquant.nn as gnn
from gpuquant.quantization import (calibration_qconfig, disable_fake_quant,
                                   ema_fakequant_qconfig, enable_fake_quant, quantize,
                                   quantize_qat)


class TwoStubs(gnn.Module):
    def __init__(self):
        super().__init__()
        self.q_rgb, self.q_depth = gnn.QuantStub(), gnn.QuantStub()
        self.c_rgb = gnn.Conv2d(3, 4, 3, padding=1)
        self.c_depth = gnn.Conv2d(1, 4, 3, padding=1)
        self.dq1, self.dq2 = gnn.DequantStub(), gnn.DequantStub()

    def forward(self, x):
        a, b = self.q_rgb(x[:, :3]), self.q_depth(x[:, 3:])
        return self.dq1(self.c_rgb(a)), self.dq2(self.c_depth(b))


def _data(n):
    x = torch.rand(n, 4, 8, 8)
    x[:, 3:] *= 100.0  # a depth channel beside RGB
    return x


def test_stubs_on_slices_of_one_input_keep_their_own_qparams():
    torch.manual_seed(0)
    m = quantize_qat(TwoStubs().eval(), calibration_qconfig)  # no fake quant
    with torch.no_grad():
        for _ in range(3):
            m(_data(8))
    i = quantize(m, inplace=False)
    assert torch.equal(i.c_rgb.input_scale.reshape(()),
                       m.q_rgb.get_activation_qparams().scale.reshape(()))
    assert torch.equal(i.c_depth.input_scale.reshape(()),
                       m.q_depth.get_activation_qparams().scale.reshape(()))
    # the usual warm-up recipe (fake quant off, then on) converts too
    m = quantize_qat(TwoStubs(), ema_fakequant_qconfig)
    disable_fake_quant(m)
    m(_data(8))
    enable_fake_quant(m)
    m(_data(8))
    quantize(m.eval())


def test_module_under_two_names_of_one_parent_is_converted_under_both():
    class Alias(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.dq = gnn.QuantStub(), gnn.DequantStub()
            self.a = gnn.Linear(4, 4)
            self.b = self.a

        def forward(self, x):
            return self.dq(self.b(self.a(self.q(x))))
    m = quantize_qat(Alias(), ema_fakequant_qconfig)
    assert m.a is m.b and type(m.a).__module__.startswith("gpuquant.nn.qat")
    m(torch.randn(3, 4))
    with pytest.raises(ValueError, match="comes from 2 producers"):  # two call sites
        quantize(m.eval(), inplace=False)


def test_conversion_errors_name_the_module():
    seq = torch.nn.Sequential(gnn.QuantStub(), torch.nn.Sequential(
        gnn.ConvBnRelu2d(3, 3, 3, padding=1)), gnn.DequantStub())
    seq[1][0].bn.track_running_stats = False
    seq[1][0].bn.running_mean = seq[1][0].bn.running_var = None
    with pytest.raises(ValueError, match=r"module '1\.0' \(ConvBnRelu2d\).*disable_quantize"):
        quantize_qat(seq, ema_fakequant_qconfig)
    pool = torch.nn.Sequential(gnn.QuantStub(), gnn.MaxPool2d(2, return_indices=True))
    with pytest.raises(ValueError, match=r"module '1' \(MaxPool2d\).*return_indices"):
        quantize_qat(pool, ema_fakequant_qconfig)


def test_per_channel_activation_qconfig_refused_before_training():
    """The integer ops (and the QAT pooling) take one activation scale: a per-channel
    activation observer is refused at quantize_qat, naming the module, not after a run."""
    from functools import partial

    from gpuquant.quantization import MinMaxObserver
    qc = ema_fakequant_qconfig._replace(act_observer=partial(MinMaxObserver, axis=1))
    m = torch.nn.Sequential(gnn.QuantStub(), gnn.Conv2d(3, 8, 3), gnn.AvgPool2d(2),
                            gnn.DequantStub())
    with pytest.raises(ValueError, match=r"module '0' \(QuantStub\).*per channel \(axis=1\)"):
        quantize_qat(m, qc)


def test_accumulator_overflow_refused_at_conversion():
    """K, max|w| and the bias are known at conversion: a layer whose int32 accumulator could
    overflow is refused by quantize(), not at the first inference."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(gnn.QuantStub(), gnn.Linear(140000, 2), gnn.DequantStub())
    q = quantize_qat(m, ema_fakequant_qconfig)
    q(torch.randn(2, 140000))
    with pytest.raises(ValueError, match=r"module '1' \(Linear\).*int32 accumulator could "
                                         r"overflow.*at most k=132103"):
        quantize(q.eval(), inplace=False)


def test_load_state_dict_under_inference_mode_reaches_the_backends():
    """A quantized model made under torch.inference_mode has inference-tensor buffers (no
    version counter); load_state_dict writes them in place, and the NumPy backend's packed
    weights, keyed on identity and storage, kept the old weights' bytes. The load now gives
    them new storage (found by review of the cupy weight cache)."""
    import copy
    from gpuquant import backends
    from gpuquant.quantization import ema_fakequant_qconfig, quantize, quantize_qat

    def make(seed):
        torch.manual_seed(seed)
        m = quantize_qat(torch.nn.Sequential(gnn.QuantStub(), gnn.Linear(16, 8),
                                             gnn.DequantStub()), ema_fakequant_qconfig)
        m(torch.randn(32, 16))
        return quantize(m.eval())
    q, other = make(0), make(1)
    x = torch.randn(4, 16)
    with backends.use("numpy"), torch.inference_mode():
        served = copy.deepcopy(q)
        assert served[1].weight.is_inference()
        served(x)  # packs the first weights
        served.load_state_dict(other.state_dict())
        assert torch.equal(served(x), other(x))


@pytest.mark.parametrize("build,kind,match", [
    (lambda: gnn.Linear(-1, 3), ValueError, "Linear: in_features must be an int >= 1, got -1"),
    (lambda: gnn.LinearRelu(4, 0), ValueError, "out_features must be an int >= 1, got 0"),
    (lambda: gnn.LinearBn1d(3.5, 2), TypeError, "in_features must be an int >= 1, got float"),
    (lambda: gnn.LinearBnRelu1d(3, -3), ValueError, "out_features"),
    (lambda: gnn.Conv2d(3, 4, 3, stride=0), ValueError, "Conv2d: stride must be an int >= 1"),
    (lambda: gnn.ConvRelu2d(3, 4, 3, padding=-1), ValueError, "padding must be an int >= 0"),
    (lambda: gnn.ConvRelu62d(3, 4, 3, dilation=(1, 0)), ValueError, "dilation"),
    (lambda: gnn.Conv2d(3, 4, (3, -1)), ValueError, "kernel_size must be an int >= 1"),
    (lambda: gnn.Conv2d(3, 4, (3, 3, 3)), ValueError, "kernel_size must be an int or a pair"),
    (lambda: gnn.ConvBn2d(-3, 3, 3), ValueError, "ConvBn2d: in_channels must be an int >= 1"),
    (lambda: gnn.ConvBnRelu2d(3, 4, 3, groups=3), ValueError, "divisible by groups"),
    (lambda: gnn.ConvBnRelu62d(3, 4, 3, stride="2"), TypeError, "stride must be an int"),
    (lambda: gnn.Conv2d(3, 4, 3, padding="bad"), ValueError, "padding"),
    (lambda: gnn.MaxPool2d(0), ValueError, "MaxPool2d: kernel_size must be an int >= 1"),
    (lambda: gnn.MaxPool2d(3, stride=0), ValueError, "stride must be an int >= 1"),
    (lambda: gnn.MaxPool2d(3, 2, padding=2), ValueError, "at most half"),
    (lambda: gnn.AvgPool2d(2, padding=-1), ValueError, "padding must be an int >= 0"),
    (lambda: gnn.AvgPool2d(2, divisor_override=0), ValueError, "divisor_override"),
    (lambda: gnn.AdaptiveAvgPool2d(-1), ValueError, "output_size must be an int >= 1"),
    (lambda: gnn.AdaptiveAvgPool2d((1, 2, 3)), ValueError, "an int or a pair"),
])
def test_float_layers_refuse_bad_geometry_at_construction(build, kind, match):
    """torch's constructors make a negative count a RuntimeError and take a zero or negative
    stride, dilation, padding or window until the first forward (or until conversion, where
    the int8 layer refuses it): gpuquant's layers refuse them where they are written."""
    with pytest.raises(kind, match=match):
        build()


def test_float_layers_take_what_torch_takes():
    """The forms torch takes still build, with torch's attributes (padding strings kept)."""
    c = gnn.Conv2d(3, 6, (3, 1), (1, 2), "valid", 1, 3, bias=False)
    assert c.padding == "valid" and c.kernel_size == (3, 1) and c.bias is None
    assert gnn.Conv2d(4, 4, 3, padding="same", dilation=2).padding == "same"
    assert gnn.ConvBnRelu2d(4, 8, 1, groups=2).conv.groups == 2
    assert gnn.MaxPool2d((3, 2), None, (1, 1), 1, False, True).stride == (3, 2)
    assert gnn.AvgPool2d(3, 2, 1, True, False, 7).divisor_override == 7
    assert gnn.AdaptiveAvgPool2d((None, 3)).output_size == (None, 3)
    assert gnn.Linear(5, 2, device="cpu", dtype=torch.float64).weight.dtype == torch.float64


def test_dequant_output_follows_the_models_floating_cast():
    """An int8 model cast with .half() / .to(bfloat16) kept DequantStub's float32 output: a
    float part after it (cast too) failed on the mixed dtypes ('expect parameter to have
    scalar type of Float'), and a fully quantized model answered float32 where the QAT one
    answers the cast dtype. The output now takes the cast dtype: the float32 value rounded
    once; the fused conv + dequant the same; state_dict unchanged."""
    from gpuquant.quantization import ema_fakequant_qconfig, fuse_epilogues, quantize, quantize_qat

    class Net(gnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.c, self.dq = gnn.QuantStub(), gnn.ConvRelu2d(3, 4, 3), gnn.DequantStub()
            self.norm = torch.nn.LayerNorm(6)  # a float part after the int8 one

        def forward(self, x):
            return self.norm(self.dq(self.c(self.q(x))))

    torch.manual_seed(0)
    qat = quantize_qat(Net(), ema_fakequant_qconfig)
    qat(torch.randn(2, 3, 8, 8))
    int8 = quantize(qat.eval())
    keys = set(int8.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = int8.dq(int8.c(int8.q(x)))
        for dt in (torch.bfloat16, torch.float16):
            m = copy.deepcopy(int8).to(dt)
            assert set(m.state_dict()) == keys and m.dq.input_scale.dtype == torch.float32
            assert torch.equal(m.dq(m.c(m.q(x))), want.to(dt))
            if dt == torch.bfloat16:  # (LayerNorm has no float16 CPU kernel)
                assert m(x.to(dt)).dtype == dt
    # cast before conversion, and through save / load (a first version lost the dtype in
    # both: found by review)
    cast_first = copy.deepcopy(qat).to(torch.bfloat16)
    q = quantize(cast_first)
    assert q.dq.out_dtype() == torch.bfloat16
    with torch.no_grad():
        assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    import gpuquant
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        gpuquant.save(q, f"{d}/m.safetensors")
        loaded = gpuquant.load(f"{d}/m.safetensors", model=Net().to(torch.bfloat16))
        assert loaded.dq.out_dtype() == torch.bfloat16
        gpuquant.save(int8, f"{d}/f32.safetensors")
        assert gpuquant.load(f"{d}/f32.safetensors", model=Net()).dq.out_dtype() == \
            torch.float32
    with pytest.raises(ValueError, match="out_dtype 'int8' is not one of"):
        q.dq.set_extra_state({"dtypes": {"input": "qint8"}, "out_dtype": "int8"})
    bare = copy.deepcopy(int8)
    bare.norm = torch.nn.Identity()
    fused = fuse_epilogues(copy.deepcopy(bare))  # conv + dequant: one ConvDequant
    assert any(type(m).__name__ == "ConvDequant" for m in fused.modules())
    with torch.no_grad():
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(copy.deepcopy(fused).to(dt)(x), want.to(dt))
