"""Run the real Triton JIT / autotune launch path on the CPU: compile for sm_90 (PTX, no cubin),
launch into a recorder. Must run with TRITON_INTERPRET unset."""
import contextlib, time, os, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as _drv


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return ("module", 1, 64, 0, 1024)

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}


class FakeCuda:
    def __init__(self, cc=90):
        self.cc = cc
        self.launches = []
        self.utils = _Utils()
        fake = self

        class Launcher:
            def __init__(self, src, metadata):
                self.name = src.fn.__name__ if hasattr(src, "fn") else str(src)

            def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                         enter_hook, exit_hook, *args):
                fake.launches.append((self.name, (gx, gy, gz), args))
        self.launcher_cls = Launcher

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.cc, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kw):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(16)

    def clear_cache(self, cache):
        pass


@contextlib.contextmanager
def fake_cuda(cc=90, family="sm90"):
    from triton.backends.nvidia.compiler import CUDABackend
    from gpuquant.backends.triton import common
    real = CUDABackend.make_cubin
    CUDABackend.make_cubin = lambda self, src, metadata, *a, **k: b""
    fake = FakeCuda(cc)
    _drv.set_active(fake)
    old_af = common.arch_family
    try:
        yield fake
    finally:
        _drv.reset_active() if _drv._default is not None else setattr(_drv, "_active", None)
        CUDABackend.make_cubin = real
