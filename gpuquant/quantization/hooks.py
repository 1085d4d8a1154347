"""Hooks of a swapped module carried to its replacement (``quantize``, ``quantize_dynamic``,
``prepare_dynamic_qat``), as ``torch.ao``'s ``swap_module`` carries them."""
from __future__ import annotations

import torch
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

# pre-hooks that recompute a float weight from others (pruning's mask, the legacy weight_norm /
# spectral_norm): a replacement holds that weight already, and has none of their tensors (the
# fused BatchNorm-folded QAT modules refuse them on their inner layer: nn/qat/conv.py)
WEIGHT_HOOKS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)

__all__ = ["carry_hooks", "WEIGHT_HOOKS"]


def carry_hooks(old: torch.nn.Module, new: torch.nn.Module, name: str, fn: str,
                backward: bool = True) -> None:
    """Register ``old``'s hooks on its replacement ``new``, in their order and with their
    flags (``with_kwargs``, ``always_call``): forward pre-hooks and forward hooks (the
    replacement takes the same arguments and returns the same kind of output) and, with
    ``backward``, full backward (pre-)hooks (an int8 module, inference-only, has no backward:
    its conversion passes False). The pre-hooks of ``torch.nn.utils.prune`` and of the legacy
    ``weight_norm`` / ``spectral_norm`` are not carried: they recompute a float weight from
    tensors the int8 module does not have (it failed at its first call), and the int8 weight
    holds the weight they computed.

    Raises:
        ValueError: with ``backward``, ``old`` has a non-full backward hook
            (``register_backward_hook``, which torch deprecates and which fires on the last
            op's inputs, not the module's).
    """
    if backward and old._backward_hooks and not old._is_full_backward_hook:
        raise ValueError(f"{fn}: {name or 'model'} ({type(old).__name__}) has a backward hook "
                         f"from register_backward_hook, which cannot be moved to its "
                         f"replacement; use register_full_backward_hook, or exclude the "
                         f"module with filter_fn")
    for hid, h in old._forward_pre_hooks.items():
        if not isinstance(h, WEIGHT_HOOKS):
            new.register_forward_pre_hook(h, with_kwargs=hid in old._forward_pre_hooks_with_kwargs)
    for hid, h in old._forward_hooks.items():
        new.register_forward_hook(h, with_kwargs=hid in old._forward_hooks_with_kwargs,
                                  always_call=hid in old._forward_hooks_always_called)
    if backward:
        for h in old._backward_pre_hooks.values():
            new.register_full_backward_pre_hook(h)
        for h in old._backward_hooks.values():
            new.register_full_backward_hook(h)
