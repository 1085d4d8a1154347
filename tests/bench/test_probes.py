"""The GPU probes the next lease runs: each must at least compile here, so that a broken
probe does not cost device time."""
import importlib.util

import pytest

from tests.compiled import run_compiled


def _has_gluon_hopper() -> bool:
    try:
        return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") \
            is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _has_gluon_hopper(), reason="this Triton has no Gluon Hopper dialect")
def test_gluon_int8_probe_keeps_a_wgmma_in_flight_on_sm90(tmp_path):
    """bench/probes/gluon_int8_wgmma.py compiles every config for sm_90 without a GPU, and
    each one's PTX has the int8 wgmma (s32 += s8 x s8), TMA copies and a ``wait_group 1``:
    one MMA group kept in flight, which Triton's tl.dot never does for int8."""
    proc = run_compiled(["bench/probes/gluon_int8_wgmma.py", "--compile-only"], tmp_path,
                        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("(")]
    assert len(rows) >= 5
    for ln in rows:
        assert ".s32.s8.s8" in ln and "wait_group [0, 1]" in ln and "TMA True" in ln, ln
