"""Drop-in conversion of nearest-neighbour resizes into ``gpuquant.nn.Upsample``: ``nn.Upsample``
/ ``nn.UpsamplingNearest2d`` modules and ``F.interpolate`` (``F.upsample``,
``F.upsample_nearest``) calls in a U-Net / FPN-like model, float bit for bit, QAT and int8;
what stays float (interpolating modes, align_corners, a size computed from another tensor's
shape, other ranks) with the reason; hooks, disabled modules, call sites, and the rule
without ``example_inputs``."""
import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpuquant
import gpuquant.backends as backends
import gpuquant.nn as gnn
from gpuquant.quantization import quantize, quantize_qat
from gpuquant.quantization.fx import DropInWarning, disable_quantize, prepare_plain

from tests.dropin.dropin_helpers import INT8_BACKEND, int8_against_qat, qat_step


def convert(fn, *args, **kw):
    """(``fn(*args, **kw)``, the messages of the DropInWarnings it gave)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in rec if issubclass(w.category, DropInWarning)]


def upsamples(model):
    """name -> (size, scale_factor, mode) of every float, QAT or int8 Upsample in ``model``."""
    return {n: (m.size, m.scale_factor, m.mode) for n, m in model.named_modules()
            if type(m).__name__ == "Upsample" and type(m).__module__.startswith("gpuquant.nn")}


def float_identical(model, x, example=True):
    """prepare_plain(model) computes what ``model`` does, bit for bit, in eval and train."""
    ref = copy.deepcopy(model)
    gm, warned = convert(prepare_plain, model, (x,) if example else None)
    for train in (False, True):
        gm.train(train), ref.train(train)
        with torch.no_grad():
            assert torch.equal(gm(x), ref(x)), f"train={train}"
    return gm, warned


def qat_and_int8(model, x, target, steps=3):
    """quantize_qat (no DropInWarning), a few QAT steps, quantize: every int8 module within 1
    step of its QAT module, the output within the usual bound. Returns the int8 model."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropInWarning)
        qat = quantize_qat(model, example_inputs=(x,))
    for step in range(steps):
        qat_step(qat, x, (target + step) % 4, seed=step)
    int8, cap = int8_against_qat(qat, x)
    assert any(type(qat.get_submodule(n)).__name__ == "Upsample" for n in cap)
    return int8


class UNet(nn.Module):
    """Strided convs down, nearest resizes up (module, UpsamplingNearest2d, F.interpolate),
    skip connections by torch.cat, a nearest-exact resize to a fixed size, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.up_n = nn.UpsamplingNearest2d(scale_factor=2)
        self.fuse1 = nn.Conv2d(48, 16, 1)
        self.fuse2 = nn.Conv2d(24, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))                              # 8 x 8
        d1 = F.relu(self.down1(s))                                     # 4 x 4
        d2 = F.relu(self.down2(d1))                                    # 2 x 2
        u = F.relu(self.fuse1(torch.cat([d1, self.up(d2), self.up_n(d2)], 1)))
        u = torch.cat([s, F.interpolate(u, scale_factor=2, mode="nearest")], 1)
        y = F.relu(self.fuse2(u))
        y = F.interpolate(y, size=(5, 7), mode="nearest-exact")       # 8x8 -> 5x7
        return self.head(y.mean((2, 3)))


UNET_UPSAMPLES = {"up": (None, 2.0, "nearest"), "up_n": (None, 2.0, "nearest"),
                  "upsample": (None, 2.0, "nearest"),
                  "upsample_1": ((5, 7), None, "nearest-exact")}


def test_unet_swapped_float_identical_qat_int8(tmp_path):
    torch.manual_seed(0)
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    gm, warned = float_identical(UNet(), x)
    assert not warned, warned
    assert upsamples(gm) == UNET_UPSAMPLES
    assert type(gm.up) is gnn.Upsample and type(gm.up_n) is gnn.Upsample
    assert not any(n.op == "call_function" and n.target is F.interpolate
                   for n in gm.graph.nodes)
    int8 = qat_and_int8(UNet(), x, target)
    assert upsamples(int8) == UNET_UPSAMPLES
    assert all(type(int8.get_submodule(n)) is gnn.quantized.Upsample
               for n in UNET_UPSAMPLES)
    gpuquant.save(int8, tmp_path / "unet.pt")
    back = gpuquant.load(tmp_path / "unet.pt", model=prepare_plain(UNet(), (x,)))
    with backends.use(INT8_BACKEND), torch.no_grad():
        assert torch.equal(back(x), int8(x))


def test_without_example_inputs_by_the_producing_op_or_a_pair():
    """No shapes: an Upsample after a conv (through concat / activations) or with a (h, w)
    pair is swapped; one on a value of unknown rank (the model's input) stays float."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    gm, warned = float_identical(UNet(), x, example=False)
    assert not warned, warned
    assert upsamples(gm) == UNET_UPSAMPLES
    qat = quantize_qat(UNet())
    qat_step(qat, x, torch.tensor([0, 1]), seed=0)
    int8 = quantize(qat.eval())
    assert upsamples(int8) == UNET_UPSAMPLES
    with backends.use(INT8_BACKEND), torch.no_grad():
        assert int8(x).shape == (2, 4)

    class OnInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            a = self.conv(self.up(x))
            b = self.conv(F.interpolate(x, scale_factor=(2, 2)))
            return a + b + self.conv(F.interpolate(x, size=(16, 16)))

    gm, warned = float_identical(OnInput(), x, example=False)
    assert sorted(upsamples(gm).values(), key=repr) == [((16, 16), None, "nearest"),
                                                        (None, (2.0, 2.0), "nearest")]
    assert type(gm.up) is nn.Upsample
    assert len(warned) == 1 and "1 part(s)" in warned[0]
    assert "module 'up' (Upsample: the input's rank is unknown without example_inputs" in \
        warned[0]
    gm, warned = float_identical(OnInput(), x)  # with them: all three
    assert not warned and len(upsamples(gm)) == 3


class Forms(nn.Module):
    """Argument forms: positional, keyword, int / pair sizes and factors, fractional and
    downscaling factors, recompute_scale_factor, F.upsample / F.upsample_nearest."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)                                          # 7 x 7
        parts = [F.interpolate(y, None, 2.0, "nearest"),
                 F.interpolate(y, 14),
                 F.interpolate(y, size=(14, 14), mode="nearest-exact"),
                 F.interpolate(y, scale_factor=(2.0, 2.1)),
                 F.interpolate(y, scale_factor=2.05, mode="nearest-exact",
                               recompute_scale_factor=True),
                 F.interpolate(y, scale_factor=2.05, mode="nearest-exact"),
                 F.upsample(y, scale_factor=2),
                 F.upsample_nearest(y, size=(14, 14)),
                 nn.functional.interpolate(input=y, scale_factor=2, mode="nearest",
                                           align_corners=None, antialias=False)]
        total = parts[0]
        for p in parts[1:]:
            total = total + p[..., :14, :14]
        down = F.interpolate(y, scale_factor=0.5)                 # 3 x 3
        return self.out(total).mean((2, 3)) + self.out(down).mean((2, 3))


def test_argument_forms_swapped_float_identical_int8():
    torch.manual_seed(2)
    x, target = torch.randn(4, 3, 7, 7), torch.tensor([0, 1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (F.upsample* are deprecated)
        gm, warned = float_identical(Forms(), x)
        assert not warned, warned
        assert sorted(map(repr, upsamples(gm).values())) == sorted(map(repr, [
            (None, 2.0, "nearest"), (14, None, "nearest"), ((14, 14), None, "nearest-exact"),
            (None, (2.0, 2.1), "nearest"), (None, 2.05, "nearest-exact"),
            (None, 2.05, "nearest-exact"), (None, 2.0, "nearest"), ((14, 14), None, "nearest"),
            (None, 2.0, "nearest"), (None, 0.5, "nearest")]))
        assert [m.recompute_scale_factor for m in gm.modules()
                if isinstance(m, gnn.Upsample)].count(True) == 1
        qat_and_int8(Forms(), x, target, steps=2)


class StaysFloat(nn.Module):
    """Resizes with no int8 form: interpolating modes, align_corners, antialias, a size from
    another tensor's shape (the FPN idiom), a size from this tensor's shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)       # 4 x 4
        self.bilinear = nn.Upsample(scale_factor=2, mode="bilinear")
        self.bilinear2d = nn.UpsamplingBilinear2d(scale_factor=2)

    def forward(self, x):
        p = self.conv(x)
        a = self.bilinear(p) + self.bilinear2d(p)
        a = a + F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=True)
        a = a + F.interpolate(p, scale_factor=2, mode="bicubic", antialias=True)
        a = a + F.interpolate(p, size=x.shape[-2:])                # FPN: c's size
        h, w = p.shape[2:]
        a = a + F.interpolate(p, size=(2 * h, 2 * w))
        return a + F.interpolate(a, scale_factor=0.5, mode="area").repeat(1, 1, 2, 2)


def test_other_resizes_stay_float_with_the_reason():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    gm, warned = float_identical(StaysFloat(), x)
    assert upsamples(gm) == {}
    assert type(gm.bilinear) is nn.Upsample
    assert type(gm.bilinear2d) is nn.UpsamplingBilinear2d
    assert len(warned) == 1
    msg = warned[0]
    assert "8 part(s)" in msg   # the seven resizes, .repeat
    assert "module 'bilinear' (Upsample: mode='bilinear' interpolates: the int8 Upsample " \
        "copies codes, modes 'nearest' and 'nearest-exact' only)" in msg
    assert "module 'bilinear2d' (UpsamplingBilinear2d: mode='bilinear', align_corners=True " \
        "interpolates" in msg
    assert "F.interpolate in '<root>' (mode='bilinear', align_corners=True interpolates" in msg
    assert "F.interpolate in '<root>' (mode='bicubic' interpolates" in msg
    assert "F.interpolate in '<root>' (mode='area' interpolates" in msg
    traced = ("F.interpolate in '<root>' (size is computed in forward (e.g. from another "
              "tensor's .shape): the int8 Upsample takes a constant size, and fixing the "
              "traced one would tie the model to the example's input size; use a constant "
              "scale_factor, or accept it float)")
    assert msg.count(traced) == 2


def test_other_ranks_and_arguments_stay_float():
    class Ranks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            y = self.conv(x)
            z = self.up(y.unsqueeze(2))                                # 5-D
            w = F.interpolate(y.flatten(2), scale_factor=2)            # 3-D: a 1-D resize
            return z.sum(2) + w.sum() + F.interpolate(y, scale_factor=y.size(2) / 2)

    x = torch.randn(2, 3, 4, 4)
    gm, warned = float_identical(Ranks(), x)
    assert upsamples(gm) == {}
    assert len(warned) == 1
    assert "module 'up' (Upsample: a 5-D input (2, 4, 1, 4, 4): the int8 Upsample takes " \
        "4-D (N, C, H, W))" in warned[0]
    assert "F.interpolate in '<root>' (a 3-D input (2, 4, 16): the int8 Upsample" in warned[0]
    assert "F.interpolate in '<root>' (scale_factor is a traced value, the int8 Upsample " \
        "takes a constant)" in warned[0]


class Special(nn.Module):
    def __init__(self, up):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.up = up
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.out(self.up(self.conv(x)))


class MyUpsample(nn.Upsample):
    """Keeps the forward: traced into like any user module, its F.interpolate swapped."""


def test_hooked_subclassed_and_disabled_modules_stay_as_they_are():
    x = torch.randn(2, 3, 4, 4)
    hooked = nn.Upsample(scale_factor=2)
    hooked.register_forward_pre_hook(lambda m, i: None)
    gm, warned = float_identical(Special(hooked), x)
    assert gm.up is hooked and upsamples(gm) == {}
    assert len(warned) == 1 and "module 'up' (Upsample: carries forward pre-hooks" in warned[0]

    gm, warned = float_identical(Special(MyUpsample(scale_factor=2)), x)
    assert not warned and list(upsamples(gm).values()) == [(None, 2.0, "nearest")]

    gm, warned = float_identical(Special(disable_quantize(nn.Upsample(scale_factor=2))), x)
    assert type(gm.up) is nn.Upsample and not warned and upsamples(gm) == {}
    qat, _ = convert(quantize_qat, Special(disable_quantize(nn.Upsample(scale_factor=2))),
                     example_inputs=(x,))
    qat.train()(x)
    int8 = quantize(qat.eval())
    assert type(int8.up) is nn.Upsample and upsamples(int8) == {}
    with backends.use(INT8_BACKEND), torch.no_grad():
        assert int8(x).shape == (2, 4, 8, 8)


def test_a_module_called_twice_gets_one_upsample_a_call_site():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.up = nn.Conv2d(3, 4, 1), nn.UpsamplingNearest2d(scale_factor=2)
            self.out = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a = self.up(self.conv(x))
            return self.out(a) + self.up(self.out(self.conv(x)))

    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 4)
    gm, warned = float_identical(Twice(), x)
    assert not warned
    assert sorted(upsamples(gm)) == ["up_1", "up_2"]
