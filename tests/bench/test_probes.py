"""The GPU probes the next lease runs start here (imports, arguments), so that a broken
probe does not cost device time; what they compile is checked with the package's kernels
(``tests/backends/test_triton_gemm_sm90.py``)."""
import pytest

from gpuquant.backends.triton import gemm_sm90
from tests.compiled import run_compiled


@pytest.mark.skipif(not gemm_sm90.AVAILABLE, reason="this Triton has no Gluon Hopper dialect")
def test_gluon_probe_starts_and_asks_for_an_sm90_gpu(tmp_path):
    proc = run_compiled(["bench/probes/gluon_int8_wgmma.py", "--shapes", "256x256x256"],
                        tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs an sm_90 GPU" in proc.stdout
