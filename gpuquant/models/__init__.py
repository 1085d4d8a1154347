"""Reference networks built from :mod:`gpuquant.nn` (float; convert with
``quantize_qat`` / ``quantize``): torchvision's ResNet-18, ResNet-50, MobileNetV2 and
MobileNetV3 (Large, Small) architectures with the same parameter counts, and the digits
demo's small network."""
import torch

from .digits import DigitsNet, digits_net
from .mobilenet import MobileNetV2, mobilenet_v2
from .mobilenet_v3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from .resnet import ResNet, resnet18, resnet50

__all__ = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
           "digits_net", "ResNet", "MobileNetV2", "MobileNetV3", "DigitsNet", "settle_bn"]
# the functions that build a network (what gpuquant.save(arch=...) may name)
_BUILDERS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large",
             "mobilenet_v3_small", "digits_net")


def settle_bn(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Real BatchNorm running statistics for a freshly initialised network (whose activations
    otherwise vanish in eval mode): one training-mode pass on ``x`` without gradients, every
    BatchNorm at momentum 1, then its own momentum again (it set 0.1, torch's default,
    before: a MobileNetV3's 0.01 was lost).

    Args:
        model: any module (its BatchNorms are ``torch.nn.modules.batchnorm._BatchNorm``).
        x: a batch of inputs (more than one sample).

    Returns:
        ``model``, left in training mode.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"settle_bn: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"settle_bn: x must be a tensor (a batch of inputs), got "
                        f"{type(x).__name__}")
    bns = {m: m.momentum for m in model.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    for m in bns:
        m.momentum = 1.0
    try:
        with torch.no_grad():
            model.train()(x)
    finally:
        for m, momentum in bns.items():
            m.momentum = momentum
    return model
