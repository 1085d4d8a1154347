"""GPUQUANT_TRITON_TUNE: every autotune config by default, the first / middle / last of each
list with "quick" (what the GPU-lease runner sets), an error for anything else."""
import pytest

pytest.importorskip("triton")

from gpuquant.backends.triton import common, conv, depthwise, gemm  # noqa: E402


@pytest.mark.parametrize("family", ["sm80", "sm89", "sm90"])
def test_quick_tuning_keeps_large_middle_and_small_tiles(family, monkeypatch):
    monkeypatch.delenv("GPUQUANT_TRITON_TUNE", raising=False)
    full = [c.kwargs for c in gemm.gemm_configs(family)]
    full_conv = [c.kwargs for c in conv.conv_configs(family)]
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "quick")
    quick = [c.kwargs for c in gemm.gemm_configs(family)]
    assert quick == [full[0], full[len(full) // 2], full[-1]]
    assert [c.kwargs for c in conv.conv_configs(family)] == [
        full_conv[0], full_conv[len(full_conv) // 2], full_conv[-1]]
    assert len(depthwise.depthwise_configs(family)) == 3
    assert len(gemm.gemm_configs("interpret")) == 1  # the interpreter's one tile either way


def test_bad_tune_mode_is_refused(monkeypatch):
    monkeypatch.setenv("GPUQUANT_TRITON_TUNE", "fastest")
    with pytest.raises(ValueError, match=r"GPUQUANT_TRITON_TUNE must be one of \('full', 'quick'\), "
                                         r"got 'fastest'"):
        common.tune_subset([1, 2, 3, 4])


@pytest.mark.parametrize("cc,family", [((8, 0), "sm80"), ((8, 6), "sm89"), ((8, 9), "sm89"),
                                       ((9, 0), "sm90"), ((7, 5), "generic"),
                                       ((12, 0), "generic")])
def test_arch_family_from_capability_cached_per_device(cc, family, monkeypatch):
    import torch
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "_FAMILY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cc)
    assert common.arch_family(torch.device("cuda", 0)) == family
    # read once per device: a later capability change is not seen for cuda:0 ...
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert common.arch_family(torch.device("cuda", 0)) == family
    # ... while "the current device" (no index) is asked every time
    assert common.arch_family(torch.device("cuda")) == "sm90"
    assert common.arch_family(torch.device("cpu")) == "interpret"
