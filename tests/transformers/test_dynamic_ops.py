"""Dynamic per-token ops on every backend: quantize_per_token exact, W8A8 integer products
and epilogue bit-identical (reference, NumPy, Triton under the interpreter), weight-only to
float32 rounding, input errors, and the GPU code the kernels compile to (PTX, no device)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gpuquant
from gpuquant import backends
from gpuquant.backends.reference_dynamic import EPS
from gpuquant.functional.dynamic import (linear_dynamic, linear_weight_only, max_in_features,
                                         quantize_per_token)

BACKENDS = [b for b in ("reference", "numpy", "triton") if b in backends.available()]
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def test_backends_under_test():
    # the CPU suite checks the NumPy oracle and the Triton kernels (interpreter) against the
    # definition; neither may silently drop out
    assert {"reference", "numpy", "triton"} <= set(BACKENDS), backends.available()


def _expected_per_token(x, qmax=127, qmin=-128):
    """The definition, written out independently of the library (float32 throughout)."""
    xf = x.float().reshape(-1, x.shape[-1])
    scale = torch.maximum(xf.abs().max(dim=1).values / torch.tensor(float(qmax)),
                          torch.tensor(EPS))
    inv = torch.tensor(1.0) / scale
    q = torch.round(xf * inv[:, None]).clamp(qmin, qmax).to(torch.int8)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (2, 5, 123), (3, 431)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token_exact(backend, shape, dtype):
    x = (torch.randn(shape) * torch.exp(torch.randn(shape[:-1] + (1,)) * 2)).to(dtype)
    with backends.use(backend):
        q, s = quantize_per_token(x)
    q_ref, s_ref = _expected_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    # the largest |x| of each row maps to +-127, and dequantization is within half a step
    assert torch.equal(q.abs().reshape(-1, shape[-1]).amax(dim=1).to(torch.int64),
                       torch.full((q.numel() // shape[-1],), 127))
    err = (q.float() * s[..., None] - x.float()).abs()
    assert bool((err <= s[..., None] * (0.5 + 1e-5)).all())  # ties of x * inv round either way


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_per_token_ties_zero_rows_and_narrow(backend):
    # absmax 127 -> scale 1: the halves are ties, rounded to even; a zero row gets scale eps
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5],
                      [0.0] * 8,
                      [-254.0, 1.0, -1.0, 3.0, 5.0, 7.0, 9.0, 11.0]])
    with backends.use(backend):
        q, s = quantize_per_token(x)
        qn, sn = quantize_per_token(x, gpuquant.qint8_narrow)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]
    assert q[1].tolist() == [0] * 8 and float(s[1]) == EPS
    assert q[2].tolist() == [-127, 0, 0, 2, 2, 4, 4, 6]  # scale 2: 1/2, 3/2 ... are ties too
    assert torch.equal(q, qn) and torch.equal(s, sn)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_quantize_per_token_long_rows(backend):
    # K above 16384 takes the Triton kernel's two-pass path
    x = torch.randn(2, 16411)
    x[1, 16400] = 40.0
    with backends.use(backend):
        q, s = quantize_per_token(x)
    q_ref, s_ref = _expected_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def _int_inputs(m, n, k, extreme=False):
    if extreme:
        xq = torch.full((m, k), -128, dtype=torch.int8)
        wq = torch.full((n, k), 127, dtype=torch.int8)
        wq[::2] = -127
    else:
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return xq, wq


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 7, 33), (33, 17, 123), (5, 70, 200)])
def test_integer_products_identical_across_backends(m, n, k):
    """Unit scales, no bias, float32 out: the output is the int32 accumulator itself (every
    value below 2^24 here), so it must equal the int64 product exactly on every backend."""
    xq, wq = _int_inputs(m, n, k)
    exact = xq.to(torch.int64) @ wq.to(torch.int64).t()
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    outs = {}
    for b in BACKENDS:
        with backends.use(b):
            outs[b] = linear_dynamic(xq, ones_m, wq, ones_n, None, torch.float32)
        assert torch.equal(outs[b].to(torch.int64), exact), b
    assert torch.equal(outs["numpy"], outs["triton"])


@pytest.mark.parametrize("extreme", [False, True])
def test_integer_products_large_accumulators(extreme):
    # |acc| up to 128 * 127 * 4096 = 66.6M (> 2^24: float32 BLAS needs K blocks in NumPy)
    m, n, k = 3, 5, 4096
    xq, wq = _int_inputs(m, n, k, extreme)
    exact = (xq.to(torch.int64) @ wq.to(torch.int64).t()).to(torch.int32)
    outs = {}
    for b in BACKENDS:
        with backends.use(b):
            outs[b] = linear_dynamic(xq, torch.ones(m), wq, torch.ones(n), None, torch.float32)
        assert torch.equal(outs[b], exact.to(torch.float32)), b
    assert torch.equal(outs["numpy"], outs["triton"])


def test_accumulator_at_the_int32_limit():
    # the largest K that is accepted reaches -2^31 + 1024: still exact on the CPU backends
    k = max_in_features()
    xq = torch.full((1, k), -128, dtype=torch.int8)
    wq = torch.full((1, k), 127, dtype=torch.int8)
    for b in ("reference", "numpy"):
        with backends.use(b):
            y = linear_dynamic(xq, torch.ones(1), wq, torch.ones(1), None, torch.float32)
        assert float(y) == float(torch.tensor(-128 * 127 * k, dtype=torch.float32)), b


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 7, 33), (33, 17, 123), (2 * 3, 9, 64)])
def test_linear_dynamic_bit_identical(out_dtype, bias, m, n, k):
    xq, wq = _int_inputs(m, n, k)
    xs = torch.rand(m) * 0.02 + 1e-3
    ws = torch.rand(n) * 0.01 + 1e-4
    b = torch.randn(n) if bias else None
    outs = {}
    for be in BACKENDS:
        with backends.use(be):
            outs[be] = linear_dynamic(xq, xs, wq, ws, b, out_dtype)
        assert outs[be].dtype == out_dtype and outs[be].shape == (m, n)
    for be in BACKENDS:
        assert torch.equal(outs[be], outs["reference"]), be
    # and the definition: float32 steps in the stated order
    acc = (xq.to(torch.int64) @ wq.to(torch.int64).t()).to(torch.float32)
    y = acc * xs[:, None] * ws[None, :]
    if b is not None:
        y = y + b
    assert torch.equal(outs["reference"], y.to(out_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_linear_weight_only_float32_rounding(backend, dtype):
    m, n, k = 5, 19, 77
    x = torch.randn(2, m, k).to(dtype)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ws = torch.rand(n) * 0.01 + 1e-3
    b = torch.randn(n)
    with backends.use(backend):
        y = linear_weight_only(x, wq, ws, b)
    exact = ((x.double() @ wq.double().t()) * ws.double() + b.double())
    assert y.dtype == dtype and y.shape == (2, m, n)
    # a K-term float32 sum, then one rounding to the output dtype
    out_ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
    scale = (x.double().abs() @ wq.double().abs().t()) * ws.double()
    tol = scale * k * 2.0 ** -24 + exact.abs() * out_ulp[dtype] + 1e-6
    assert bool(((y.double() - exact).abs() <= tol).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 16)
    wq = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    with backends.use(backend):
        q, s = quantize_per_token(x)
        y = linear_dynamic(q, s, wq, torch.ones(8), None, torch.bfloat16)
        yw = linear_weight_only(x, wq, torch.ones(8))
    assert q.shape == (0, 3, 16) and s.shape == (0, 3)
    assert y.shape == (0, 3, 8) and y.dtype == torch.bfloat16
    assert yw.shape == (0, 3, 8)


def test_bad_inputs():
    wq = torch.zeros(4, 8, dtype=torch.int8)
    ones = torch.ones(4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_per_token(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="K >= 1"):
        quantize_per_token(torch.ones(3, 0))
    with pytest.raises(ValueError, match="qint8"):
        quantize_per_token(torch.ones(3, 8), gpuquant.quint8)
    xq = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        linear_dynamic(xq.float(), torch.ones(2), wq, ones)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\)"):
        linear_dynamic(torch.zeros(2, 9, dtype=torch.int8), torch.ones(2), wq, ones)
    with pytest.raises(ValueError, match="x_scale"):
        linear_dynamic(xq, torch.ones(3), wq, ones)
    with pytest.raises(TypeError, match="w_scale must be torch.float32"):
        linear_dynamic(xq, torch.ones(2), wq, ones.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_dynamic(xq, torch.ones(2), wq, ones, torch.ones(5))
    with pytest.raises(TypeError, match="out_dtype"):
        linear_dynamic(xq, torch.ones(2), wq, ones, None, torch.int32)
    with pytest.raises(ValueError, match="shape"):
        linear_weight_only(torch.ones(2, 7), wq, ones)
    # K whose worst case could overflow int32 is refused before anything runs
    k = max_in_features() + 1
    with pytest.raises(ValueError, match="overflow"):
        linear_dynamic(torch.zeros(1, k, dtype=torch.int8), torch.ones(1),
                       torch.zeros(1, k, dtype=torch.int8), torch.ones(1))


_PTX_SCRIPT = textwrap.dedent(r"""
    import inspect
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gpuquant.backends.triton import dynamic as D, gemm as G
    MMA_RE = re.compile(r"\b((?:wgmma\.mma_async|mma\.sync)[\w.]*)")
    FLOAT_HAZARD_RE = re.compile(r"\b(fma\.rn\.f32|div\.full\.f32|div\.approx\.f32)")

    def compile_ptx(fn, signature, constexprs, cc, num_warps=4, num_stages=3, aligned=()):
        defaults = {p.name: p.default for p in inspect.signature(fn.fn).parameters.values()
                    if p.default is not p.empty and p.name not in signature}
        constexprs = {**defaults, **constexprs}  # the launcher's defaults (GEMV, W_A)
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        # ``aligned``: arguments a launch specializes as divisible by 16 (16-byte pointers)
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a in aligned}
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={
            "num_warps": num_warps, "num_stages": num_stages,
            "enable_fp_fusion": False}).asm["ptx"]
    i32 = lambda *names: {k: "i32" for k in names}
    for cc, fam in ((80, "sm80"), (90, "sm90")):
        sig = {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", **i32("K", "stride_xm",
               "stride_qm", "qmin", "qmax"), "eps": "fp32"}
        ptx = compile_ptx(D._quantize_per_token_kernel, sig, {"BLOCK_K": 4096, "ONE_BLOCK": True},
                          cc, num_warps=8)
        assert not FLOAT_HAZARD_RE.findall(ptx) and "div.rn.f32" in ptx, cc
        # the transformer QAT's row fake quant: IEEE divisions, cvt.rni rounding, no FMA,
        # 16-byte loads of a bf16 row
        sig = {"x_ptr": "*bf16", "y_ptr": "*fp32", "mask_ptr": "*u8", **i32("K", "stride_xm"),
               **{a: "fp32" for a in ("divisor", "qmin", "qmax", "eps")}}
        for one in (True, False):
            ptx = compile_ptx(D._fake_quant_rows_kernel, sig, {"BLOCK_K": 4096,
                              "ONE_BLOCK": one, "SAVE_MASK": True}, cc, num_warps=8,
                              aligned=("x_ptr", "y_ptr", "mask_ptr", "K", "stride_xm"))
            assert not FLOAT_HAZARD_RE.findall(ptx) and "div.rn.f32" in ptx, (cc, one)
            assert "cvt.rni.f32.f32" in ptx and "ld.global.v4" in ptx, (cc, one)
        sig = {"X": "*i8", "W": "*i8", "BIAS": "*fp32", "MULT": "*fp32", "RSHIFT": "*fp32",
               "EPI": "*fp32", "RES": "*fp32", "Y": "*bf16", **i32("M", "N", "K", "stride_xm",
               "stride_xk", "stride_wn", "stride_wk", "stride_ym", "stride_rm"),
               "deq_scale": "fp32"}
        c = G.gemm_configs(fam)[0]
        ptx = compile_ptx(G._qgemm_kernel, sig, {**c.kwargs, "X_UINT8": False, "OUT_MODE": 3,
                          "HAS_RES": True, "EVEN_K": True, "RES_MODE": 0, "RQ_MODE": 1,
                          "PERSISTENT": 0}, cc,
                          c.num_warps, c.num_stages)
        mma = set(MMA_RE.findall(ptx))
        want = "wgmma.mma_async" if cc == 90 else "mma.sync.aligned.m16n8k32"
        assert any(i.startswith(want) and "s8.s8" in i for i in mma), (cc, mma)
        assert not FLOAT_HAZARD_RE.findall(ptx), cc
        sig = {"a_ptr": "*bf16", "b_ptr": "*i8", "c_ptr": "*bf16", "b_scale_ptr": "*fp32",
               "bias_ptr": "*fp32", "ws_ptr": "*fp32", "tick_ptr": "*i32",
               **i32("M", "N", "K", "SPLIT_K",
               "stride_am", "stride_ak", "stride_bn", "stride_bk", "stride_cm", "stride_cn")}
        ptx = compile_ptx(D._linear_weight_only_kernel, sig, {"HAS_BIAS": True, "DOT_F32": False,
                          "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128,
                          "GROUP_M": 8, "EVEN_K": True, "GEMV": False}, cc, 4, 4)
        assert any("bf16.bf16.f32" in i for i in MMA_RE.findall(ptx)), cc
        # split-K decode: partials, then the tile's last program (ticket after a barrier,
        # acquire-release atomics at GPU scope, partials read past L1) reduces in order
        ptx = compile_ptx(D._linear_weight_only_kernel, sig, {"HAS_BIAS": True, "DOT_F32": False,
                          "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128,
                          "GROUP_M": 1, "EVEN_K": False, "GEMV": False}, cc, 4, 4)
        assert "st.global" in ptx and not FLOAT_HAZARD_RE.findall(ptx), cc
        assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, cc
        assert "cvt.rn.bf16.f32" in ptx and "bar.sync" in ptx, cc
        # (as launched on contiguous tensors: unit strides specialized to 1, the rest aligned)
        unit = ("stride_ak", "stride_bk", "stride_cn")
        aligned = ("a_ptr", "b_ptr", "c_ptr", "N", "K", "stride_am", "stride_bn", "stride_cm")
        contiguous = {k: v for k, v in sig.items() if k not in unit}
        # decode's deep pipeline: 6 stages keep 5 tiles of W in flight (two commit groups a
        # stage: x and W), where 4 stages keep 3
        waits = {}
        for stages in (4, 6):
            ptx = compile_ptx(D._linear_weight_only_kernel, contiguous, {
                **dict.fromkeys(unit, 1), "HAS_BIAS": True, "DOT_F32": False, "BLOCK_M": 16,
                "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "EVEN_K": True, "GEMV": False},
                cc, 4, stages, aligned=aligned)
            waits[stages] = max(int(v) for v in re.findall(r"cp\.async\.wait_group\s+(\d+)",
                                                          ptx))
        assert waits == {4: 4, 6: 8}, (cc, waits)
        # the transposed prefill form (W_A): on sm_90 the converted weight is wgmma's
        # register operand and a wgmma group stays in flight across K steps (the plain form
        # stores the converted tile to shared memory and waits: wait_group 0 only)
        for w_a in (True, False):
            ptx = compile_ptx(D._linear_weight_only_kernel, contiguous, {
                **dict.fromkeys(unit, 1), "HAS_BIAS": True, "DOT_F32": False,
                "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EVEN_K": True,
                "GEMV": False, "W_A": w_a}, cc, 4, 4, aligned=aligned)
            assert any("bf16.bf16" in i for i in MMA_RE.findall(ptx)), (cc, w_a)
            assert not FLOAT_HAZARD_RE.findall(ptx), (cc, w_a)
            if cc == 90:
                reg_a = re.search(r"wgmma\.mma_async[^;]*\}, \{%r", ptx) is not None
                in_flight = re.search(r"wgmma\.wait_group\.sync\.aligned\s+[1-9]", ptx)
                assert reg_a == w_a and (in_flight is not None) == w_a, (w_a, reg_a)
        # the one-row GEMV form: no MMA, W streamed with 16-byte loads (contiguous, as
        # above, and K a multiple of 16). With bf16 activations each int8 becomes float32 by
        # integer ops and one add (no cvt from an integer: I2F runs at a quarter of the
        # float rate) and each exact product is
        # accumulated by an FMA: 64 a thread a K step (32 x 256 over 128 threads), no other
        # (the epilogue's acc * scale + bias stays two roundings); with float32
        # activations, whose products round, multiply then add, no FMA at all
        for act in ("*bf16", "*fp32"):
            ptx = compile_ptx(D._linear_weight_only_kernel,
                              {**contiguous, "a_ptr": act, "c_ptr": act},
                              {**dict.fromkeys(unit, 1), "HAS_BIAS": True,
                               "DOT_F32": act == "*fp32", "BLOCK_M": 1, "BLOCK_N": 32,
                               "BLOCK_K": 256, "GROUP_M": 1, "EVEN_K": True, "GEMV": True},
                              cc, 4, 1,
                              aligned=("a_ptr", "b_ptr", "c_ptr", "b_scale_ptr", "bias_ptr",
                                       "ws_ptr", "K", "N", "stride_am", "stride_bn",
                                       "stride_cm"))
            assert not MMA_RE.findall(ptx) and "ld.global.v4.b32" in ptx, (cc, act)
            assert not re.findall(r"div\.(?:full|approx)\.f32", ptx), (cc, act)
            fmas = len(re.findall(r"\bfma\.rn\.f32", ptx))
            assert fmas == (64 if act == "*bf16" else 0), (cc, act, fmas)
            if act == "*bf16":
                assert not re.findall(r"cvt\.rn\.f32\.s(?:8|16|32)", ptx), cc
    print("ptx ok")
""")


def test_kernels_compile_for_sm80_sm90():
    """The GPU code (compiled here without a GPU): no FMA contraction or approximate division
    in the per-token quantize kernel, int8 tensor-core MMA (mma.sync / wgmma) in the W8A8
    GEMM's scaled epilogue mode, bf16 MMA in the weight-only GEMM (its decode pipelines'
    depth; its transposed prefill form's register operand on sm_90)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "ptx ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf*0
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_give_nan_not_garbage(backend):
    x = torch.randn(4, 37)
    x[1, 5] = float("nan")
    x[2, 36] = float("inf")
    x[3, 0] = -float("inf")
    wq = torch.randint(-127, 128, (6, 37), dtype=torch.int8)
    with backends.use(backend):
        q, s = quantize_per_token(x)
        y = linear_dynamic(q, s, wq, torch.ones(6), torch.zeros(6), torch.bfloat16)
    q_ref, s_ref = _expected_per_token(x[:1])
    assert torch.equal(q[0], q_ref[0]) and torch.equal(s[0], s_ref[0])
    assert bool(torch.isnan(s[1:]).all()) and not bool(q[1:].any())
    assert bool(torch.isfinite(y[0]).all()) and bool(torch.isnan(y[1:]).all())


def test_weight_only_split_k_choice():
    from gpuquant.backends.triton.dynamic import weight_only_split_k as split
    assert split(1, 4096, 4096, 132) == 4        # 64 column tiles: 4 K ranges of 1024
    assert split(16, 11008, 4096, 132) == 2      # 172 tiles: 1.53 programs a SM -> 2
    assert split(1, 4096, 14336, 132) == 4       # about 2 programs a multiprocessor
    assert split(1, 14336, 4096, 132) == 1       # 224 tiles: 1.18 -> 1
    assert split(17, 4096, 4096, 132) == 1       # prefill: tiles enough
    assert split(1, 4096, 1000, 132) == 1        # too short a K to split
    assert split(1, 4096, 1500, 132) == 2        # capped by k // 512
    assert split(1, 64, 1 << 20, 132) == 256     # 264 / 1 tile -> 256


@pytest.mark.parametrize("k", [1024, 1000 + 37])  # whole BLOCK_Ks per range, and ragged
@pytest.mark.parametrize("dtype", FLOATS)
def test_weight_only_split_k_matches_unsplit(k, dtype):
    """Split-K decode (partials in float32, summed in order by each tile's last program)
    gives the unsplit result to float32 rounding, the same bytes on every call, and NumPy's
    within the weight-only bound; the tile tickets are left zero."""
    if "triton" not in backends.available():
        pytest.skip("triton backend unavailable here")
    from gpuquant.backends.triton import dynamic as D
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m, n = 3, 40
    x = torch.randn(m, k).to(dtype).to(dev)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8).to(dev)
    ws = (torch.rand(n) * 0.01 + 1e-3).to(dev)
    b = torch.randn(n).to(dev)
    whole = D.linear_weight_only(x, wq, ws, b, split_k=1)
    parts = D.linear_weight_only(x, wq, ws, b, split_k=4)
    again = D.linear_weight_only(x, wq, ws, b, split_k=4)
    assert torch.equal(parts, again)
    # a forced tile (tuning probes) computes the same products
    tiled = D.linear_weight_only(x, wq, ws, b, split_k=2, tile=(16, 64, 64, 1, 4, 2))
    exact = (x.double() @ wq.double().t()) * ws.double() + b.double()
    out_ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
    scale = (x.double().abs() @ wq.double().abs().t()) * ws.double()
    tol = scale * k * 2.0 ** -24 + exact.abs() * out_ulp[dtype] + 1e-6
    for y in (whole, parts, tiled):
        assert y.dtype == dtype and bool(((y.double() - exact).abs() <= tol).all())
    assert not bool(D.launch_tickets(1, x.device).any())
    with pytest.raises(ValueError, match="tile must be"):
        D.linear_weight_only(x, wq, ws, b, tile=(16, 16, 64, 1, 4, 2))


@pytest.mark.parametrize("k,split", [(1024, 1), (1024, 4), (1000 + 37, 3)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_weight_only_gemv_form_matches_the_tensor_core_form(k, split, dtype):
    """The one-row GEMV configs (BLOCK_M 1: CUDA cores, element-wise partial products,
    one sum along K) give the dot form's result to float32 rounding, split or not; more than
    one row is refused for them."""
    if "triton" not in backends.available():
        pytest.skip("triton backend unavailable here")
    from gpuquant.backends.triton import dynamic as D
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 40
    g = torch.Generator().manual_seed(k + split)
    x = torch.randn(1, k, generator=g).to(dtype).to(dev)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(dev)
    ws = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(dev)
    b = torch.randn(n, generator=g).to(dev)
    gemv = D.linear_weight_only(x, wq, ws, b, split_k=split, tile=(1, 32, 64, 1, 4, 1))
    assert torch.equal(gemv, D.linear_weight_only(x, wq, ws, b, split_k=split,
                                                  tile=(1, 32, 64, 1, 4, 1)))
    exact = (x.double() @ wq.double().t()) * ws.double() + b.double()
    out_ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
    scale = (x.double().abs() @ wq.double().abs().t()) * ws.double()
    tol = scale * k * 2.0 ** -24 + exact.abs() * out_ulp[dtype] + 1e-6
    assert gemv.dtype == dtype and bool(((gemv.double() - exact).abs() <= tol).all())
    assert not bool(D.launch_tickets(1, x.device).any())
    with pytest.raises(ValueError, match="one row"):
        D.linear_weight_only(x.expand(2, k), wq, ws, b, tile=(1, 32, 64, 1, 4, 1))


def test_weight_only_autotune_tries_both_forms_for_one_row():
    """Quick tuning of a one-row decode keeps a GEMV config beside the tensor-core tiles;
    two rows never get one. Prefill keeps a transposed (W_A) tile beside the plain ones;
    decode never gets one (its tiles are 64 rows or more)."""
    from gpuquant.backends.triton import dynamic as D
    configs = [D._wo_config(t, w_a) for t, w_a in D.weight_only_forms()]
    for mode in ("quick", "full"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GPUQUANT_TRITON_TUNE", mode)
            one = D._wo_prune(configs, {"M": 1})
            two = D._wo_prune(configs, {"M": 2})
            prefill = D._wo_prune(configs, {"M": 2048})
        assert any(c.kwargs["GEMV"] for c in one) and any(not c.kwargs["GEMV"] for c in one)
        assert not any(c.kwargs["GEMV"] for c in two)
        assert not any(c.kwargs["W_A"] for c in one + two)
        assert any(c.kwargs["W_A"] for c in prefill)
        assert any(not c.kwargs["W_A"] for c in prefill)
        # decode also tries a deep pipeline (6 stages or more) beside the 4-stage tiles
        for got in (one, D._wo_prune(configs, {"M": 16})):
            assert any(c.num_stages >= 6 for c in got)
            assert any(c.num_stages == 4 and c.kwargs["BLOCK_N"] == 64 for c in got)
        if mode == "quick":
            assert len(one) <= 4 and len(prefill) <= 4
            # the transposed form's largest tile: its best ratio of issue to MMA work
            assert [c.kwargs["BLOCK_M"] for c in prefill if c.kwargs["W_A"]] == [256]
            assert not any(c.num_stages >= 6 for c in prefill)
            # the new kinds are added to the plain tiles quick tuning picked before them,
            # never in their place
            plain = [D._wo_config(t) for t in D._WO_TILES + D._WO_GEMV_TILES]
            for m in (1, 16, 128, 2048):
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("GPUQUANT_TRITON_TUNE", mode)
                    before = D._wo_prune(plain, {"M": m})
                    now = D._wo_prune(configs, {"M": m})
                assert all(c in now for c in before if c.num_stages < 6), m
                assert sum(c.kwargs["W_A"] for c in now) == (m > 16), m


@pytest.mark.parametrize("m,k,split", [(37, 1037, 1), (20, 1024, 3), (16, 512, 2), (1, 300, 1)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_weight_only_transposed_form_matches(m, k, split, dtype):
    """The transposed tensor-core form (W_A: W @ x^T, the accumulator transposed for the
    epilogue) gives the plain form's result to float32 rounding, split or not, whole or
    ragged K blocks, partial tiles included; it needs a tensor-core tile."""
    if "triton" not in backends.available():
        pytest.skip("triton backend unavailable here")
    from gpuquant.backends.triton import dynamic as D
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 72
    g = torch.Generator().manual_seed(m * k + split)
    x = torch.randn(m, k, generator=g).to(dtype).to(dev)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(dev)
    ws = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(dev)
    b = torch.randn(n, generator=g).to(dev)
    tile = (16, 32, 64, 1, 4, 2)
    wa = D.linear_weight_only(x, wq, ws, b, split_k=split, tile=tile, w_a=True)
    plain = D.linear_weight_only(x, wq, ws, b, split_k=split, tile=tile)
    exact = (x.double() @ wq.double().t()) * ws.double() + b.double()
    out_ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
    scale = (x.double().abs() @ wq.double().abs().t()) * ws.double()
    tol = scale * k * 2.0 ** -24 + exact.abs() * out_ulp[dtype] + 1e-6
    for y in (wa, plain):
        assert y.dtype == dtype and y.shape == (m, n)
        assert bool(((y.double() - exact).abs() <= tol).all())
    assert not bool(D.launch_tickets(1, x.device).any())
    for bad in (None, (1, 32, 64, 1, 4, 1)):
        with pytest.raises(ValueError, match="w_a=True needs a tensor-core tile"):
            D.linear_weight_only(x[:1], wq, ws, b, tile=bad, w_a=True)


def test_bf16_epilogue_keeps_every_nan_a_nan():
    """The bit-level bf16 rounding of the W8A8 epilogue: a GPU's canonical NaN (0x7FFFFFFF)
    and negative NaNs became -0.0 / +0.0 (their payload carried into the sign); every NaN
    now stores torch's bf16 NaN 0x7FC0."""
    from gpuquant import backends
    from gpuquant.backends.triton.dynamic import linear_dynamic as triton_linear_dynamic
    xq = torch.ones(4, 32, dtype=torch.int8)
    wq = torch.ones(3, 32, dtype=torch.int8)
    xs = torch.tensor([0x3F800000, 0x7FC00000, 0x7FFFFFFF, -1], dtype=torch.int32)
    xs = xs.view(torch.float32)
    with backends.use("triton"):
        y = triton_linear_dynamic(xq, xs, wq, torch.ones(3), None, torch.bfloat16)
    assert torch.equal(y[0], torch.full((3,), 32.0, dtype=torch.bfloat16))
    assert (y[1:].view(torch.int16) == 0x7FC0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_weight_scales_are_refused_on_cpu(bad):
    """A weight scale that is NaN, Inf, 0 or negative gives NaN / Inf / sign-flipped columns:
    refused on CPU tensors (a GPU would synchronise for the check every call)."""
    from gpuquant.functional.dynamic import linear_dynamic, linear_weight_only
    xq, xs = quantize_per_token(torch.randn(2, 8))
    wq = torch.ones(3, 8, dtype=torch.int8)
    ws = torch.tensor([0.1, bad, 0.2])
    with pytest.raises(ValueError, match=r"linear_dynamic: w_scale must be finite and > 0"):
        linear_dynamic(xq, xs, wq, ws)
    with pytest.raises(ValueError, match=r"linear_weight_only: w_scale must be finite and > 0"):
        linear_weight_only(torch.randn(2, 8), wq, ws)


@pytest.mark.parametrize("bad", [-1.0, -0.0, 0.0, float("inf"), float("-inf")])
def test_bad_token_scales_are_refused_on_cpu(bad):
    """A negative per-token scale silently flipped the sign of its output row (0 zeroed
    it, Inf made it Inf / NaN): refused on CPU tensors, naming the value. NaN stays allowed:
    it is the scale quantize_per_token gives a token holding NaN / Inf (a NaN row out)."""
    xq, xs = quantize_per_token(torch.randn(3, 8))
    wq = torch.randint(-127, 128, (5, 8), dtype=torch.int8)
    ws = torch.rand(5) + 0.01
    good = linear_dynamic(xq, xs, wq, ws)
    xs_bad = xs.clone()
    xs_bad[1] = bad
    with pytest.raises(ValueError, match=r"linear_dynamic: x_scale must be finite and > 0 "
                                         r"\(or NaN: a token holding NaN / Inf\), got "
                                         rf"\[{bad!r}\]"):
        linear_dynamic(xq, xs_bad, wq, ws)
    xs_nan = xs.clone()
    xs_nan[1] = float("nan")
    y = linear_dynamic(xq, xs_nan, wq, ws)
    assert y[1].isnan().all() and torch.equal(y[[0, 2]], good[[0, 2]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, 1e-40])
def test_quantize_weight_per_channel_refuses_bad_given_scales(bad):
    """A scale passed to quantize_weight_per_channel is held to QParams' rule: 0 made every
    weight +-127 (with scale 0: the layer silently computed its bias only), -1 flipped the
    weights' signs, NaN / a subnormal (reciprocal inf) gave 0 or +-127 garbage."""
    from gpuquant.nn.quantized.linear_dynamic import quantize_weight_per_channel
    w = torch.randn(3, 8)
    with pytest.raises(ValueError, match="scale must be finite and > 0 .* at 1 channel"):
        quantize_weight_per_channel(w, scale=torch.tensor([0.1, bad, 0.2]))
    with pytest.raises(TypeError, match="scale must be a float tensor"):
        quantize_weight_per_channel(w, scale=torch.ones(3, dtype=torch.int64))
    q, s = quantize_weight_per_channel(w, scale=torch.tensor([0.1, 0.05, 0.2]))
    assert torch.equal(q, torch.round(w * (1 / s)[:, None]).clamp(-127, 127).to(torch.int8))


def test_per_channel_weight_scale_checks_its_arguments():
    """per_channel_weight_scale (public) checks the weight and dtype as
    quantize_weight_per_channel does: a wrong dtype raised AttributeError ('NoneType' has no
    attribute 'qmax'), a 1-d weight an IndexError from amax."""
    from gpuquant.nn.quantized.linear_dynamic import per_channel_weight_scale
    w = torch.randn(3, 4)
    with pytest.raises(TypeError, match="weight dtype must be one of"):
        per_channel_weight_scale(w, dtype=None)
    with pytest.raises(ValueError, match="weight dtype must be one of"):
        per_channel_weight_scale(w, dtype=gpuquant.quint8)
    for bad in (torch.randn(4), torch.randint(0, 3, (3, 4)), [[1.0]]):
        with pytest.raises(TypeError, match="weight must be a 2-D float tensor"):
            per_channel_weight_scale(bad)
    assert torch.equal(per_channel_weight_scale(w, "qint8"),
                       per_channel_weight_scale(w, gpuquant.qint8))
