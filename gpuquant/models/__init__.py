"""Reference networks built from :mod:`gpuquant.nn` (float; convert with
``quantize_qat`` / ``quantize``): torchvision's ResNet-18, ResNet-50 and MobileNetV2
architectures with the same parameter counts, and the digits demo's small network."""
from .digits import DigitsNet, digits_net
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet50

__all__ = ["resnet18", "resnet50", "mobilenet_v2", "digits_net", "ResNet", "MobileNetV2",
           "DigitsNet"]
