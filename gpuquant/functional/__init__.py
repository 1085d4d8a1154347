"""Ops users call; each dispatches to the current backend (:mod:`gpuquant.backends`)."""
from .quant import dequantize, fake_quant, quantize
from .requant import AddParams, Requant, make_add_params, make_requant, quantize_multiplier

__all__ = ["quantize", "dequantize", "fake_quant", "Requant", "make_requant", "AddParams",
           "make_add_params", "quantize_multiplier"]
