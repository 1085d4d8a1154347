"""CPU probe (no GPU needed): how many SASS instructions each QAT-family kernel variant
(fake quant forward / backward, LSQ / TQT, the observers, the BN fold and the fused batch
norm) compiles to for sm_90, with bfloat16 activations and gradients, as launched on
aligned tensors (pointers and sizes divisible by 16). ptxas builds the cubin, nvdisasm
lists it (both from the Triton wheel); NOPs are not counted. Elementwise kernels issue-bound
on the GPU scale with this count (bench/README.md NOTES, "Compiled fake-quant kernels round
with one instruction").

    env -u TRITON_INTERPRET python bench/probes/qat_kernel_sass.py [KERNEL ...]

Prints one line a variant: the kernel, its index in ``fake_quant.KERNELS``, the SASS
count, and for the fake-quant forward / backward kernels (8 warps, 4096 elements a program)
the count an element. Compare two checkouts by running it in each.
"""
import inspect
import sys

from gpuquant.backends.triton import fake_quant as fq
from gpuquant.backends.triton import inspect_ptx as ip

X_LIKE = {"x_ptr", "y_ptr", "g_ptr", "gx_ptr", "z_ptr", "gz_ptr", "x2_ptr"}
TYPES = {"mask_ptr": "*u8", "ok_ptr": "*u8", "bad_ptr": "*i64", "nbt_ptr": "*i64",
         "tick_ptr": "*i32"}
FLOAT_SCALARS = {"qmin", "qmax", "grad_factor", "c_ema", "eps", "half_range", "zp_sym",
                 "min_gamma", "momentum", "unbias", "q_eps"}


def signature(fn, const):
    sig = {}
    for a in fn.arg_names:
        if a in const:
            continue
        if a in X_LIKE:
            sig[a] = "*bf16"
        elif a == "wf_ptr" and str(const.get("OUT", "fp32")) != "fp32":
            sig[a] = "*" + str(const["OUT"])
        elif a == "zp_ptr":
            sig[a] = "*fp32" if const.get("QMODE") == 1 or const.get("MODE") == 1 else "*i32"
        elif a in FLOAT_SCALARS:
            sig[a] = "fp32"
        else:
            sig[a] = TYPES.get(a, "*fp32" if a.endswith("_ptr") else "i32")
    return sig


def main(names):
    for name, (fn, variants) in fq.KERNELS.items():
        if names and name not in names:
            continue
        params = inspect.signature(fn.fn).parameters
        for i, const in enumerate(variants):
            const = {**{p.name: p.default for p in fn.params if p.is_constexpr
                        and p.name not in const
                        and params[p.name].default is not inspect.Parameter.empty}, **const}
            sig = signature(fn, const)
            ip._RUNTIME_DIV16[name] = tuple(a for a in ("numel", "nbytes_mask") if a in sig)
            warps = fq.NUM_WARPS if name.startswith("_fq_") else 4
            sass = ip.compile_sass(fn, sig, const, 90, warps, 3)
            if sass is None:
                print("no nvdisasm in this Triton install")
                return 1
            n = ip.sass_instructions(sass)
            per = f"  {n / (const['BLOCK'] / (32 * warps)):.1f} an element" \
                if name.startswith("_fq_") else ""
            print(f"{name}[{i}] {n}{per}")
    return 0


if __name__ == "__main__":
    sys.exit(main(set(sys.argv[1:])))
