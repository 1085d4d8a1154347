"""Running an exported QDQ model in onnxruntime on the CPU without its int8 saturation.

onnxruntime's extended graph optimizations fuse QDQ patterns into integer kernels
(``QLinearConv``, ``MatMulInteger``, ...). On x86 CPUs without VNNI (AVX2 or AVX-512
without ``avx512_vnni`` / ``avx_vnni``: e.g. AMD Zen 2 / 3, Intel before Cascade Lake) its
u8 x s8 kernels multiply with ``vpmaddubsw``, which adds two byte products into a
saturating int16: with full-range int8 weights (|w| up to 127) and activations near the
ends of their range, those sums clip and the outputs are wrong by many quantization steps
(measured on an AVX2-only AMD EPYC, onnxruntime 1.31 / 1.32: up to 37 steps on one
1x1 ConvBn2d; 0 with the same weights halved to 7 bits). This is onnxruntime's documented
"saturation issue", not a property of the exported file: with those fusions off
onnxruntime computes DequantizeLinear -> float op -> QuantizeLinear and is within one
output step of gpuquant.

:func:`session` opens an ``InferenceSession`` and, on such CPUs, turns off the QDQ
fusions alone (the session config entry ``session.disable_quant_qdq``), whatever the
providers: onnxruntime runs on the CPU execution provider every node the others do not
take. Every other optimization stays (measured: 196 steps off at ``ORT_ENABLE_ALL`` on a
1x1 conv, 0 with the entry at the same level). Other x86 CPUs (VNNI or AMX) and other
architectures (ARM's ``sdot`` / ``smmla`` do not saturate) keep onnxruntime's default.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

__all__ = ["session", "int8_saturates"]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_saturates(cpuinfo: Optional[str] = None, machine: Optional[str] = None) -> bool:
    """Whether onnxruntime's fused u8 x s8 CPU kernels may saturate on this machine: an
    x86-64 CPU whose flags (``/proc/cpuinfo``, or ``cpuinfo`` given) name no VNNI / AMX
    int8 extension. x86 without a readable ``/proc/cpuinfo`` (macOS, Windows) counts as
    saturating (the safe answer); other architectures do not."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return not any(f in flags for f in _VNNI_FLAGS)
    return True


def session(path, providers=("CPUExecutionProvider",), options=None):
    """An ``onnxruntime.InferenceSession`` for the exported model at ``path`` (str or
    ``os.PathLike``), on ``providers`` (names, or ``(name, options dict)`` pairs, as
    onnxruntime takes them); where :func:`int8_saturates`, the QDQ fusions are turned off
    (``session.disable_quant_qdq`` in ``options``, an ``onnxruntime.SessionOptions``, or a
    new one) whatever the providers: onnxruntime runs on the CPU execution provider every node
    the others do not take, and with an empty list all of them. The optimization level is
    left as it is.

    Raises:
        ImportError: onnxruntime is not installed.
        TypeError: ``path`` is not a str / path, ``options`` not a SessionOptions, a
            provider neither a name nor a ``(name, dict)`` pair.
    """
    import onnxruntime as ort
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"session: path must be a str or os.PathLike, got "
                        f"{type(path).__name__}")
    if options is None:
        options = ort.SessionOptions()
    elif not isinstance(options, ort.SessionOptions):
        raise TypeError(f"session: options must be an onnxruntime.SessionOptions, got "
                        f"{type(options).__name__}")
    providers = [providers] if isinstance(providers, str) else list(providers)
    for p in providers:
        if not (isinstance(p, str) or (isinstance(p, (tuple, list)) and len(p) == 2
                                       and isinstance(p[0], str) and isinstance(p[1], dict))):
            raise TypeError(f"session: each provider must be a name or a (name, options dict) "
                            f"pair, got {p!r}")
    if int8_saturates():
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=providers)
