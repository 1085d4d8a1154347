"""Every fake-quant kernel (fake_quant fwd/bwd, LSQ/TQT backward, fused observer, the BN
fold) compiled for sm_80 and sm_90 without a GPU (contract section 4): its PTX must have no
fma contraction and no approximate division, since bit-exactness with PyTorch depends on
separate roundings.

The compile runs in a subprocess with TRITON_INTERPRET unset: under the interpreter
``@triton.jit`` returns interpreted functions that ``triton.compile`` cannot take.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# argument name -> Triton type, for every fake-quant kernel (x-like pointers vary by dtype)
_SCRIPT = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gpuquant.backends.triton import fake_quant as fq

HAZARD = re.compile(r"\b(fma\.rn(?:\.ftz)?\.f32|div\.full(?:\.ftz)?\.f32|div\.approx(?:\.ftz)?\.f32|"
                    r"(?:rcp|sqrt|rsqrt|ex2|lg2)\.approx(?:\.ftz)?\.f32)")
DIV32 = re.compile(r"\b((?:div|rem)\.[su]32)")
BF16_TRICK = re.compile(r"\badd\.s32\s+%r\d+, %r\d+, 32767;")  # bf16_rne's 0x7FFF bias
X_LIKE = {"x_ptr", "y_ptr", "g_ptr", "gx_ptr", "z_ptr", "gz_ptr"}
TYPES = {"mask_ptr": "*u8", "ok_ptr": "*u8", "bad_ptr": "*i64",
         "scale_ptr": "*fp32", "inv_ptr": "*fp32", "part_ptr": "*fp32", "mn_ptr": "*fp32",
         "mx_ptr": "*fp32", "min_ptr": "*fp32", "max_ptr": "*fp32", "out_ptr": "*fp32",
         "qmin": "fp32", "qmax": "fp32", "grad_factor": "fp32", "c_ema": "fp32", "eps": "fp32",
         "half_range": "fp32", "zp_sym": "fp32", "min_gamma": "fp32", "momentum": "fp32",
         "unbias": "fp32", "nbt_ptr": "*i64", "q_eps": "fp32", "tick_ptr": "*i32"}

def signature(fn, const, xdt):
    sig = {}
    for a in fn.arg_names:
        if a in const:
            sig[a] = "constexpr"
        elif a in X_LIKE:
            sig[a] = xdt
        elif a == "wf_ptr" and str(const.get("OUT", "fp32")) != "fp32":
            sig[a] = "*" + str(const["OUT"])  # the BN fold's weight in the conv's dtype
        elif a == "zp_ptr":  # int32 zero point, LSQ float zero point
            sig[a] = "*fp32" if const.get("QMODE") == 1 or const.get("MODE") == 1 else "*i32"
        else:
            # other pointers float32 (the BN fold's vectors), the rest sizes and strides
            sig[a] = TYPES.get(a, "*fp32" if a.endswith("_ptr") else "i32")
    return sig

def attrs(fn, const):
    # what a launch with 16-byte aligned tensors and sizes divisible by 16 specializes on
    return {(k,): [["tt.divisibility", 16]] for k, a in enumerate(fn.arg_names)
            if a not in const and (a.endswith("_ptr") or a in ("numel", "nbytes_mask"))}

def ptx(fn, const, xdt, cc, fusion=False, ir="ptx"):
    src = ASTSource(fn=fn, signature=signature(fn, const, xdt), constexprs=dict(const),
                    attrs=attrs(fn, const))
    c = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": 4, "enable_fp_fusion": fusion})
    return c.asm[ir] if ir else c.asm

import inspect

# float min / max by the source line they come from, read off the TTGIR (whose every op
# keeps its location; the PTX's .loc loses some, "file.py:0"): arith.maximumf / minimumf
# (PropagateNan.ALL; max.NaN / min.NaN in the PTX) propagate NaN as the interpreter's NumPy
# and torch do, maxnumf / minnumf (max.f32 / min.f32) drop it
LOCDEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)
MLIR_MINMAX = re.compile(r"arith\.(maximumf|minimumf|maxnumf|minnumf)\b.*\bloc\((.*)\)\s*$")
PTX_NAN = re.compile(r"\b(?:min|max)(?:\.ftz)?\.NaN\.f32\b")

def minmax_sites(ttgir):
    defs = dict(LOCDEF.findall(ttgir))

    def site(loc, depth=0):  # the innermost (callee) file:line of a location
        loc = defs.get(loc, loc)
        m = re.match(r'"([^"]+)":(\d+):\d+', loc)
        if m:
            return f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}"
        m = re.match(r'(?:callsite\(|"[^"]*"\(|fused\[)(#loc\d*|"[^"]+":\d+:\d+)', loc)
        return site(m.group(1), depth + 1) if m and depth < 64 else "?"
    nan, plain = set(), set()
    for line in ttgir.splitlines():
        m = MLIR_MINMAX.search(line)
        if m:
            (nan if m.group(1) in ("maximumf", "minimumf") else plain).add(site(m.group(2)))
    return sorted(nan), sorted(plain)

def with_defaults(fn, const):
    # constexpr parameters a variant leaves out take their defaults, as at a launch (typed
    # as runtime ints they would compile another kernel)
    params = inspect.signature(fn.fn).parameters
    out = {p.name: p.default for p in fn.params if p.is_constexpr and p.name not in const
           and params[p.name].default is not inspect.Parameter.empty}
    return {**out, **const}

report = {"triton": triton.__version__, "kernels": {}}
for cc in (80, 90):
    for name, (fn, variants) in fq.KERNELS.items():
        for i, const in enumerate(variants):
            const = with_defaults(fn, const)
            x_like = X_LIKE & set(fn.arg_names)
            for xdt in (("*fp32", "*bf16") if i == 0 and x_like else ("*fp32",)):
                asm = ptx(fn, const, xdt, cc, ir=None)
                text = asm["ptx"]
                key = f"sm{cc}:{name}[{i}]:{xdt}"
                nan_sites, plain_sites = minmax_sites(asm["ttgir"])
                report["kernels"][key] = {"hazards": sorted(set(HAZARD.findall(text))),
                                          "div_rn": "div.rn.f32" in text,
                                          "div32": len(DIV32.findall(text)),
                                          "mulhi": "mul.hi.u32" in text,
                                          "v4_ld": "ld.global.v4" in text,
                                          "v4_st": "st.global.v4" in text,
                                          "has_ld": "ld.global" in text,
                                          "ptx_nan_minmax": len(PTX_NAN.findall(text)),
                                          "cvt_rni": text.count("cvt.rni.f32.f32"),
                                          "rne_trick": "0f4B000000" in text,
                                          "cvt_bf16": "cvt.rn.bf16" in text,
                                          "bf16_trick": bool(BF16_TRICK.search(text)),
                                          "nan_minmax": nan_sites,
                                          "plain_minmax": plain_sites,
                                          "const": {k: v for k, v in const.items()
                                                    if isinstance(v, (bool, int))}}
    # the check can see the hazard: the LSQ backward (rne(zp + x * inv), EMA-like a + b * c)
    # compiled with fusion on contracts into fma
    fn, variants = fq.KERNELS["_learned_bwd_kernel"]
    report[f"sm{cc}:fusion_on_control"] = sorted(set(HAZARD.findall(ptx(fn, variants[0], "*fp32", cc, True))))
    # the batch-norm reductions' row loops, compiled as a channels_last launch specializes
    # them (channel stride 1, sizes divisible by 16): what one loop iteration executes
    for name in ("_bn_stats_kernel", "_bn_bwd_reduce_kernel"):
        fn, variants = fq.KERNELS[name]
        const = with_defaults(fn, dict(variants[0], s_c=1, s_i=0, inner=1))
        at = {**attrs(fn, const), **{(k,): [["tt.divisibility", 16]]
                                     for k, a in enumerate(fn.arg_names)
                                     if a in ("s_o", "C", "rows")}}
        src = ASTSource(fn=fn, signature=signature(fn, const, "*bf16"), constexprs=const,
                        attrs=at)
        text = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={
            "num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
        loops = [m for m in re.finditer(r"^(\$L__BB\d+_\d+):", text, re.M)
                 if re.search(r"bra(?:\.uni)?\s+" + re.escape(m.group(1)) + ";",
                              text[m.end():])]
        body = text[loops[0].end():] if loops else ""
        back = re.search(r"bra(?:\.uni)?\s+" + re.escape(loops[0].group(1)) + ";", body) \
            if loops else None
        body = body[:back.start()] if back else ""
        report[f"sm{cc}:{name}:loop"] = {
            "found": bool(body), "bar": body.count("bar.sync"), "shfl": body.count("shfl"),
            "v4_ld": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", body)),
            "instr": len(re.findall(r"^\s+[@a-z].*;\s*$", body, re.M))}
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_fake_quant_kernel_compiles_for_sm80_and_sm90(report):
    from gpuquant.backends.triton import fake_quant as fq
    names = {k.split(":")[1].split("[")[0] for k in report["kernels"]}
    assert names == set(fq.KERNELS)
    for cc in (80, 90):
        assert any(k.startswith(f"sm{cc}:") for k in report["kernels"])
    assert all(v["has_ld"] for v in report["kernels"].values())  # real code, not empty


def test_no_fma_contraction_or_approximate_division(report):
    bad = {k: v["hazards"] for k, v in report["kernels"].items() if v["hazards"]}
    assert not bad, f"float hazards in PTX: {bad}"


def test_division_is_correctly_rounded_where_used(report):
    # per-tensor 1/scale and the observer's qparams use div.rn.f32 (IEEE), never div.full
    for k, v in report["kernels"].items():
        if "_observer_update_kernel" in k or ("_fq_fwd_kernel[0]" in k):
            assert v["div_rn"], k


def test_compiled_kernels_round_with_one_instruction(report):
    """Compiled, rounding half to even is ``cvt.rni.f32.f32`` and float32 -> bfloat16 is
    ``cvt.rn.bf16`` (``common.rne`` / ``to_bf16``): one instruction each, where the
    interpreter's emulations (the 2^23 trick, the rounding on the bits) took ~4 and ~6 an
    element. No compiled kernel keeps either emulation."""
    emulated = sorted(k for k, v in report["kernels"].items() if v["rne_trick"] or v["bf16_trick"])
    assert not emulated, emulated
    for cc in (80, 90):
        for name in ("_fq_fwd_kernel[0]", "_observe_fq_kernel[0]", "_learned_bwd_kernel[0]"):
            assert report["kernels"][f"sm{cc}:{name}:*fp32"]["cvt_rni"] > 0, (cc, name)
        for name in ("_fq_fwd_kernel[0]", "_fq_bwd_kernel[0]", "_observe_fq_kernel[0]"):
            assert report["kernels"][f"sm{cc}:{name}:*bf16"]["cvt_bf16"], (cc, name)


def test_hazard_check_detects_fusion(report):
    # with enable_fp_fusion=True the LSQ backward's zp + x * inv becomes an fma: the check
    # above is not vacuous, and launching with fusion off is what keeps it exact
    for cc in (80, 90):
        assert any(h.startswith("fma.rn") for h in report[f"sm{cc}:fusion_on_control"])


def test_per_channel_index_has_no_per_element_division(report):
    # the channel of an element comes from two mul.hi magic-number divisions, not div/rem.s32
    # (~20 instructions each: a bf16 per-channel forward would be compute-bound). One rem.u32
    # is allowed: LLVM's 32-bit fast path of the once-a-program int64 ``base % period``.
    from gpuquant.backends.triton import fake_quant as fq
    variants = fq.KERNELS["_fq_fwd_kernel"][1]
    for cc in (80, 90):
        for i, const in enumerate(variants):
            if const["PER_CHANNEL"] and not const["WIDE"]:
                v = report["kernels"][f"sm{cc}:_fq_fwd_kernel[{i}]:*fp32"]
                if const.get("C_INNER", 0):  # channels_last tile: no channel arithmetic
                    assert not v["mulhi"] and v["div32"] == 0, (i, v)
                else:
                    assert v["mulhi"] and v["div32"] <= 1, (i, v)


def test_batch_norm_reduction_loops_have_no_cross_thread_reduction(report):
    # the QAT layer's statistics and gradient sums accumulate element-wise and reduce once
    # after the row loop: no barrier or shuffle an iteration (an H100 profile had them at
    # 2.3x and 1.6x PyTorch's time with four and two reductions inside the loop), and the
    # channels_last rows load in 16-byte vectors
    for cc in (80, 90):
        for name in ("_bn_stats_kernel", "_bn_bwd_reduce_kernel"):
            loop = report[f"sm{cc}:{name}:loop"]
            assert loop["found"] and loop["bar"] == 0 and loop["shfl"] == 0, (cc, name, loop)
            assert loop["v4_ld"] >= 1, (cc, name, loop)
    # the gradient sums' (first, regular-channel) loop compares z with the forward's mask
    # bounds instead of recomputing the fake quant: ~17 PTX instructions an element (16 a
    # thread an iteration) where the recompute took ~35
    for cc in (80, 90):
        loop = report[f"sm{cc}:_bn_bwd_reduce_kernel:loop"]
        assert loop["instr"] <= 24 * 16, (cc, loop)
    # the statistics loop keeps no NaN test for min / max (a NaN makes the channel's mean
    # NaN): ~15 an element (it was ~18), under the ~16 a bf16 element that the H200's issue
    # rate against its bandwidth allows
    for cc in (80, 90):
        loop = report[f"sm{cc}:_bn_stats_kernel:loop"]
        assert loop["instr"] <= 16 * 16, (cc, loop)


def test_elementwise_kernels_use_128_bit_accesses(report):
    # x, y, grad, grad_x move in 16-byte vectors (the bit mask as a (BLOCK/8, 8) tile keeps
    # the elements contiguous): the memory-bound kernels can reach the bandwidth ceiling
    for k, v in report["kernels"].items():
        if "_fq_fwd_kernel" in k or "_fq_bwd_kernel" in k:
            assert v["v4_ld"] and v["v4_st"], k


_OCCUPANCY_SCRIPT = r'''
import glob, json, os, sys, torch
from gpuquant import backends
from gpuquant.backends.triton import observer as O
from gpuquant.backends.triton.inspect_ptx import cubin_resources
from gpuquant.backends.triton.standin import standin_cuda
from gpuquant.bench.suites.qat_step import qat_qconfig
qc = qat_qconfig()
cl = torch.channels_last
with standin_cuda(cubin=True), backends.use("triton"):
    for dt, add in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)):
        x = torch.randn(8, 64, 32, 32, dtype=dt).contiguous(memory_format=cl).requires_grad_()
        x2 = torch.randn(8, 64, 32, 32, dtype=dt).contiguous(memory_format=cl)
        y = O.observe_fake_quant(x, qc.act_observer(), qc.act_fake_quant(), relu=add,
                                 addend=x2 if add else None)
        assert y is not None
out = {}
for path in glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "*", "*.cubin")):
    for name, res in cubin_resources(path).items():
        out.setdefault(name, []).append(res)
print("JSON" + json.dumps(out))
'''


def test_two_launch_observer_keeps_its_programs_resident(tmp_path):
    """The two-launch observer's partial kernel runs 8 programs of 4 warps a multiprocessor
    (observer._two_launch_programs): all resident at once only at <= 64 registers a thread
    (65536 a multiprocessor); past that a second partial wave of programs doubles its time.
    Compiled for sm_90 as the launch compiles it (the stand-in driver, real ptxas), for
    the activation forms a QAT step takes: bf16 with the residual addend and ReLU, bf16
    and float32 plain."""
    from tests.compiled import run_json
    out = run_json(_OCCUPANCY_SCRIPT, tmp_path / "cache")
    regs = out["_observe_partial_kernel"]
    assert len(regs) == 3, regs
    for r in regs:
        assert r["REG"] <= 64 and r["STACK"] == 0, regs
    assert all(r["STACK"] == 0 for r in out["_observe_fq_kernel"]), out["_observe_fq_kernel"]


def _site(path: str, text: str) -> str:
    """``"file.py:line"`` of the one line of gpuquant/backends/triton/``path`` holding ``text``."""
    lines = (ROOT / "gpuquant" / "backends" / "triton" / path).read_text().splitlines()
    hits = [n + 1 for n, line in enumerate(lines) if text in line]
    assert len(hits) == 1, (path, text, hits)
    return f"{path}:{hits[0]}"


def _nan_propagating_calls() -> set:
    """Every ``"file.py:line"`` of the kernels' sources where a tl.maximum / tl.minimum call
    starts that asks for ``propagate_nan`` (what .loc names for its instruction)."""
    import ast
    out = set()
    for f in (ROOT / "gpuquant" / "backends" / "triton").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("maximum", "minimum")
                    and any(k.arg == "propagate_nan" for k in node.keywords)):
                out.add(f"{f.name}:{node.lineno}")
    return out


def test_maxima_that_must_keep_nan_propagate_it_on_the_gpu(report):
    """The interpreter's maximum / minimum (NumPy's) keep NaN, the GPU's plain max.f32 /
    min.f32 drop it, so CI's interpreter runs cannot see these; checked site by site in
    the compiled IR (a kernel-wide "some max.NaN" would be met by any one of them):
    the batch variance max(var, 0) (a NaN batch: NaN running statistics, not var 0); the
    fold's max(|gamma|, min_gamma) (NaN gamma: a NaN fold); the observer update's MinMax
    combine and qparams (a NaN state, e.g. loaded: it stays NaN, every batch dropped and
    counted, NaN scale, as the definition's torch.min / torch.max give; the plain ones gave a
    fresh range and a scale of eps); LSQ's zero-point clamp (a NaN zero point: NaN outputs
    and scale gradient as the definition, not a zero point of qmin), forward and backward."""
    var = {_site("bn_act.py", "var = tl.maximum(tl.math.div_rn(tl.sum(acc2")}
    fold = {_site("bn_fold.py", "t = tl.math.div_rn(sgn * tl.maximum(tl.abs(g)")}
    obs = lambda t: _site("observer.py", t)  # noqa: E731
    state = {obs("min_neg = tl.minimum(new_min, 0.0"), obs("max_pos = tl.maximum(new_max, 0.0")}
    sym = {obs("max_pos = tl.maximum(-min_neg, max_pos"),
           obs("scale = tl.maximum(max_pos * tl.math.div_rn(1.0, half_range)")}
    asym = {obs("scale = tl.maximum((max_pos - min_neg) * tl.math.div_rn(1.0, qmax - qmin)")}
    minmax = {obs("new_min = tl.minimum(mn, old_min"), obs("new_max = tl.maximum(mx, old_max")}
    lsq_zp = {_site("fake_quant.py", "return tl.minimum(tl.maximum(_rne(zp), qmin")}
    marked = _nan_propagating_calls()
    assert var | fold | state | sym | asym | minmax | lsq_zp <= marked
    checked = {}
    for key, k in report["kernels"].items():
        name, c = key.split(":")[1].split("[")[0], k["const"]
        want = set()
        if name == "_bn_stats_kernel":
            want |= var
        if name == "_fold_fwd_kernel" and c["FOLD"] and not c["FROZEN"]:
            want |= fold
        if name in ("_observer_update_kernel", "_observe_partial_kernel", "_bn_stats_kernel") \
                or (name == "_fold_fwd_kernel" and c["FQ"]):  # _update_state
            want |= state | (sym if c["SYMMETRIC"] else asym)
            if not c["EMA"] and c.get("OBSERVE", True):  # (frozen: min(old, old) folds away)
                want |= minmax
        if (name == "_fq_fwd_kernel" and c["QMODE"] == 1) or \
                (name == "_learned_bwd_kernel" and c["MODE"] == 1):
            want |= lsq_zp
        nan, plain = set(k["nan_minmax"]), set(k["plain_minmax"])
        assert want <= nan, (key, sorted(want - nan))
        # and they reach the PTX as min.NaN / max.NaN (sm_80+), the plain ones as min / max
        assert (k["ptx_nan_minmax"] > 0) == bool(nan), (key, k["ptx_nan_minmax"], nan)
        # no site asking for propagation has a plain min / max (half of a clamp pair)
        assert not marked & plain, (key, sorted(marked & plain))
        if want:
            checked[key] = sorted(want)
    names = {k.split(":")[1].split("[")[0] for k in checked}
    assert names == {"_bn_stats_kernel", "_fold_fwd_kernel", "_observer_update_kernel",
                     "_observe_partial_kernel", "_fq_fwd_kernel", "_learned_bwd_kernel"}, names
    assert len(checked) >= 2 * 24, sorted(checked)
