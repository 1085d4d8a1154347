"""Session fixtures of the deployment tests: calibrated int8 models, built once.

QAT-side work (observers) runs on the reference backend (the Triton interpreter is slow on
CPU for calibration); int8 inference on the NumPy backend (the oracle)."""
import numpy as np
import pytest
import torch

from gpuquant import backends

from deploy_helpers import ZooNet, calibrated, uint8_calibration_qconfig


def _build(make, shape, qconfig=None, batches=2):
    kw = {} if qconfig is None else {"qconfig": qconfig}
    with backends.use("reference"):
        return calibrated(make(), shape, batches=batches, **kw)


@pytest.fixture(scope="session")
def zoo_int8():
    torch.manual_seed(1)
    return _build(ZooNet, (4, 3, 13, 11))


@pytest.fixture(scope="session")
def zoo_uint8():
    torch.manual_seed(2)
    return _build(ZooNet, (4, 3, 13, 11), uint8_calibration_qconfig)


@pytest.fixture(scope="session")
def resnet18_int8():
    from gpuquant.models import resnet18
    torch.manual_seed(3)
    return _build(lambda: resnet18(num_classes=10), (2, 3, 32, 32), batches=1)


@pytest.fixture(scope="session")
def mobilenet_int8():
    from gpuquant.models import mobilenet_v2
    torch.manual_seed(4)
    return _build(lambda: mobilenet_v2(num_classes=10, width_mult=0.5), (2, 3, 32, 32),
                  batches=1)


@pytest.fixture(scope="session")
def digits():
    """A digits net trained briefly in float, PTQ-calibrated, converted: (int8 model,
    x_test, y_test)."""
    pytest.importorskip("sklearn")
    from gpuquant.demo import load_digits_data
    from gpuquant.models import digits_net
    from gpuquant.quantization import calibration_qconfig, quantize, quantize_qat
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_data()
    model = digits_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(4):
            model.train()
            for idx in torch.randperm(len(y_tr), generator=g).split(64):
                loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with backends.use("reference"):
            q = quantize_qat(model.eval(), calibration_qconfig)
            with torch.no_grad():
                for i in range(0, len(y_tr), 256):
                    q(x_tr[i:i + 256])
            qm = quantize(q)
    finally:
        torch.set_num_threads(threads)
    return qm, x_te, y_te


def int8_forward(model, x):
    """gpuquant's int8 output (NumPy backend) as a NumPy array."""
    with backends.use("numpy"), torch.no_grad():
        return model(x).numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
