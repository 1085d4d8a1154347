"""Quantization-aware training and calibration: observers, fake quantization, QConfig.

See :mod:`.observer`, :mod:`.fake_quant` and :mod:`.qconfig` for the conventions and the
decisions behind the presets.
"""
from .fake_quant import (LSQ, TQT, FakeQuantBase, FakeQuantize, apply_fake_quant_with_observer,
                         lsq_fake_quant, tqt_fake_quant)
from .observer import (ExponentialMovingAverageObserver, HistogramObserver, MinMaxObserver,
                       Observer, PassiveObserver, SyncExponentialMovingAverageObserver,
                       SyncMinMaxObserver, qparams_from_min_max)
from .qconfig import (QConfig, calibration_qconfig, ema_fakequant_qconfig,
                      ema_lowbit_fakequant_qconfig, lsq_qconfig, min_max_fakequant_qconfig,
                      passive_qconfig, sync_ema_fakequant_qconfig, tqt_qconfig)
from .quantize import (disable_fake_quant, disable_observer, enable_fake_quant, enable_observer,
                       freeze_bn_stats, get_qat_mapping, get_quantized_mapping, propagate_qconfig, quantize,
                       quantize_qat, reset_qconfig, set_bn_fold)
from .dynamic import prepare_dynamic_qat, quantize_dynamic
from .epilogue import fuse_epilogues, unfuse_epilogues
from .smoothquant import calibrate_linear_inputs, quantize_static_linear, smooth_quant
from .fx import disable_quantize, prepare_plain

__all__ = [
    # qconfig
    "QConfig", "min_max_fakequant_qconfig", "ema_fakequant_qconfig", "sync_ema_fakequant_qconfig",
    "ema_lowbit_fakequant_qconfig", "calibration_qconfig", "tqt_qconfig", "lsq_qconfig",
    "passive_qconfig",
    # observers
    "Observer", "MinMaxObserver", "ExponentialMovingAverageObserver", "HistogramObserver",
    "PassiveObserver", "SyncMinMaxObserver", "SyncExponentialMovingAverageObserver",
    "qparams_from_min_max",
    # fake quant
    "FakeQuantBase", "FakeQuantize", "LSQ", "TQT", "apply_fake_quant_with_observer",
    "lsq_fake_quant", "tqt_fake_quant",
    # float -> QAT -> quantized
    "quantize_qat", "quantize", "enable_fake_quant", "disable_fake_quant", "enable_observer",
    "disable_observer", "freeze_bn_stats", "set_bn_fold", "propagate_qconfig", "reset_qconfig", "get_qat_mapping",
    "get_quantized_mapping", "fuse_epilogues", "unfuse_epilogues",
    # plain torch.nn models (drop-in: traced with torch.fx)
    "prepare_plain", "disable_quantize",
    # transformers: dynamic per-token W8A8 / weight-only, SmoothQuant
    "quantize_dynamic", "prepare_dynamic_qat", "calibrate_linear_inputs", "smooth_quant",
    "quantize_static_linear",
]
