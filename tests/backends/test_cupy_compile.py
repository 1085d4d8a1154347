"""Every ``kernels/*.cu`` compiles with nvcc, without a warning, for each architecture its tier
supports among sm_75, sm_80, sm_86, sm_89 and sm_90 (the table in
:mod:`gpuquant.backends.cupy.dispatch`), and its PTX holds the tier's instructions.

No GPU needed: nvcc builds device code only (``-fatbin``). Skipped, saying so, where nvcc is
not installed.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from gpuquant.backends.cupy import dispatch, loader

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA "
                                "sources were NOT compile-checked in this run")

KDIR = loader.kernels_dir()
SOURCES = sorted(p.name for p in KDIR.glob("*.cu"))
_NAME = re.compile(r"^(gemm|gemv|conv)_(\w+)\.cu$")

# PTX each tier must contain / must not contain.
EXPECT = {
    "dp4a": (["dp4a.s32.s32"], ["mma.sync", "cp.async"]),
    "mma75": (["mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32",
               "ldmatrix.sync.aligned.m8n8.x4.shared.b16"],
              ["cp.async", "m16n8k32"]),
    "mma80": (["mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
               "cp.async.cg.shared.global", "cp.async.wait_group",
               "ldmatrix.sync.aligned.m8n8.x4.shared.b16"], ["m8n8k16"]),
    "sm90": (["mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
              "cp.async.cg.shared.global", "cp.async.wait_group",
              "ldmatrix.sync.aligned.m8n8.x4.shared.b16"], ["m8n8k16"]),
    # one stage of wgmmas in flight (wait_group 1), the proxy fence between the cp.async /
    # st.shared writes and the wgmma reads
    "wgmma": (["wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8",
               "wgmma.wait_group.sync.aligned 1;", "wgmma.fence.sync.aligned",
               "fence.proxy.async.shared::cta", "cp.async.cg.shared.global",
               "cp.async.wait_group"], ["mma.sync", "ldmatrix"]),
}
# No float arithmetic in the integer kernels (so no FMA contraction hazard, contract sec. 4).
FORBIDDEN_EVERYWHERE = ["fma.rn.f32", "div.full.f32", "div.rn.f32", "cvt.rn.f32"]


def _tier(name: str) -> str:
    m = _NAME.match(name)
    assert m, f"kernels/{name}: expected <gemm|gemv|conv>_<tier>.cu"
    assert m.group(2) in dispatch.TIERS, f"kernels/{name}: unknown tier {m.group(2)!r}"
    return m.group(2)


def _nvcc(args, cwd):
    return subprocess.run([NVCC, *args], capture_output=True, text=True, cwd=cwd)


def test_every_tier_has_sources():
    assert SOURCES, f"no CUDA sources in {KDIR}"
    for family in ("gemm", "conv"):
        for tier in dispatch.TIERS:
            assert loader.kernel_file(family, tier) in SOURCES


def test_supported_archs_listed():
    """The nvcc here must know every architecture CI checks; say which one it lacks."""
    r = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True)
    known = set(re.findall(r"compute_(\d+)", r.stdout))
    missing = [a for a in dispatch.CI_ARCHS if str(a) not in known]
    assert not missing, f"this nvcc cannot target sm_{missing} (it lists {sorted(known)})"


# One test (one nvcc call) per source file, so pytest-xdist spreads them over the workers.
@pytest.mark.parametrize("name", SOURCES)
def test_compiles_without_warnings(tmp_path, name):
    archs = dispatch.TIER_BUILD_ARCHS[_tier(name)]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    fat = _nvcc(["-fatbin", "-Werror", "all-warnings", *gencode, "-o",
                 str(tmp_path / (name + ".fatbin")), name], KDIR)
    assert fat.returncode == 0, f"nvcc failed for {name} (sm_{archs}):\n{fat.stderr}"
    assert fat.stderr.strip() == "", f"nvcc printed diagnostics for {name}:\n{fat.stderr}"
    assert (tmp_path / (name + ".fatbin")).stat().st_size > 0


@pytest.mark.parametrize("name", SOURCES)
def test_ptx_uses_the_tier_instructions(tmp_path, name):
    archs = dispatch.TIER_BUILD_ARCHS[_tier(name)]
    ptx_file = tmp_path / (name + ".ptx")
    ptx = _nvcc(["--ptx", f"-arch=sm_{archs[0]}", "-o", str(ptx_file), name], KDIR)
    assert ptx.returncode == 0, ptx.stderr
    text = ptx_file.read_text()
    must, must_not = EXPECT[_tier(name)]
    for ins in must:
        assert ins in text, f"{name} (sm_{archs[0]}): no {ins} in the PTX"
    for ins in must_not + FORBIDDEN_EVERYWHERE:
        assert ins not in text, f"{name} (sm_{archs[0]}): unexpected {ins} in the PTX"
    # stricter than the list: no float instruction of any kind (the kernels are integer
    # through and through, the requantization a 64-bit fixed-point multiply and shifts)
    floats = sorted(set(re.findall(r"\b[a-z][\w.:]*\.f(?:16|32|64)\b", text)))
    assert not floats, f"{name} (sm_{archs[0]}): float instructions in the PTX: {floats[:6]}"


def test_tier_guard_refuses_older_architectures(tmp_path):
    """mma80 / sm90 sources stop with a clear #error below their architecture."""
    for name, arch in (("gemm_mma80.cu", 75), ("conv_sm90.cu", 89), ("gemm_wgmma.cu", 90),
                       ("conv_wgmma.cu", 89)):
        r = _nvcc(["--ptx", f"-arch=sm_{arch}", "-o", str(tmp_path / "x.ptx"), name], KDIR)
        assert r.returncode != 0 and "needs sm_" in r.stderr, r.stderr



def test_wgmma_guard_names_flags_that_build_it(tmp_path):
    """The wgmma sources' #error names the nvcc flags to build them with; those flags build
    them. (``-arch=sm_90a``, which it named before, also runs a compute_90 pass under CUDA
    13's nvcc, where the guard fires: following the advice failed.)"""
    for name in ("gemm_wgmma.cu", "conv_wgmma.cu"):
        r = _nvcc(["--ptx", "-arch=sm_89", "-o", str(tmp_path / "x.ptx"), name], KDIR)
        m = re.search(r"\((?:nvcc|compile with) ([^)]*)\)", r.stderr)
        assert r.returncode != 0 and m, r.stderr
        ok = _nvcc([*m.group(1).split(), "-c", "-o", str(tmp_path / "x.o"), name], KDIR)
        assert ok.returncode == 0, f"nvcc {m.group(1)} {name}:\n{ok.stderr}"


def test_nvrtc_source_assembly_compiles(tmp_path):
    """The include-expanded text the loader hands NVRTC is itself a valid translation unit."""
    src = tmp_path / "assembled_conv_mma80.cu"
    src.write_text(loader.source("conv_mma80.cu"))
    assert '#include "' not in src.read_text()
    r = _nvcc(["--ptx", "-arch=sm_80", "-Werror", "all-warnings", "-o", str(tmp_path / "a.ptx"),
               str(src)], tmp_path)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
