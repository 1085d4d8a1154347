"""Triton int8 GEMM / conv (tensor-core kernels, fused epilogues) == the NumPy oracle and the
reference backend, byte for byte, on awkward shapes. On CPU the kernels run through the
Triton interpreter; on a GPU the same tests run on the device."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _triton_inference_util import (DEV, ORACLES, TRITON, assert_same,  # noqa: F401
                                    check_linear_add_and_dequant, check_op, cpu, dev, poison,
                                    rand_act, rand_requant, rand_weight)
from gpuquant import qint8, quint8
from gpuquant.functional.requant import make_add_params, make_requant

pytestmark = pytest.mark.usefixtures("poison")
CL = torch.channels_last


# --------------------------------------------------------------------------- linear
LINEAR_CASES = [  # (M, K, N): M = 1 and <= 16, K and N not multiples of 8
    (1, 7, 5), (16, 33, 8), (13, 64, 123), (33, 70, 17), (3, 200, 40)]


@pytest.fixture(params=[1, 2], ids=["epi_whole", "epi_halves"])
def epi_split(request, monkeypatch):
    """The GEMM's requantizing epilogue on the whole tile or on its two column halves (the
    two forms the GPU autotuner times)."""
    from gpuquant.backends.triton import gemm
    monkeypatch.setattr(gemm, "INTERPRET_EPI_SPLIT", request.param)
    return request.param


@pytest.mark.parametrize("xdtype", [torch.int8, torch.uint8], ids=["int8", "uint8"])
@pytest.mark.parametrize("mkn", LINEAR_CASES, ids=lambda c: "x".join(map(str, c)))
def test_linear_matches_oracle(mkn, xdtype, epi_split):
    m, k, n = mkn
    i = LINEAR_CASES.index(mkn)
    zp = [-7, 0, 100, -128, 3][i] if xdtype == torch.int8 else [128, 0, 255, 37, 200][i]
    x = rand_act((m, k), xdtype)
    w = rand_weight((n, k))
    bias = None if i == 1 else torch.randint(-20000, 20000, (n,), dtype=torch.int32)
    out_dtype = [qint8, quint8][i % 2]
    act = ["none", "relu", "relu6"][i % 3]
    rq = rand_requant(n, out_dtype, act, k=k, big=(i == 3))
    check_op("linear", (x, zp, w, bias, rq), f"linear {mkn} {xdtype}")


def test_linear_batched_leading_dims_and_extremes(epi_split):
    """(..., K) inputs, and the largest magnitudes (x = -128 or 255 against w = +-128): the
    dot products sit at the int32 bound the caller allows, nothing saturates."""
    k, n = 96, 19
    x = torch.full((2, 3, k), -128, dtype=torch.int8)
    x[1] = 127
    w = torch.where(torch.rand(n, k) < 0.5, -128, 127).to(torch.int8)
    rq = rand_requant(n, qint8, k=k, big=True)
    check_op("linear", (x, 0, w, None, rq), "linear extremes int8")
    xu = torch.where(torch.rand(4, k) < 0.5, 0, 255).to(torch.uint8)
    check_op("linear", (xu, 0, w, torch.full((n,), -2 ** 20, dtype=torch.int32), rq),
           "linear extremes uint8")


def test_requant_negative_rshift_small_accumulator(epi_split):
    """Multipliers >= 1 (negative rshift, the saturating left shift) on accumulators small
    enough not to saturate: every output distinct from the clamp."""
    m, k, n = 9, 7, 13
    zp = 5
    x = rand_act((m, k), torch.int8, zp=zp, spread=2)
    w = rand_weight((n, k), absmax=3)
    w_scale = torch.linspace(0.1, 6.0, n, dtype=torch.float64)[torch.randperm(n)]
    rq = make_requant(0.5, w_scale, 0.4, -3, qint8)  # multipliers 0.125 .. 7.5
    assert (rq.rshift < 0).any() and (rq.rshift >= 0).any()
    y = check_op("linear", (x, zp, w, torch.randint(-9, 10, (n,), dtype=torch.int32), rq),
               "linear rshift<0")
    assert ((y.cpu() > -128) & (y.cpu() < 127)).float().mean() > 0.5


# --------------------------------------------------------------------------- conv2d
# (N, C, H, W), O, (KH, KW), stride, padding, dilation, groups, x dtype, zero point
CONV_CASES = {
    "3x3_flatk": ((2, 5, 9, 8), 7, (3, 3), 1, 1, 1, 1, torch.int8, -4),
    "3x3_s2_taploop_b1_uint8": ((1, 64, 7, 7), 33, (3, 3), 2, 1, 1, 1, torch.uint8, 131),
    "3x3_dil2": ((2, 8, 9, 9), 6, (3, 3), 1, 2, 2, 1, torch.int8, 0),
    "3x3_taploop_zp0_padded": ((1, 64, 6, 5), 20, (3, 3), 1, 1, 1, 1, torch.int8, 0),
    "7x7_stem_uint8": ((1, 3, 11, 11), 16, (7, 7), 2, 3, 1, 1, torch.uint8, 0),
    # im2col with a tap row of 5 x 5 channels, unequal strides, padding and dilations
    "3x5_few_rect_dil": ((2, 5, 10, 9), 6, (3, 5), (2, 1), (2, 3), (2, 3), 1, torch.uint8, 200),
    "1x1_gemm_path": ((2, 16, 5, 5), 24, (1, 1), 1, 0, 1, 1, torch.int8, 9),
    "1x1_s2": ((2, 16, 5, 5), 24, (1, 1), 2, 0, 1, 1, torch.uint8, 77),
    "grouped": ((1, 8, 6, 5), 12, (3, 3), 1, 1, 1, 2, torch.int8, -1),
    "3x1_c70_rect_stride": ((1, 70, 5, 4), 9, (3, 1), (2, 1), (1, 0), 1, 1, torch.int8, 12),
    "c1": ((1, 1, 6, 6), 3, (3, 3), 1, 1, 1, 1, torch.uint8, 255),
    "depthwise_x2": ((1, 12, 6, 6), 24, (3, 3), 1, 1, 1, 12, torch.int8, 2),
    "depthwise_s2_uint8": ((2, 12, 6, 6), 12, (3, 3), 2, 1, 1, 12, torch.uint8, 128),
    "depthwise_5x5_dil2": ((1, 7, 9, 9), 7, (5, 5), 1, 4, 2, 7, torch.int8, -9),
}


def _conv_inputs(case, channels_last=True):
    shape, o, (kh, kw), stride, pad, dil, groups, xdtype, zp = case
    x = rand_act(shape, xdtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    w = rand_weight((o, shape[1] // groups, kh, kw))
    bias = torch.randint(-5000, 5000, (o,), dtype=torch.int32)
    st, pd, dl = (v if isinstance(v, tuple) else (v, v) for v in (stride, pad, dil))
    return x, zp, w, bias, st, pd, dl, groups


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_matches_oracle(name):
    case = CONV_CASES[name]
    x, zp, w, bias, st, pd, dl, groups = _conv_inputs(case)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    i = list(CONV_CASES).index(name)
    rq = rand_requant(w.shape[0], [qint8, quint8][i % 2], ["none", "relu", "relu6"][i % 3],
                      k=k, big=(i % 4 == 0))
    y = check_op("conv2d", (x, zp, w, bias, st, pd, dl, groups, rq), name)
    assert y.is_contiguous(memory_format=CL)


# the tap-loop layers (>= 64 channels a group, more than one tap), plus a dilated one
TAP_LOOP_CASES = {n: CONV_CASES[n] for n in ("3x3_s2_taploop_b1_uint8", "3x3_taploop_zp0_padded",
                                             "3x1_c70_rect_stride")}
TAP_LOOP_CASES["3x3_dil2_c256_two_blocks"] = ((1, 256, 6, 5), 10, (3, 3), 1, 2, 2, 1, torch.int8, 0)
# 49 taps: the pipelined form's "inside the image" bits in 64 bits
TAP_LOOP_CASES["7x7_c64_padded"] = ((1, 64, 9, 8), 8, (7, 7), 1, 3, 1, 1, torch.int8, 0)


@pytest.mark.parametrize("pipe,l1", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("name", list(TAP_LOOP_CASES))
def test_conv2d_both_tap_loop_forms_match_oracle(name, pipe, l1, epi_split, monkeypatch):
    """The loop forms the GPU autotuner chooses between (taps unrolled; one pipelined
    (tap, channel block) loop, its tiles copied through L2 only or through L1) give the
    oracle's bytes, with and without a channel mask, zero point 0 and not, two channel
    blocks a tap; each with the epilogue whole or split."""
    from gpuquant.backends.triton import conv
    monkeypatch.setattr(conv, "INTERPRET_PIPE_TAPS", pipe)
    monkeypatch.setattr(conv, "INTERPRET_L1_CACHE", l1)
    x, zp, w, bias, st, pd, dl, groups = _conv_inputs(TAP_LOOP_CASES[name])
    rq = rand_requant(w.shape[0], qint8, "relu", k=w[0].numel())
    check_op("conv2d", (x, zp, w, bias, st, pd, dl, groups, rq), f"{name} pipe={pipe} l1={l1}")
    if name == "3x3_taploop_zp0_padded":  # the fused residual epilogue on the same loop
        _check_conv_add((x, zp, w, bias, st, pd, dl, groups, rq), f"pipe={pipe} l1={l1}")


def test_conv2d_nchw_input_and_no_bias():
    x, zp, w, _, st, pd, dl, g = _conv_inputs(CONV_CASES["3x3_flatk"], channels_last=False)
    assert x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    rq = rand_requant(w.shape[0], qint8, k=45)
    check_op("conv2d", (x, zp, w, None, st, pd, dl, g, rq), "conv NCHW input")


# --------------------------------------------------------------------------- fused paths
@pytest.mark.parametrize("name", ["3x3_flatk", "1x1_gemm_path", "depthwise_x2"])
def test_conv2d_add_equals_conv_then_add(name):
    x, zp, w, bias, st, pd, dl, g = _conv_inputs(CONV_CASES[name])
    rq = rand_requant(w.shape[0], qint8, k=w[0].numel())
    _check_conv_add((x, zp, w, bias, st, pd, dl, g, rq), name)


def _check_conv_add(args, label):
    """The fused conv + residual add (int8 residual, ReLU) == the oracles' conv then add."""
    rq = args[-1]
    ref_y = ORACLES[0][1]["conv2d"](*args)
    res = rand_act(tuple(ref_y.shape), torch.int8).contiguous(memory_format=CL)
    p = make_add_params(0.05, rq.zero_point, 0.03, -5, 0.07, 4, qint8, "relu")
    got = TRITON["conv2d_add"](*dev(args + (res,)), p)
    for oname, ops in ORACLES:
        assert_same(got, ops["add"](ops["conv2d"](*args), res, p), f"conv2d_add {label} vs {oname}")


def test_linear_add_and_dequant_outputs(epi_split):
    m, k, n = 11, 45, 21
    x = rand_act((m, k), torch.uint8)
    w = rand_weight((n, k))
    b = torch.randint(-999, 999, (n,), dtype=torch.int32)
    rq = rand_requant(n, quint8, "relu", k=k)
    res = rand_act((m, n), torch.uint8)
    p = make_add_params(0.04, rq.zero_point, 0.05, 120, 0.06, 130, quint8)
    check_linear_add_and_dequant(x, 140, w, b, rq, res, p, torch.tensor(0.0371), "uint8")


@pytest.mark.parametrize("layout", ["transposed", "column_slice", "expanded_columns",
                                    "expanded_rows"])
def test_linear_add_residual_of_any_strides(layout):
    """The residual's column stride is honoured (the kernel reads unit-stride rows: a view
    with another column stride is made contiguous first; broadcast rows read as they are)."""
    m, k, n = 5, 9, 7
    x = rand_act((m, k), torch.uint8)
    w = rand_weight((n, k))
    rq = rand_requant(n, quint8, "none", k=k)
    p = make_add_params(0.1, rq.zero_point, 0.2, 4, 0.15, 0, quint8)
    base = rand_act((m, n), torch.uint8)
    res = {"transposed": base.t().contiguous().t(),
           "column_slice": torch.stack([base, base], 2).reshape(m, 2 * n)[:, ::2],
           "expanded_columns": base[:, :1].expand(m, n),
           "expanded_rows": base[:1].expand(m, n)}[layout]
    got = TRITON["linear_add"](*dev((x, 3, w, None, rq, res)), p)
    for oname, ops in ORACLES:
        want = ops["add"](ops["linear"](x, 3, w, None, rq), res.contiguous(), p)
        assert_same(got, want, f"linear_add {layout} vs {oname}")


def test_conv2d_dequant_output():
    x, zp, w, bias, st, pd, dl, g = _conv_inputs(CONV_CASES["3x3_s2_taploop_b1_uint8"])
    _check_conv_dequant((x, zp, w, bias, st, pd, dl, g,
                         rand_requant(w.shape[0], qint8, k=w[0].numel())), "tap loop")


def _check_conv_dequant(args, label):
    scale = torch.tensor(0.125)
    got = TRITON["conv2d_dequant"](*dev(args), scale)
    for oname, ops in ORACLES:
        want = ops["dequantize"](ops["conv2d"](*args), scale,
                                 torch.tensor(args[-1].zero_point, dtype=torch.int32), None)
        assert_same(got, want, f"conv2d_dequant {label} vs {oname}")


@pytest.mark.parametrize("chunk_bytes", [None, 768])
@pytest.mark.parametrize("name", ["7x7_stem_uint8", "3x3_flatk", "1x1_s2"])
def test_few_channel_conv_is_im2col_then_gemm_in_chunks(name, chunk_bytes, monkeypatch):
    """A conv with fewer than 64 channels and one group runs as an explicit im2col and the
    GEMM (rows padded to 16 bytes against zero weight columns), the patch matrix in chunks
    of IM2COL_BYTES: int8 / uint8 out, fused residual add and dequantized output equal the
    oracles whether one chunk or many (768 bytes: 4 to 16 output pixels a chunk)."""
    from gpuquant.backends.triton import conv
    if chunk_bytes is not None:
        monkeypatch.setattr(conv, "IM2COL_BYTES", chunk_bytes)
    x, zp, w, bias, st, pd, dl, g = _conv_inputs(CONV_CASES[name])
    for i, (dt, act) in enumerate(((qint8, "relu"), (quint8, "none"))):
        args = (x, zp, w, bias, st, pd, dl, g, rand_requant(w.shape[0], dt, act, k=w[0].numel()))
        check_op("conv2d", args, f"{name} chunk={chunk_bytes} {dt}")
    _check_conv_add(args[:-1] + (rand_requant(w.shape[0], qint8, k=w[0].numel()),),
                    f"{name} chunk={chunk_bytes}")
    _check_conv_dequant(args, f"{name} chunk={chunk_bytes}")


def test_few_channel_conv_refuses_a_window_past_int32_offsets():
    """The im2col kernel's per-column source offsets are int32: a window spanning 2^31
    bytes or more (rows that far apart) is refused by name before any launch, not read at
    wrapped offsets. Meta tensors: nothing is allocated or run."""
    from gpuquant.backends.triton import conv
    x = torch.empty_strided((1, 3, 8, 8), (3 * 2 ** 29, 1, 2 ** 29, 3), dtype=torch.uint8,
                            device="meta")
    w = torch.empty((4, 3, 7, 7), dtype=torch.int8, device="meta")
    y2d = torch.empty((1, 4), dtype=torch.int8, device="meta")
    y = y2d.view(1, 1, 1, 4).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match="spans 3221225493 bytes"):
        conv._im2col_conv(x, 0, w, None, (7, 7, 2, 2, 0, 0, 1, 1), None, y, y2d, None)


@pytest.mark.parametrize("name", ["3x3_dil2", "1x1_gemm_path", "depthwise_s2_uint8"])
def test_bare_int32_accumulator(name):
    """The bare int32 outputs equal sum((x - zp) * w) + b computed exactly in float64."""
    x, zp, w, bias, st, pd, dl, g = _conv_inputs(CONV_CASES[name])
    want = F.conv2d(x.double() - zp, w.double(), bias.double(), st, pd, dl, g)
    got = TRITON["conv2d_int32"](*dev((x, zp, w, bias, st, pd, dl, g)))
    assert_same(got, want.round().to(torch.int32), f"conv2d_int32 {name}")
    x2 = rand_act((5, 37), torch.uint8)
    w2 = rand_weight((11, 37))
    got = TRITON["linear_int32"](*dev((x2, 3, w2, None)))
    assert_same(got, ((x2.long() - 3) @ w2.long().t()).int(), "linear_int32")


def test_left_shift_path_follows_the_requant(epi_split):
    """The epilogue leaves the saturating left shift out only where the Requant knows no
    rshift is negative: its shifts edited in place afterwards (a negative one written), or
    the flag unknown, bring the path back; the bytes equal the oracle's every time."""
    from gpuquant.functional.requant import Requant
    m, k, n = 7, 24, 9
    x = rand_act((m, k), torch.int8, zp=1, spread=2)
    w = rand_weight((n, k), absmax=3)
    rq = rand_requant(n, qint8, k=k)
    assert rq.left_shift is False and not rq.may_left_shift()
    assert rq.to("cpu").left_shift is False  # kept by .to()
    ref = ORACLES[0][1]["linear"]
    assert_same(TRITON["linear"](dev(x), 1, dev(w), None, rq), ref(x, 1, w, None, rq), "known")
    rq.rshift[::2] = -3  # multipliers >= 1 now: the left shift is needed
    rq.multiplier[::2] = 2 ** 30
    assert rq.may_left_shift() and rq.to("cpu").left_shift is True
    assert_same(TRITON["linear"](dev(x), 1, dev(w), None, rq), ref(x, 1, w, None, rq),
                "edited in place")
    unknown = Requant(rq.multiplier, rq.rshift, rq.zero_point, rq.qmin, rq.qmax, rq.dtype)
    unknown.left_shift = None
    assert unknown.may_left_shift()
    assert_same(TRITON["linear"](dev(x), 1, dev(w), None, unknown), ref(x, 1, w, None, rq),
                "unknown")


def test_memoised_parameters_follow_inplace_updates():
    """The device copies / folded bias are memoised on identity and version: an in-place
    weight update, a new zero point or a new Requant never reuses stale values."""
    m, k, n = 6, 40, 10
    x = rand_act((m, k), torch.int8)
    w = rand_weight((n, k))
    b = torch.randint(-99, 99, (n,), dtype=torch.int32)
    rq = rand_requant(n, qint8, k=k)
    ref = ORACLES[0][1]["linear"]
    wd, bd, xd = dev(w), dev(b), dev(x)
    assert_same(TRITON["linear"](xd, 4, wd, bd, rq), ref(x, 4, w, b, rq), "first call")
    with torch.no_grad():
        wd.mul_(-1).clamp_(-127, 127)
        bd.add_(1000)
    w2, b2 = cpu(wd), cpu(bd)
    assert_same(TRITON["linear"](xd, 4, wd, bd, rq), ref(x, 4, w2, b2, rq), "after update")
    assert_same(TRITON["linear"](xd, -6, wd, bd, rq), ref(x, -6, w2, b2, rq), "new zp")
    rq2 = rand_requant(n, quint8, "relu", k=k)
    assert_same(TRITON["linear"](xd, -6, wd, bd, rq2), ref(x, -6, w2, b2, rq2), "new rq")


def test_config_tables_per_family():
    from gpuquant.backends.triton import conv, gemm
    from gpuquant.backends.triton.common import ARCH_FAMILIES
    for fam in set(ARCH_FAMILIES.values()) - {"sm86"} | {"generic"}:
        for cfgs in (gemm.gemm_configs(fam), conv.conv_configs(fam)):
            assert cfgs and all(c.kwargs["BLOCK_K"] >= 32 and c.kwargs["BLOCK_N"] >= 16
                                for c in cfgs)
            # shared memory per stage fits the family (sm_89: 99 KB)
            limit = {"sm90": 227, "sm80": 163}.get(fam, 99) * 1024
            for c in cfgs:
                kw = c.kwargs
                assert (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * c.num_stages <= limit
    assert len(gemm.gemm_configs("interpret")) == 1
    with pytest.raises(ValueError, match="sm75"):
        gemm.gemm_configs("sm75")
    with pytest.raises(ValueError, match="unknown architecture"):
        conv.conv_configs("nope")
    # small problems prune the large tiles, never to nothing
    cfgs = gemm.gemm_configs("sm90")
    small = gemm.prune_configs(cfgs, {"M": 1, "N": 8})
    assert small and max(c.kwargs["BLOCK_M"] for c in small) <= 32
    assert len(gemm.prune_configs(cfgs, {"M": 8192, "N": 8192})) == len(cfgs)


def test_memo_entries_die_with_their_sources():
    """Derived tensors (reordered weights, folded bias) are dropped when the layer's weight
    is freed: a long benchmark or a swapped model does not pin old weights."""
    import gc

    from gpuquant.backends.triton.common import derived
    x = dev(rand_act((1, 8, 5, 5), torch.int8).contiguous(memory_format=CL))
    w = dev(rand_weight((6, 8, 3, 3)))
    rq = rand_requant(6, qint8, k=72)
    TRITON["conv2d"](x, 0, w, None, (1, 1), (1, 1), (1, 1), 1, rq)
    wid = id(w)
    mine = [k for k in derived._d if any(isinstance(e, tuple) and e[0] == wid for e in k[1:])]
    assert len(mine) >= 2  # the reordered weight and the epilogue tensors
    del w
    gc.collect()
    assert not any(k in derived._d for k in mine)
    # a channels_last weight: its (O, KH*KW*C) reorder is a view of it, which the cache
    # held (and with it the weight) until stored as a detached alias
    import weakref
    w = dev(rand_weight((6, 8, 3, 3))).contiguous(memory_format=CL)
    want = TRITON["conv2d"](x, 0, w, None, (1, 1), (1, 1), (1, 1), 1, rq)
    for oname, ops in ORACLES:
        assert_same(want, ops["conv2d"](cpu(x), 0, cpu(w), None, (1, 1), (1, 1), (1, 1), 1,
                                        rq), f"channels_last weight vs {oname}")
    alive, wid = weakref.ref(w), id(w)
    mine = [k for k in derived._d if any(isinstance(e, tuple) and e[0] == wid for e in k[1:])]
    assert mine
    del w
    gc.collect()
    assert alive() is None and not any(k in derived._d for k in mine)


def test_derived_values_never_pin_their_sources():
    """A memoised value that is its source (``t.to(device)`` already there) or a view of it
    is kept as a detached alias: same storage, no reference to the source tensor."""
    import gc
    import weakref

    from gpuquant.backends.triton.common import derived
    for make in (lambda t: t, lambda t: t.t(), lambda t: (t.reshape(-1), t.sum())):
        src = torch.randn(4, 4)
        alive = weakref.ref(src)
        got = derived("test_pin", (src,), (), lambda: make(src))
        first = got[0] if isinstance(got, tuple) else got
        assert first.data_ptr() == src.data_ptr()
        assert derived("test_pin", (src,), (), lambda: None) is got  # a hit
        del src, got, first
        gc.collect()
        assert alive() is None


# --------------------------------------------------------------------------- fixed point
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gpuquant.backends.triton.fixed_point import requantize_i32  # noqa: E402


@triton.jit
def _requant_i32_probe(ACC, MULT, RSHIFT, Y, R, C, zp, qmin, qmax,
                       HAS_LSHIFT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.arange(0, BR)
    cols = tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    acc = tl.load(ACC + rows[:, None] * C + cols[None, :], mask=mask, other=0)
    m = tl.load(MULT + cols, mask=cols < C, other=0)
    s = tl.load(RSHIFT + cols, mask=cols < C, other=0)
    y = requantize_i32(acc, m[None, :], s[None, :], zp, qmin, qmax, HAS_LSHIFT)
    tl.store(Y + rows[:, None] * C + cols[None, :], y, mask=mask)


@pytest.mark.parametrize("zp,qmin,qmax", [(0, -2 ** 31, 2 ** 31 - 1), (5, -128, 127)])
def test_requantize_i32_equals_reference_fixed_point(zp, qmin, qmax):
    """The epilogue's 32-bit requantization == the reference's int64 one for every rshift
    in [-30, 31], multipliers 0, 2^30, 2^31 - 1, INT32_MIN (saturating) and random ones, on
    random and extreme int32 accumulators."""
    from gpuquant.backends.reference import multiply_by_quantized_multiplier
    shifts = list(range(-30, 32))
    mults = torch.randint(2 ** 30, 2 ** 31, (len(shifts),), dtype=torch.int64)
    mults[:3] = torch.tensor([2 ** 30, 2 ** 31 - 1, 2 ** 30 + 1])
    shifts += [0, 31, 0, 5]
    mults = torch.cat([mults, torch.tensor([0, 2 ** 31 - 1, -2 ** 31, -2 ** 31])])
    c = len(shifts)
    acc = torch.randint(-2 ** 31, 2 ** 31, (40, c), dtype=torch.int64)
    acc[:8] //= 2 ** 24  # small values: the left shifts do not all saturate
    acc[8:12] = torch.tensor([-2 ** 31, 2 ** 31 - 1, -1, 1]).reshape(4, 1)
    acc[12:14] = torch.tensor([2 ** 30, -2 ** 30]).reshape(2, 1)  # ties of the high mul
    acc = acc.to(torch.int32)
    m32, s32 = mults.to(torch.int32), torch.tensor(shifts, dtype=torch.int32)
    want = (multiply_by_quantized_multiplier(acc, m32.long(), s32.long()) + zp).clamp(qmin, qmax)
    for lshift in (True, False):
        cols = torch.arange(c) if lshift else (s32 >= 0).nonzero().flatten()
        a, m, s = acc[:, cols].contiguous(), m32[cols].contiguous(), s32[cols].contiguous()
        y = torch.empty_like(a).to(DEV)
        _requant_i32_probe[(1,)](dev(a), dev(m), dev(s), y, a.shape[0], a.shape[1], zp, qmin,
                                 qmax, HAS_LSHIFT=lshift, BR=64, BC=128)
        assert_same(y, want[:, cols].to(torch.int32), f"requantize_i32 lshift={lshift}")


from gpuquant.backends.triton.fixed_point import requantize_folded  # noqa: E402


@triton.jit
def _requant_folded_probe(ACC, C0, MULT, RC, Y, R, C, zp, qmin, qmax, SIGNED: tl.constexpr,
                          BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.arange(0, BR)
    cols = tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    acc = tl.load(ACC + rows[:, None] * C + cols[None, :], mask=mask, other=0)
    c0 = tl.load(C0 + cols, mask=cols < C, other=0)
    m = tl.load(MULT + cols, mask=cols < C, other=0)
    rc = tl.load(RC + cols, mask=cols < C, other=0)
    y = requantize_folded(acc, c0[None, :], m[None, :], rc[None, :], zp, qmin, qmax, SIGNED)
    tl.store(Y + rows[:, None] * C + cols[None, :], y, mask=mask)


@pytest.mark.parametrize("zp,qmin,qmax,relu", [(5, -128, 127, False),
                                               (0, -2 ** 31, 2 ** 31 - 1, False),
                                               (-3, -3, 127, True), (0, 0, 255, True),
                                               (7, 7, 20, True)])
def test_folded_requantization_equals_reference(zp, qmin, qmax, relu):
    """The folded requantization (bias and nudge in one 64-bit addend, one-add rounding;
    with a ReLU clamp the rounding constant in the addend too and no sign term) == the
    reference's int64 one, for every rshift in [1, 31], multipliers 0, 2^30, 2^31 - 1 and
    random ones, random biases, accumulators up to the bound the host checks
    (``_folded_fits``) and exact ties of the rounding division, both signs."""
    from gpuquant.backends.reference import multiply_by_quantized_multiplier
    from gpuquant.backends.triton.gemm import _folded_fits, folded_tensors
    shifts = torch.tensor(list(range(1, 32)) * 2, dtype=torch.int32)
    c = shifts.numel()
    mults = torch.randint(2 ** 30, 2 ** 31, (c,), dtype=torch.int64)
    mults[31:] = 2 ** 30  # x 2^30 / 2^31 = x / 2: hi is known, so ties can be made
    mults[:3] = torch.tensor([2 ** 31 - 1, 0, 2 ** 30 + 1])
    bias = torch.randint(-2 ** 27, 2 ** 27, (c,), dtype=torch.int64)
    bound = 2 ** 29
    assert _folded_fits(mults.to(torch.int32), shifts, bound)
    assert not _folded_fits(mults.to(torch.int32), shifts, 2 ** 31 - 1)  # 2^31-1 at rshift 1
    assert not _folded_fits(mults[:3].to(torch.int32), torch.tensor([1, 0, 2]), 10)
    x = torch.randint(-bound, bound + 1, (40, c), dtype=torch.int64)
    x[:4] //= 2 ** 20
    x[4:8] = torch.tensor([-bound, bound, -1, 0]).reshape(4, 1)
    for j in range(31, c):  # hi = floor((x + 1) / 2) at +-(k 2^r + 2^(r-1)): exact ties
        r = int(shifts[j])
        ties = [(k * 2 ** r + 2 ** (r - 1)) for k in (0, 1, -1, -2, 5, -6)]
        xs = [2 * h - 1 for h in ties] + [2 * h for h in ties]
        xs = [v for v in xs if -bound <= v <= bound]
        x[8:8 + len(xs), j] = torch.tensor(xs)
    acc = (x - bias).to(torch.int32)
    want = (multiply_by_quantized_multiplier(x, mults, shifts.long()) + zp).clamp(qmin, qmax)
    c0, rc = folded_tensors(bias, mults.to(torch.int32), shifts, relu)
    y = torch.empty_like(acc).to(DEV)
    _requant_folded_probe[(1,)](dev(acc), dev(c0), dev(mults.to(torch.int32)), dev(rc), y,
                                acc.shape[0], c, zp, qmin, qmax, SIGNED=not relu, BR=64, BC=64)
    assert_same(y, want.to(torch.int32), f"requantize_folded relu={relu}")


def test_epilogue_requantization_modes():
    """Which requantization the host picks for a layer (gemm.epilogue_tensors), and that
    each one gives the oracles' bytes through the linear, conv and depthwise kernels:
    folded with a ReLU clamp (3) or without (2); the 32-bit form where a column's rshift is
    0 (1) or negative (0: the left shift), or where an accumulator could round past int32
    (a 2^31 - 1 multiplier at rshift 31 with a 2^30 bias); the int32 output never folded.
    The per-column tensors run EPI_PAD zeros past the last channel (unmasked loads)."""
    from gpuquant.backends.triton import gemm
    from gpuquant.functional.requant import Requant
    n, k = 6, 40
    x = rand_act((9, k), torch.uint8)
    xc = rand_act((2, k, 5, 4), torch.uint8).contiguous(memory_format=CL)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wc = torch.randint(-127, 128, (n, k, 3, 3), dtype=torch.int8)
    wd = torch.randint(-127, 128, (k, 1, 3, 3), dtype=torch.int8)
    b = torch.randint(-5000, 5000, (n,), dtype=torch.int32)
    relu = make_requant(0.02, torch.rand(n, dtype=torch.float64) * 0.01 + 0.001, 0.05, 3, qint8,
                        "relu")
    plain = make_requant(0.02, torch.rand(n, dtype=torch.float64) * 0.01 + 0.001, 0.05, 3,
                         qint8)

    def edit(rq, col, mult, rshift):
        m, s = rq.multiplier.clone(), rq.rshift.clone()
        m[col], s[col] = mult, rshift
        return Requant(m, s, rq.zero_point, rq.qmin, rq.qmax, rq.dtype)
    big_b = b.clone()
    big_b[2] = 2 ** 30
    # the same multiplier and shift tensors without the ReLU clamp: memoised apart
    unclamped = Requant(relu.multiplier, relu.rshift, relu.zero_point, -128, 127, qint8)
    cases = {"folded_relu": (relu, b, gemm.RQ_FOLDED_RELU), "folded": (plain, b, gemm.RQ_FOLDED),
             "same_tensors_no_relu": (unclamped, b, gemm.RQ_FOLDED),
             "rshift0": (edit(plain, 1, 2 ** 30 + 5, 0), b, gemm.RQ_PLAIN),
             "lshift": (edit(relu, 4, 2 ** 30 + 5, -2), b, gemm.RQ_LSHIFT),
             "past_bound": (edit(plain, 2, 2 ** 31 - 1, 31), big_b, gemm.RQ_PLAIN)}
    # every tile of every family reads its columns within the padding
    from gpuquant.backends.triton import conv, depthwise
    for fam in ("sm80", "sm89", "sm90"):
        for c in gemm.gemm_configs(fam) + conv.conv_configs(fam):
            assert c.kwargs["BLOCK_N"] <= gemm.EPI_PAD, (fam, c)
        assert all(c.kwargs["BLOCK_C"] <= gemm.EPI_PAD for c in depthwise.depthwise_configs(fam))
    for name, (rq, bias, mode) in cases.items():
        got = gemm.epilogue_tensors(w, w, bias, rq, 7, torch.uint8, torch.device("cpu"))
        assert got[3] == mode, name
        assert all(t.numel() == n + gemm.EPI_PAD for t in got[:3]), name
        assert gemm.epilogue_tensors(w, w, bias, rq, 7, torch.uint8, torch.device("cpu"),
                                     foldable=False)[3] in (gemm.RQ_LSHIFT, gemm.RQ_PLAIN)
        check_op("linear", (x, 7, w, bias, rq), f"linear {name}")
        check_op("conv2d", (xc, 7, wc, bias, (1, 1), (1, 1), (1, 1), 1, rq), f"conv {name}")
        if name != "past_bound":
            rqd = Requant(rq.multiplier.repeat(7)[:k], rq.rshift.repeat(7)[:k], rq.zero_point,
                          rq.qmin, rq.qmax, rq.dtype)
            check_op("conv2d", (xc, 7, wd, bias.repeat(7)[:k], (1, 1), (1, 1), (1, 1), k, rqd),
                     f"depthwise {name}")


def test_epilogue_refuses_requant_values_out_of_range():
    """A Requant edited in place past make_requant's range (a negative multiplier, a shift
    of 32), which its constructor never saw, is refused where the epilogue first reads it:
    a ValueError naming the values, not wrong bytes."""
    n, k = 5, 24
    x = rand_act((3, k), torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    for col, mult, shift in ((2, -7, 9), (4, 2 ** 30, 32)):
        rq = make_requant(0.02, torch.rand(n, dtype=torch.float64) * 0.01 + 0.001, 0.05, 3,
                          qint8)
        TRITON["linear"](*dev((x, 0, w, None, rq)))
        rq.multiplier[col], rq.rshift[col] = mult, shift
        with pytest.raises(ValueError, match=r"multipliers must be in \[0, 2\^31\).*channels \[" +
                           str(col)):
            TRITON["linear"](*dev((x, 0, w, None, rq)))


def test_unaligned_k_is_zero_padded_exactly(monkeypatch):
    """Rows whose length is not a multiple of 16 bytes are zero-padded along K before the
    GEMM (vectorised loads on the GPU); the padding must not change a byte, and the padded
    weight is made once per weight."""
    from gpuquant.backends.triton import gemm
    assert [gemm.padded_k(k) for k in (16, 33, 1000, 1024, 4093, 16411)] == \
        [16, 48, 1008, 1024, 4096, 16512]
    seen = []
    real = gemm.align_k

    def spy(x2d, w2d, key):
        xa, wa = real(x2d, w2d, key)
        seen.append((x2d.shape[1], xa.shape[1], xa.stride(0) % 16, wa.stride(0) % 16))
        return xa, wa
    monkeypatch.setattr(gemm, "align_k", spy)
    for (m, k, n) in [(5, 1000, 24), (3, 4093 // 8, 7)]:
        x = rand_act((m, k), torch.int8)
        w = rand_weight((n, k))
        rq = rand_requant(n, qint8, "relu", k=k)
        check_op("linear", (x, 3, w, None, rq), f"linear unaligned {m}x{k}x{n}")
    assert all(kp % 16 == 0 and sx == 0 and sw == 0 for _, kp, sx, sw in seen)
    assert {k for k, *_ in seen} == {1000, 4093 // 8}


def test_align_k_copies_a_misaligned_view_with_aligned_k():
    """K a multiple of 16 but a row stride that is not (a column slice of a wider tensor):
    a dense copy, no padding."""
    from gpuquant.backends.triton import gemm
    wide = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    x = wide[:, :32]
    w = torch.randint(-127, 128, (7, 32), dtype=torch.int8)
    xa, wa = gemm.align_k(x, w, w)
    assert wa is w and xa.shape == (5, 32) and xa.stride() == (32, 1) and torch.equal(xa, x)


def test_every_launcher_runs_on_its_inputs_device():
    """Triton launches on the current device: every inference and dynamic op is wrapped to
    switch to its input's GPU first (a model on cuda:1 while cuda:0 is current)."""
    from gpuquant.backends.triton import OPS, dynamic, inference
    for name in list(inference.OPS) + list(dynamic.OPS):
        fn = OPS[name]
        assert getattr(fn, "__wrapped__", None) is not None, name


@pytest.mark.parametrize("programs", [1, 2, 3])
def test_persistent_gemm_loops_over_tiles(programs, monkeypatch):
    """The persistent tile loop (PERSISTENT: at most that many programs a multiprocessor,
    each looping over its tiles; here 1-3 programs for up to 5x4 tiles, so programs run
    several tiles each and some one fewer) gives the oracle's bytes in every output mode:
    int8 requantized, with the fused residual add, dequantized float, bare int32, and the
    dynamic W8A8 scaled float."""
    from gpuquant.backends import get_backend
    from gpuquant.backends.triton import gemm
    monkeypatch.setattr(gemm, "INTERPRET_PERSISTENT", programs)
    monkeypatch.setattr(gemm, "sm_count", lambda *a: 1)  # programs = PERSISTENT x 1
    m, k, n = 150, 40, 100
    x = rand_act((m, k), torch.int8)
    w = rand_weight((n, k))
    b = torch.randint(-999, 999, (n,), dtype=torch.int32)
    rq = rand_requant(n, qint8, "relu", k=k, big=True)
    check_op("linear", (x, -3, w, b, rq), f"persistent x{programs}")
    res = rand_act((m, n), torch.int8)
    p = make_add_params(0.04, rq.zero_point, 0.05, 3, 0.06, -2, qint8)
    check_linear_add_and_dequant(x, -3, w, b, rq, res, p, torch.tensor(0.03),
                                 f"persistent x{programs}")
    from gpuquant.backends.triton.gemm import qgemm
    acc = qgemm(dev(x), -3, dev(w), dev(b), None, out_mode="int32")
    want32 = (x.to(torch.int64) + 3) @ w.to(torch.int64).T + b
    assert torch.equal(cpu(acc).to(torch.int64), want32)
    xs = torch.rand(m, dtype=torch.float32) * 0.1 + 0.01
    ws = torch.rand(n, dtype=torch.float32) * 0.1 + 0.01
    fb = torch.randn(n)
    got = get_backend("triton").OPS["linear_dynamic"](*dev((x, xs, w, ws, fb)), torch.float32)
    want = get_backend("numpy").OPS["linear_dynamic"](x, xs, w, ws, fb, torch.float32)
    assert torch.equal(cpu(got), want)
