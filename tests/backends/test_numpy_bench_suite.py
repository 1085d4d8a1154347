"""The `cpu` benchmark suite's providers on tiny shapes: every provider runs, and the
gpuquant-numpy output equals the reference backend (its exact_vs_numpy check)."""
import numpy as np
import pytest
import torch

from gpuquant.bench.harness import ProviderUnavailable
from gpuquant.bench.suites import cpu

# torch-fbgemm (the comparison provider) builds PyTorch's deprecated quantized tensors
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def _run_all(providers, inp):
    outs = {}
    for name, prov in providers.items():
        try:
            fn = prov.setup(inp)
        except ProviderUnavailable:
            continue
        outs[name] = fn()
        if prov.check is not None:
            assert prov.check(inp, outs[name]) is True, name
    return outs


def test_linear_providers_tiny():
    inp = cpu._linear(3, 40, 9)
    outs = _run_all(cpu._linear_providers(), inp)
    assert {"gpuquant-numpy", "numpy-float32", "torch-float32"} <= set(outs)
    # the int8 result dequantized is close to the float layer (one output step = s_y)
    y = outs["gpuquant-numpy"].float() * inp["sy"]
    yf = torch.relu(torch.from_numpy(np.asarray(outs["numpy-float32"])))
    assert float((y - yf).abs().max()) <= 2 * inp["sy"]


@pytest.mark.parametrize("first", [True, False])
def test_conv_providers_tiny(first):
    cin = 3 if first else 8
    inp = {"layers": [cpu._layer(cin, 6, 3, 2, 9, 2, first=first)]}
    outs = _run_all(cpu._conv_providers(), inp)
    assert {"gpuquant-numpy", "numpy-float32", "torch-float32"} <= set(outs)
    d = inp["layers"][0]
    y = outs["gpuquant-numpy"][0].float() * d["sy"]
    yf = torch.relu(torch.from_numpy(np.asarray(outs["numpy-float32"][0])).permute(0, 3, 1, 2))
    assert float((y - yf).abs().max()) <= 2 * d["sy"]


def test_quick_cases_are_a_subset():
    quick = {c.name for c in cpu._cases(True, "cpu")}
    full = {c.name for c in cpu._cases(False, "cpu")}
    assert quick < full and any("all" in n for n in quick) and len(quick) == 9
