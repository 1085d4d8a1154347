"""QAT convolutions: per-channel fake-quantized weights, Conv+BN folded while training.

The weight is always folded with the BatchNorm's *running* deviation,
``w_fold = w * gamma / sigma`` (``sigma = sqrt(running_var + eps)``), and fake-quantized, so
it is quantized exactly as the int8 model will quantize it. While training with batch
statistics the output is brought back to what BatchNorm of the float convolution gives, in
one of two forms (``bn_fold``, set with :func:`gpuquant.quantization.set_bn_fold`):

* ``"single"`` (default; torch.ao's ``_forward_approximate`` and MegEngine's ``approx=True``,
  without their division by the fold factor): one convolution
  ``z = conv(x, fq(w * t))`` with ``t = gamma / sigma``, batch-normalised with its own batch
  statistics and per-channel epsilon ``eps * t**2``::

      y = gamma * sign(t) * (z - mean_B(z)) / sqrt(var_B(z) + eps * t**2) + beta

  which is exactly ``BatchNorm(conv(x, w))`` when fake quantization is off (BatchNorm does not
  see a per-channel scale, and ``eps * t**2`` scales its epsilon with it). With fake
  quantization on, the statistics are those of the convolution the int8 model computes.
  The running statistics are updated with ``mean_B(z) / t`` and ``var_B(z) / t**2``.
  Nothing divides by gamma: ``|t|`` is kept at least ``1e-6 / sigma`` (a channel with
  ``|gamma| < 1e-6`` trains on weights folded with ``1e-6`` instead, which keeps its gamma
  gradient alive, e.g. after zero-init of residual gammas; its output is still exactly
  ``gamma * xhat + beta``);
* ``"exact"`` (Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient
  inference", section 3.2 / figure C.8; MegEngine's ``approx=False``): a second, float
  convolution with the unfolded weight gives the batch mean ``mu_B`` and variance ``var_B``
  and the output is corrected back to batch statistics:
  ``y = conv(x, fq(w_fold)) * (sigma / sigma_B) + beta - gamma * mu_B / sigma_B``.
  Two convolutions a layer (forward and backward): about twice the float step's time.

Eval, or after :meth:`BnFoldedModule.freeze_bn_stats` (running statistics, what int8 runs):
``y = conv(x, fq(w_fold)) + beta + gamma * (b - mu) / sigma``.

``sigma`` is at least ``sqrt(eps)``, so gamma = 0 or a vanishing variance gives zero or large
but finite weights, never NaN.
"""
from __future__ import annotations

import warnings

import torch

from ..._checks import check_bool
from ...backends.registry import try_op
from ...distributed import batch_mean_var, syncs_batch_stats
from ...nn import conv as Float
from ..quantized.conv import _explicit_padding
from .bn_train import (fold_quant_weight, fold_quant_weight_frozen, normalize_quant_train,
                       normalize_train, scale_rows, update_bn_running_stats)
from .module import QATModule, check_image_input, tag_output

__all__ = ["Conv2d", "ConvRelu2d", "ConvRelu62d", "ConvBn2d", "ConvBnRelu2d", "ConvBnRelu62d",
           "BnFoldedModule", "bn_fold_params", "update_bn_running_stats", "BN_FOLD_MODES",
           "check_conv_input", "wrong_input_size"]

BN_FOLD_MODES = ("single", "exact")
_MIN_GAMMA = 1e-6  # |gamma| below this folds with this (single form, see the module docstring)


def bn_fold_params(bn: torch.nn.modules.batchnorm._BatchNorm):
    """(gamma, beta, running_mean, running_std) of ``bn`` as float tensors (gamma 1 and beta
    0 without affine)."""
    sigma = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(sigma)
    beta = bn.bias if bn.affine else torch.zeros_like(sigma)
    return gamma, beta, bn.running_mean, sigma


def check_foldable_bn(bn, owner: str) -> None:
    if not bn.track_running_stats or bn.running_var is None:
        raise NotImplementedError(f"{owner}: BatchNorm with track_running_stats=False has no "
                                  f"running statistics to fold into the weights")


def check_int8_padding(conv, who: str) -> None:
    """Refuse, before QAT starts, a padding the int8 convolution cannot run (it failed only
    at ``quantize``, after training): a ``padding_mode`` other than 'zeros', or
    ``padding='same'`` that pads asymmetrically (an even dilated kernel extent).

    Raises:
        NotImplementedError: naming ``who`` (``quantize_qat`` names the module).
    """
    if conv.padding_mode != "zeros":
        raise NotImplementedError(f"{who}: padding_mode={conv.padding_mode!r} is not supported "
                                  f"by the int8 convolution (only 'zeros')")
    try:
        _explicit_padding(conv)
    except NotImplementedError as e:
        raise NotImplementedError(f"{who}: {e}") from None


def wrong_input_size(module, x, dim: int, what: str, expected: int, attr: str) -> ValueError:
    """The ValueError for an input ``x`` whose size along ``dim`` (``what``: "channels",
    "features") is not the layer's ``attr`` (``expected``), naming ``module`` and ``x``'s shape,
    as the int8 layer refuses it. The QAT layers raise it before touching any state (torch's
    own RuntimeError came after the input's producer had been noted and the weight observer
    had run)."""
    extra = " in its last dimension" if dim == -1 else ""
    return ValueError(f"{type(module).__name__}: x of shape {tuple(x.shape)} has {x.shape[dim]} "
                      f"{what}{extra}, expected {expected} (the layer's {attr})")


def check_conv_input(module, x, in_channels: int) -> None:
    """Refuse, before any state is touched (the input's producer noted, observers, BatchNorm
    statistics), an input a convolution cannot take, as the int8 convolution refuses it:
    not 4-D ``(N, C, H, W)`` or 3-D unbatched ``(C, H, W)``, or a channel count other than
    ``in_channels``. Shapes only (no device sync): this runs every training step.

    Raises:
        TypeError: ``x`` is not a tensor. ValueError: naming ``module``, ``x``'s shape and
        what is allowed.
    """
    check_image_input(module, x)
    if x.shape[-3] != in_channels:
        raise wrong_input_size(module, x, -3, "channels", in_channels, "in_channels")


class Conv2d(QATModule, Float.Conv2d):
    """QAT ``Conv2d``: weight fake-quantized per output channel, output fake-quantized."""

    @classmethod
    def from_float_module(cls, float_module):
        check_int8_padding(float_module, type(float_module).__name__)
        return super().from_float_module(float_module)

    def folded_weight_bias(self):
        """(weight, bias) as the integer convolution will use them (float, before fake quant)."""
        return self.weight, self.bias

    def forward(self, x):
        self._begin_forward()
        check_conv_input(self, x, self.in_channels)
        self._note_inputs(x)
        w = self.apply_quant_weight(self.weight)
        y = self._conv_forward(x, w, self.apply_quant_bias(self.bias, x))
        return self.apply_quant_activation(y, self.activation)


class ConvRelu2d(Conv2d, Float.ConvRelu2d):
    """QAT ``ConvRelu2d``."""


class ConvRelu62d(Conv2d, Float.ConvRelu62d):
    """QAT ``ConvRelu62d``."""


def _check_inner_hooks(module, inner, bn) -> None:
    """Hooks on a BatchNorm-folded QAT module's inner layer or BatchNorm: its fused forward
    reads their weights and statistics and calls neither, so the hooks never run. Those that
    recompute the weight (``torch.nn.utils.prune``, the legacy ``weight_norm`` /
    ``spectral_norm``) are refused: without them the weight silently never trained, or a
    pruned one failed at the second backward. Others (a per-layer profiler's, a capture
    hook) are warned about once per module: they do not fire.

    Raises:
        ValueError: a weight-recomputing pre-hook, naming it and the way out.
    """
    from ...quantization.hooks import WEIGHT_HOOKS
    hooks = [(attr, h) for attr, m in (("conv" if inner is getattr(module, "conv", None)
                                        else "linear", inner), ("bn", bn))
             for h in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values())]
    names = [f"{attr} ({getattr(h, '__qualname__', None) or type(h).__name__})"
             for attr, h in hooks]
    if any(isinstance(h, WEIGHT_HOOKS) for _, h in hooks):
        raise ValueError(
            f"{type(module).__name__}: its {', '.join(names)} recompute the weight in forward "
            f"hooks, which the fused QAT forward never runs (it folds the BatchNorm into the "
            f"weight and calls neither submodule): use torch.nn.utils.parametrizations."
            f"weight_norm / spectral_norm (parametrize) instead, or prune.remove() first")
    if not module.__dict__.get("_warned_inner_hooks"):
        module.__dict__["_warned_inner_hooks"] = True
        warnings.warn(f"{type(module).__name__}: forward hooks or pre-hooks on its "
                      f"{', '.join(names)} do not fire: the fused QAT forward folds the "
                      f"BatchNorm into the weight and calls neither submodule; register them "
                      f"on the fused module itself", stacklevel=3)


class BnFoldedModule(QATModule):
    """Base of ``ConvBn2d`` and ``LinearBn1d``: the BatchNorm ``self.bn`` folded into the
    weights of the inner layer (see the module docstring). Output channels are dimension 1 of
    the output; subclasses give the inner layer and its float op."""

    QAT_STATE = QATModule.QAT_STATE + ("bn_frozen", "bn_fold")
    #: the inner layer's input size attribute, and its name in messages (dimension 1 of the
    #: input, whose rank the BatchNorm's own check fixes)
    _IN_SIZE, _IN_WHAT = "in_channels", "channels"

    def _init_qat(self) -> None:
        super()._init_qat()
        self.bn_frozen = False
        self.bn_fold = "single"

    def freeze_bn_stats(self, freeze: bool = True) -> "BnFoldedModule":
        """Use (and stop updating) the running statistics while training, as the int8
        model will (Krishnamoorthi 2018: freeze after enough steps); returns the module.
        Putting the BatchNorm itself in eval mode (``module.bn.eval()``) does the same while
        it stays there."""
        check_bool(freeze, f"{type(self).__name__}.freeze_bn_stats", "freeze")
        self.bn_frozen = freeze
        return self

    def set_bn_fold(self, mode: str) -> "BnFoldedModule":
        """Training form with batch statistics: ``"single"`` (one convolution) or ``"exact"``
        (a second, float convolution for the statistics); returns the module.

        Raises:
            ValueError: another mode.
        """
        if mode not in BN_FOLD_MODES:
            raise ValueError(f"{type(self).__name__}: bn_fold must be one of {BN_FOLD_MODES}, "
                             f"got {mode!r}")
        self.bn_fold = mode
        return self

    # bn_frozen / bn_fold travel in state_dict() (extra state): a checkpoint resumes as saved
    def get_extra_state(self):
        return {"bn_frozen": self.bn_frozen, "bn_fold": self.bn_fold}

    def set_extra_state(self, state) -> None:
        self.bn_frozen = bool(state["bn_frozen"])
        self.set_bn_fold(state.get("bn_fold", "single"))

    def _inner(self) -> torch.nn.Module:
        """The conv / linear whose weights the BatchNorm folds into."""
        raise NotImplementedError

    def _inner_forward(self, x, w, b):
        """The inner layer's float op with weight ``w`` and bias ``b`` (or None)."""
        raise NotImplementedError

    def folded_weight_bias(self):
        """(w * gamma / sigma, beta + gamma * (b - mu) / sigma) from the running statistics."""
        gamma, beta, mean, sigma = bn_fold_params(self.bn)
        scale = gamma / sigma
        inner = self._inner()
        w = scale_rows(inner.weight, scale)
        b = inner.bias if inner.bias is not None else torch.zeros_like(mean)
        return w, beta + (b - mean) * scale

    def _check_batch(self, x, y) -> None:
        # a synchronised BatchNorm normalises over the global batch: a local batch of 1 (or
        # 0) is fine there, as in torch.nn.SyncBatchNorm (and refusing it on one rank would
        # leave the others waiting in the all-reduce)
        if y.numel() // max(y.size(1), 1) < 2 and not syncs_batch_stats(self.bn):
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                             f"when training, got input shape {tuple(x.shape)}")

    def _forward_single(self, x, inner, bn):
        y = try_op("conv_bn_act_train", x, x, inner, bn, self.weight_observer,
                   self.weight_fake_quant, self.act_observer, self.act_fake_quant,
                   self.activation, _MIN_GAMMA, type(self).__name__)
        if y is not None:  # the whole layer as one autograd node, where a backend has it
            return y, True
        gamma, beta = (bn.weight, bn.bias) if bn.affine else bn_fold_params(bn)[:2]
        wq, t, W, E = fold_quant_weight(inner.weight, gamma, bn.running_var, bn.eps, _MIN_GAMMA,
                                        self.weight_observer, self.weight_fake_quant)
        z = self._inner_forward(x, wq, None)
        self._check_batch(x, z)
        if inner.bias is not None:  # batch statistics cancel the bias: its gradient is
            # exactly 0; adding 0 * bias gives it one, so DDP sees it used
            beta = beta + 0.0 * inner.bias
        # (output, whether it is already activated, observed and fake-quantized)
        y = normalize_quant_train(z, W, beta, E, t, bn, inner.bias, self.act_observer,
                                  self.act_fake_quant, self.activation)
        if y is not None:
            return y, True
        return normalize_train(z, W, beta, E, t, bn, inner.bias), False

    def _forward_exact(self, x, inner, bn):
        y0 = self._inner_forward(x, inner.weight, None)  # float op: batch statistics
        self._check_batch(x, y0)
        dims = (0,) + tuple(range(2, y0.dim()))  # all but the channels
        # local statistics, or the global batch's when bn is a SyncBatchNorm (distributed)
        mean, var, n = batch_mean_var(y0, dims, bn)
        gamma, beta, _, sigma = bn_fold_params(bn)
        sigma_b = torch.sqrt(var + bn.eps)
        w = self.apply_quant_weight(scale_rows(inner.weight, gamma / sigma))
        y = self._inner_forward(x, w, None)
        shift = beta - gamma * mean / sigma_b
        if inner.bias is not None:  # as in _forward_single
            shift = shift + 0.0 * inner.bias
        b = inner.bias.detach() if inner.bias is not None else 0.0
        update_bn_running_stats(bn, mean + b, var, n)
        # per-channel factors in y's dtype: under bf16 autocast float32 ones would promote y,
        # and every activation after it, to float32 (seen in an H200 profile)
        sh = (1, -1) + (1,) * (y.dim() - 2)
        return torch.addcmul(shift.reshape(sh).to(y.dtype), y,
                             (sigma / sigma_b).reshape(sh).to(y.dtype))

    def forward(self, x):
        self._begin_forward()
        try:  # the float module's BatchNorm refuses other ranks: so does the QAT one (a 3-D
            # input to a ConvBn2d was normalised over the wrong dimension)
            self.bn._check_input_dim(x)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e} (shape {tuple(x.shape)}), as its "
                             f"float module's {type(self.bn).__name__}") from None
        inner, bn = self._inner(), self.bn
        if inner._forward_pre_hooks or inner._forward_hooks or bn._forward_pre_hooks \
                or bn._forward_hooks:
            _check_inner_hooks(self, inner, bn)
        # before any state: a refused batch must not reach the observers or the BatchNorm's
        # running statistics (one host-side comparison a step)
        if x.shape[1] != getattr(inner, self._IN_SIZE):
            raise wrong_input_size(self, x, 1, self._IN_WHAT, getattr(inner, self._IN_SIZE),
                                   self._IN_SIZE)
        self._note_inputs(x)
        live = self.training and not self.bn_frozen and bn.training
        if live and x.numel() == 0 and not syncs_batch_stats(bn):
            # an empty batch: torch's BatchNorm returns it empty with its statistics
            # untouched; so does this, touching no observer either (a synchronised rank
            # still joins the all-reduce, below). Every parameter stays in the graph with a
            # zero gradient, as in torch's layers (DDP's reducer expects each one)
            y = self._inner_forward(x, inner.weight, inner.bias)
            return tag_output(y + sum(p.sum() for p in self.parameters()) * 0, self)
        # bn.eval() inside a training model (the plain-PyTorch way to freeze BatchNorm) uses
        # the running statistics, as the float model does: the same as freeze_bn_stats()
        if live:
            if self.bn_fold == "single":
                y, quantized = self._forward_single(x, inner, bn)
                if quantized:
                    return tag_output(y, self)
            else:
                y = self._forward_exact(x, inner, bn)
        else:  # running statistics; one fused launch for the weight and bias where taken
            wb = fold_quant_weight_frozen(self, self.weight_observer, self.weight_fake_quant)
            if wb is None:
                w, b = self.folded_weight_bias()
                wb = self.apply_quant_weight(w), b
            y = self._inner_forward(x, wb[0], self.apply_quant_bias(wb[1], x))
        return self.apply_quant_activation(y, self.activation)


class ConvBn2d(BnFoldedModule, Float.ConvBn2d):
    """QAT ``ConvBn2d``: BatchNorm folded into the convolution (see the module docstring)."""

    @classmethod
    def from_float_module(cls, float_module):
        check_foldable_bn(float_module.bn, type(float_module).__name__)
        check_int8_padding(float_module.conv, type(float_module).__name__)
        return super().from_float_module(float_module)

    def _inner(self):
        return self.conv

    def _inner_forward(self, x, w, b):
        return self.conv._conv_forward(x, w, b)


class ConvBnRelu2d(ConvBn2d, Float.ConvBnRelu2d):
    """QAT ``ConvBnRelu2d``."""


class ConvBnRelu62d(ConvBn2d, Float.ConvBnRelu62d):
    """QAT ``ConvBnRelu62d``."""
