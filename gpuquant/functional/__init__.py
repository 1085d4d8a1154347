"""Ops users call; each dispatches to the current backend (:mod:`gpuquant.backends`)."""
from .quant import dequantize, fake_quant, quantize
from .requant import AddParams, Requant, make_add_params, make_requant, quantize_multiplier
from .integer import (adaptive_avg_pool2d, add, avg_pool2d, check_accumulator_range, concat,
                      conv2d, conv2d_add, conv2d_dequant, linear, linear_add, linear_dequant,
                      lookup, max_pool2d, mul, upsample_nearest2d)

__all__ = ["quantize", "dequantize", "fake_quant", "Requant", "make_requant", "AddParams",
           "make_add_params", "quantize_multiplier", "check_accumulator_range", "conv2d", "linear",
           "add", "mul", "lookup", "concat", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
           "upsample_nearest2d", "conv2d_add", "linear_add", "conv2d_dequant", "linear_dequant"]
