"""Compile the inference kernels for a GPU target without a GPU and read their PTX.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) on a machine with no device, so CI can
check what the GPU will execute: which tensor-core instruction each GEMM / conv autotune
config uses, and that no unintended ``fma.rn.f32`` / ``div.full.f32`` appears. Must run
with ``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` kernels)::

    env -u TRITON_INTERPRET python -m gpuquant.backends.triton.inspect_ptx 80 90
"""
from __future__ import annotations

import contextlib
import inspect as inspect_mod
import json
import re
import sys
from typing import Optional

from .common import triton_cache_dir

__all__ = ["compile_ptx", "compile_gluon", "wgmma_facts", "compile_sass", "sass_instructions",
           "epilogue_cost", "cubin_resources", "kernel_variants", "inspect",
           "MMA_RE", "FLOAT_HAZARD_RE"]

MMA_RE = re.compile(r"\b((?:wgmma\.mma_async|mma\.sync)[\w.]*)")
FLOAT_HAZARD_RE = re.compile(r"\b(fma\.rn\.f32|div\.full\.f32|div\.approx\.f32)")

FAMILY_OF_CC = {80: "sm80", 86: "sm80", 89: "sm89", 90: "sm90"}


# What the launcher's JIT specializes at run time for the usual (aligned) shapes: integer
# arguments equal to 1 become constants, pointers and integers divisible by 16 carry that
# fact (vectorized 16-byte cp.async loads instead of byte loads). Compiling with the same
# facts makes the inspected PTX the one that runs on channels_last tensors with C % 16 == 0.
_RUNTIME_ONES = {"_qgemm_kernel": ("stride_xk", "stride_wk"),
                 "_qdepthwise_kernel": ("stride_xc", "CH_MULT"),
                 "_linear_weight_only_kernel": ("stride_ak", "stride_bk", "stride_cn")}
_RUNTIME_DIV16 = {
    "_qgemm_kernel": ("N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_rm"),
    "_qconv_kernel": ("N", "K", "Cg", "stride_xn", "stride_xh", "stride_xw", "stride_wo",
                      "stride_ym", "stride_rm"),
    "_qdepthwise_kernel": ("O", "stride_xn", "stride_xh", "stride_xw", "stride_ym",
                           "stride_rm"),
    "_quantize_kernel": ("numel",), "_add_kernel": ("numel",), "_im2col_kernel": ("Kp",),
    "_linear_weight_only_kernel": ("N", "K", "stride_am", "stride_bn", "stride_cm"),
    "_qconv_sm90_kernel": ("N", "C", "stride_xn", "stride_xh", "stride_xw", "stride_ym",
                           "stride_rm")}


def compile_ptx(fn, signature: dict, constexprs: dict, cc: int, num_warps: int = 4,
                num_stages: int = 3, enable_fp_fusion: bool = False,
                runtime_specialization: bool = True) -> str:
    """PTX of the jitted ``fn`` for ``sm_<cc>`` with the given signature / constexprs (plus,
    by default, the launcher's run-time specializations for aligned shapes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(fn, "arg_names"):
        raise TypeError("compile_ptx needs a @triton.jit function; unset TRITON_INTERPRET")
    constexprs = dict(constexprs)
    for pname, par in inspect_mod.signature(fn.fn).parameters.items():
        if par.default is not inspect_mod.Parameter.empty and pname not in signature:
            constexprs.setdefault(pname, par.default)  # constexpr defaults (RES_MODE=0...)
    attrs = {}
    if runtime_specialization:
        name = fn.__name__
        for a in _RUNTIME_ONES.get(name, ()):
            constexprs.setdefault(a, 1)
        for a, ty in signature.items():
            if a not in constexprs and (ty.startswith("*") or a in _RUNTIME_DIV16.get(name, ())):
                attrs[(fn.arg_names.index(a),)] = [["tt.divisibility", 16]]
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    with _no_cubin():
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages,
                                           "enable_fp_fusion": enable_fp_fusion})
    return compiled.asm["ptx"]


def wgmma_facts(ptx: str) -> dict:
    """What a Hopper GEMM's PTX says of its main loop: the distinct ``wgmma.mma_async``
    instructions, the distinct ``wgmma.wait_group`` counts (1: one group kept in flight; 0
    only: the tensor cores drain every step) and whether it copies with TMA."""
    return {"mma": sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx))),
            "waits": sorted({int(w) for w in re.findall(
                r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}),
            "tma": "cp.async.bulk.tensor" in ptx}


def compile_gluon(fn, signature: dict, constexprs: dict, cc: int = 90, num_warps: int = 4,
                  cubin: bool = False):
    """The compiled ``@gluon.jit`` kernel ``fn`` for ``sm_<cc>`` (``.asm["ptx"]``, with
    ``cubin`` the ptxas output too, ``.asm["cubin"]``; ``.metadata.shared``: its shared
    memory), from ``signature`` and ``constexprs`` as the kernel's own helper gives them
    (e.g. :func:`.gemm_sm90.signature`). Gluon kernels have no interpreter: this is how CI
    checks them. Compiled without FMA contraction, as they are launched."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if not hasattr(fn, "arg_names"):
        raise TypeError("compile_gluon needs a @gluon.jit function; unset TRITON_INTERPRET")
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    # the launcher's 16-divisibility of pointers and aligned sizes, for the kernels that
    # gather with cp.async (its vector width follows from it; TMA's does not)
    div16 = _RUNTIME_DIV16.get(fn.__name__)
    attrs = {} if div16 is None else {
        (fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, ty in signature.items()
        if ty.startswith("*") or a in div16}
    src = GluonASTSource(fn, sig, dict(constexprs), attrs)
    opts = {"num_warps": num_warps, "enable_fp_fusion": False}
    target = GPUTarget("cuda", cc, 32)
    if not cubin:
        with _no_cubin():
            return triton.compile(src, target=target, options=opts)
    with tempfile.TemporaryDirectory() as d, triton_cache_dir(d):  # a real cubin: its own cache
        return triton.compile(src, target=target, options=opts)


def compile_sass(fn, signature: dict, constexprs: dict, cc: int, num_warps: int = 4,
                 num_stages: int = 3):
    """The SASS (``nvdisasm`` of the cubin ``ptxas`` builds) of the jitted ``fn`` for
    ``sm_<cc>``, with the launcher's run-time specializations; None when this Triton
    install has no ``nvdisasm``. Used to count register spills (``STL`` / ``LDL``)."""
    import os
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "nvdisasm")
    if not os.path.exists(tool):
        return None
    got = {}
    real = triton.compile

    def keep(src, target=None, options=None):
        got["k"] = real(src, target=target, options=options)
        return got["k"]
    triton.compile = keep
    with tempfile.TemporaryDirectory() as d:
        try:  # a cache of its own, as every compile here that builds a real cubin
            with triton_cache_dir(os.path.join(d, "cache")), _cubin_too():
                compile_ptx(fn, signature, constexprs, cc, num_warps, num_stages)
        finally:
            triton.compile = real
        cubin = got["k"].asm["cubin"]
        if not cubin:
            raise RuntimeError("compile_sass: ptxas produced no cubin")
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True,
                              check=True).stdout


def sass_instructions(sass: str) -> int:
    """How many SASS instructions a ``compile_sass`` listing holds (NOPs left out)."""
    return sum(1 for line in sass.splitlines()
               if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line) and "NOP" not in line)


def epilogue_cost(cc: int = 90) -> Optional[dict]:
    """SASS instructions an output of the GEMM kernel on a 128x128 tile of 8 warps with
    K = 64 (one K step: the whole kernel is about the epilogue, as in resnet50's layer1
    1x1 convolutions), in the forms resnet50's layers run: the folded requantization of a
    ReLU layer (``RQ_MODE`` 3) and of a block's last conv with its residual add fused
    (``RQ_MODE`` 2, ``RES_MODE`` 11). None without ``nvdisasm``."""
    from . import gemm
    out = {}
    for name, extra in (("relu", {"HAS_RES": False, "RQ_MODE": gemm.RQ_FOLDED_RELU}),
                        ("residual", {"HAS_RES": True, "RES_MODE": 11,
                                      "RQ_MODE": gemm.RQ_FOLDED})):
        const = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": 1,
                 "X_UINT8": False, "OUT_MODE": 0, "EVEN_K": True, "PERSISTENT": 0, **extra}
        sass = compile_sass(gemm._qgemm_kernel, _gemm_sig(folded=True), const, cc, 8, 2)
        if sass is None:
            return None
        out[name] = round(sass_instructions(sass) / (128 * 128 / 256), 2)
    return out


def cubin_resources(path) -> dict:
    """{kernel name: {"REG": registers a thread, "STACK": bytes, "SHARED": bytes, ...}} of a
    cubin, from ``cuobjdump -res-usage`` (shipped with Triton's NVIDIA backend): what
    decides how many programs a multiprocessor holds at once."""
    import os
    import subprocess

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    text = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True,
                          check=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
    return out


_BUILD_CUBIN = [False]


@contextlib.contextmanager
def _cubin_too():
    _BUILD_CUBIN[0] = True
    try:
        yield
    finally:
        _BUILD_CUBIN[0] = False


_PTX_ONLY_CACHE: list = []  # this process's cache directory for PTX-only compiles


def _ptx_only_cache() -> str:
    """A private Triton cache directory for this process's PTX-only compiles (removed at
    exit). Their empty cubins may sit under the key a launch of the same kernel computes
    (the Gluon conv's compile carries the launcher's specialization on purpose; not
    compared), so in a real cache, e.g. ``--compile-only`` on a machine with a GPU, a later
    launch could load one."""
    if not _PTX_ONLY_CACHE:
        import atexit
        import shutil
        import tempfile
        d = tempfile.mkdtemp(prefix="gpuquant-ptx-only-")
        atexit.register(shutil.rmtree, d, True)
        _PTX_ONLY_CACHE.append(d)
    return _PTX_ONLY_CACHE[0]


@contextlib.contextmanager
def _no_cubin():
    """Stop after PTX: ptxas (the cubin stage) is most of the compile time and the PTX is
    what is checked. The kernels compiled here are inspected, never launched; their empty
    cubins go to a cache of this process's own (:func:`_ptx_only_cache`)."""
    from triton.backends.nvidia.compiler import CUDABackend
    if _BUILD_CUBIN[0]:  # compile_sass: the real cubin
        yield
        return
    real = CUDABackend.make_cubin
    CUDABackend.make_cubin = lambda self, src, metadata, *args, **kw: b""
    try:
        with triton_cache_dir(_ptx_only_cache()):
            yield
    finally:
        CUDABackend.make_cubin = real


_EPI_PTRS = {"BIAS": "*i32", "MULT": "*i32", "RSHIFT": "*i32", "EPI": "*i64"}
# the folded requantization's (RQ_MODE 2 and 3, gemm.epilogue_tensors): int64 bias addends
# and packed shifts
_FOLDED_PTRS = {**_EPI_PTRS, "BIAS": "*i64", "RSHIFT": "*i64"}


def _gemm_sig(x="*i8", y="*i8", res="*i8", bias="*i32", folded=False):
    s = {"X": x, "W": "*i8", **(_FOLDED_PTRS if folded else _EPI_PTRS), "RES": res, "Y": y}
    if not folded:
        s["BIAS"] = bias
    s.update({k: "i32" for k in ("M", "N", "K", "stride_xm", "stride_xk", "stride_wn",
                                   "stride_wk", "stride_ym", "stride_rm")})
    s["deq_scale"] = "fp32"
    return s


def _conv_sig(x="*i8", y="*i8", res="*i8", folded=False):
    s = {"X": x, "W": "*i8", **(_FOLDED_PTRS if folded else _EPI_PTRS), "RES": res, "Y": y}
    s.update({k: "i32" for k in ("M", "N", "K", "H", "W_in", "Ho", "Wo", "Cg", "stride_h",
                                   "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "stride_xn",
                                   "stride_xh", "stride_xw", "stride_wo", "stride_ym",
                                   "stride_rm", "x_zp")})
    s["deq_scale"] = "fp32"
    return s


def kernel_variants(cc: int, all_configs: bool = True, ci: bool = False):
    """(name, fn, signature, constexprs, num_warps, num_stages, expect_mma) to compile for
    ``sm_<cc>``: every autotune config of the GEMM and conv kernels in their main form
    (int8 in / out, the folded requantization of a ReLU layer), plus one config of each
    epilogue variant (the folded form without ReLU, the general form with the left shift,
    an int64 bias, float and int32 outputs, residual adds) and the CUDA-core kernels.

    ``ci``: the conv configs are compiled with a 1x1 filter (the same tap-loop code and
    instruction selection as 3x3, without the 9x unrolling that makes a 3x3 compile take
    ~5 s of CPU) and the costly residual variants only once; the full set is the CLI's.
    """
    from . import conv, depthwise, elementwise, gemm

    fam = FAMILY_OF_CC.get(cc, "generic")
    out = []

    def cfg_of(c):
        return dict(c.kwargs), c.num_warps, c.num_stages

    allg = gemm.gemm_configs(fam)
    gcfgs = [c for c in allg if c.kwargs["EPI_SPLIT"] == 1]
    for i, c in enumerate(gcfgs if all_configs else gcfgs[:1]):
        meta, nw, ns = cfg_of(c)
        out.append((f"gemm[{i}:{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}]",
                    gemm._qgemm_kernel, _gemm_sig(folded=True),
                    {**meta, "X_UINT8": False, "OUT_MODE": 0, "HAS_RES": False,
                     "EVEN_K": True, "RQ_MODE": gemm.RQ_FOLDED_RELU}, nw, ns, True))
    split = [c for c in allg if c.kwargs["EPI_SPLIT"] == 2]
    if split:  # the requantizing epilogue in two column halves
        meta, nw, ns = cfg_of(split[0])
        out.append(("gemm_epi_split", gemm._qgemm_kernel, _gemm_sig(folded=True),
                    {**meta, "X_UINT8": False, "OUT_MODE": 0, "HAS_RES": False,
                     "EVEN_K": True, "RQ_MODE": gemm.RQ_FOLDED_RELU}, nw, ns, True))
    # the first tile fitted to a 64-long reduction (the 1x1 convolutions of a ResNet)
    meta, nw, ns = cfg_of(gemm.fit_k(gcfgs[:1], 64)[0])
    out.append(("gemm_fit_k64", gemm._qgemm_kernel, _gemm_sig(folded=True),
                {**meta, "X_UINT8": False, "OUT_MODE": 0, "HAS_RES": False, "EVEN_K": True,
                 "RQ_MODE": gemm.RQ_FOLDED}, nw, ns, True))
    meta, nw, ns = cfg_of(gcfgs[0])
    variants = (
            ("gemm_uint8_residual_bias64",
             _gemm_sig(x="*u8", y="*u8", res="*u8", bias="*i64"),
             {"X_UINT8": True, "OUT_MODE": 0, "HAS_RES": True, "EVEN_K": False,
              "RES_MODE": 1}),
            ("gemm_float_out", _gemm_sig(y="*fp32", folded=True),
             {"X_UINT8": False, "OUT_MODE": 1, "HAS_RES": False, "EVEN_K": True,
              "RQ_MODE": gemm.RQ_FOLDED}),
            ("gemm_int32_out", _gemm_sig(y="*i32"),
             {"X_UINT8": False, "OUT_MODE": 2, "HAS_RES": False, "EVEN_K": True}))
    # ci: the float-out epilogue on every target, the residual + uint8 one on sm_80 only
    chosen = variants if not ci else (variants[:2] if cc < 90 else variants[1:2])
    for name, sig, extra in chosen:
        out.append((name, gemm._qgemm_kernel, sig, {**meta, **extra}, nw, ns, True))

    # every tile in the unrolled tap-loop form, the first one also as the pipelined loop
    # (3x3: one loop over taps; its MMA selection is the same for every tile)
    ccfgs = [c for c in conv.conv_configs(fam)
             if not c.kwargs["PIPE_TAPS"] and c.kwargs["EPI_SPLIT"] == 1]
    for i, c in enumerate(ccfgs if all_configs else ccfgs[:1]):
        meta, nw, ns = cfg_of(c)
        ksz = 1 if ci else 3
        out.append((f"conv{ksz}x{ksz}[{i}:{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}]",
                    conv._qconv_kernel, _conv_sig(folded=True),
                    {**meta, "KH": ksz, "KW": ksz, "FLAT_K": False, "EVEN_C": True, "ZP_ZERO": True,
                     "X_UINT8": False, "OUT_MODE": 0, "HAS_RES": False,
                     "RQ_MODE": gemm.RQ_FOLDED_RELU}, nw, ns, True))
    meta, nw, ns = cfg_of(ccfgs[0])
    out.append(("conv3x3_pipelined_taps", conv._qconv_kernel, _conv_sig(folded=True),
                {**meta, "PIPE_TAPS": True, "KH": 3, "KW": 3, "FLAT_K": False, "EVEN_C": True,
                 "ZP_ZERO": True, "X_UINT8": False, "OUT_MODE": 0, "HAS_RES": False,
                 "RQ_MODE": gemm.RQ_FOLDED_RELU}, nw, ns, True))
    out.append(("conv7x7_flatk_uint8_float_out", conv._qconv_kernel,
                _conv_sig(x="*u8", y="*fp32"),
                {**meta, "KH": 7, "KW": 7, "FLAT_K": True, "EVEN_C": False, "ZP_ZERO": False,
                 "X_UINT8": True,
                 "OUT_MODE": 1, "HAS_RES": False}, nw, ns, True))
    if not ci:
        out.append(("conv3x3_residual", conv._qconv_kernel, _conv_sig(folded=True),
                    {**meta, "KH": 3, "KW": 3, "FLAT_K": False, "EVEN_C": False,
                     "ZP_ZERO": False, "X_UINT8": False, "OUT_MODE": 0, "HAS_RES": True,
                     "RES_MODE": 11, "RQ_MODE": gemm.RQ_FOLDED},
                    nw, ns, True))

    isig = {"X": "*u8", "A": "*u8"}
    isig.update({k: "i32" for k in ("m0", "M", "K", "Kp", "H", "W_in", "Ho", "Wo", "stride_h",
                                      "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                                      "stride_xn", "stride_xh", "stride_xw", "x_zp")})
    out.append(("im2col_stem", conv._im2col_kernel, isig,
                {"CG": 3, "KW": 7, "BLOCK_M": conv.IM2COL_TILE[0],
                 "BLOCK_K": conv.IM2COL_TILE[1]}, 4, 1, False))
    dsig = {"X": "*i8", "W": "*i8", **_FOLDED_PTRS, "RES": "*i8", "Y": "*i8"}
    dsig.update({k: "i32" for k in ("M", "O", "H", "W_in", "Ho", "Wo", "CH_MULT", "stride_h",
                                      "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                                      "stride_xn", "stride_xh", "stride_xw", "stride_xc",
                                      "stride_ym", "stride_rm", "x_zp")})
    dsig["deq_scale"] = "fp32"
    dc = depthwise.depthwise_configs(fam)[0]
    out.append(("depthwise3x3", depthwise._qdepthwise_kernel, dsig,
                {**dc.kwargs, "KH": 3, "KW": 3, "OUT_MODE": 0, "HAS_RES": False,
                 "RQ_MODE": gemm.RQ_FOLDED_RELU}, dc.num_warps, 2, False))
    qsig = {"X": "*fp32", "INV": "*fp32", "ZP": "*i32", "Y": "*i8", "numel": "i32",
            "stride_c": "i32", "C": "i32", "qmin": "i32", "qmax": "i32"}
    out.append(("quantize", elementwise._quantize_kernel, qsig,
                {"PER_CHANNEL": True, "BLOCK": 1024}, 4, 2, False))
    asig = {"A": "*i8", "B": "*i8", "EPI": "*i64", "Y": "*i8", "numel": "i32"}
    out.append(("add", elementwise._add_kernel, asig, {"BLOCK": 1024, "MODE": 11}, 4, 2,
                False))
    gsig = {"X": "*i8", "IH": "*i64", "IW": "*i64", "Y": "*i8"}
    gsig.update({k: "i32" for k in ("M", "C", "OH", "OW", "stride_xn", "stride_xc",
                                      "stride_xh", "stride_xw")})
    out.append(("gather_hw", elementwise._gather_hw_kernel, gsig,
                {"BLOCK_M": 32, "BLOCK_C": 128}, 4, 2, False))
    lsig = {"X": "*i8", "T": "*i8", "Y": "*i8", "numel": "i32"}
    out.append(("lookup", elementwise._lookup_kernel, lsig, {"OFFSET": 128, "BLOCK": 1024}, 4,
                2, False))
    return out


# the folded requantization's multiply-adds (.fixed_point.mad_wide): inline PTX blocks
# (LLVM's own mad.wide.s32 computes addresses)
MAD_WIDE_RE = re.compile(r"// begin inline asm\n(?:\s*\.loc[^\n]*\n)?\s*mad\.wide\.s32")


def inspect(cc: int, all_configs: bool = True, ci: bool = False) -> dict:
    """Per kernel variant: the MMA instructions, float hazards and (for the folded
    requantization's variants) ``mad.wide.s32`` count in its PTX for sm_<cc>."""
    report = {}
    for name, fn, sig, const, nw, ns, expect_mma in kernel_variants(cc, all_configs, ci):
        ptx = compile_ptx(fn, sig, const, cc, nw, ns, enable_fp_fusion=False)
        report[name] = {"mma": sorted(set(MMA_RE.findall(ptx))),
                        "float_hazards": sorted(set(FLOAT_HAZARD_RE.findall(ptx))),
                        "expect_mma": expect_mma, "num_warps": nw, "num_stages": ns,
                        "folded": bool(const.get("RQ_MODE", 0) >= 2 or const.get("MODE", 0) > 0
                                       or (const.get("HAS_RES") and const.get("RES_MODE", 0))),
                        "mad_wide": len(MAD_WIDE_RE.findall(ptx))}
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quick, ci = "--quick" in argv, "--ci" in argv
    ccs = [int(a) for a in argv if not a.startswith("--")] or [80, 90]
    print(json.dumps({str(cc): inspect(cc, all_configs=not quick, ci=ci) for cc in ccs},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
