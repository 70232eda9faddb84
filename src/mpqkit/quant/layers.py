"""Quantized layers with per-layer weight and input-activation bits.

A quantized layer is the float layer's class plus :class:`QuantMixin`: the same parameters under
the same names (so a float state dict loads into it), a weight quantizer ``wq`` and an input
activation quantizer ``aq``. New layer types register once with :func:`register_qlayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpqkit.errors import ConfigError
from mpqkit.quant.adjoint import ConstantInput, calls_plainly, constant_input_conv
from mpqkit.quant.quantizers import (
    ACT_METHODS,
    WEIGHT_METHODS,
    Quantizer,
    check_bits,
    make_act_quantizer,
    make_weight_quantizer,
)


@dataclass
class QuantConfig:
    """How layers are quantized (the bits come from the policy).

    weight_method: ``lsq`` (learned step, default), ``maxabs`` or ``dorefa``.
    act_method: ``lsq`` (default) or ``pact``.
    per_channel: per-output-channel weight scales instead of one per tensor.
    act_signed: ``None`` decides from the calibration batch (non-negative inputs, e.g. after a
        ReLU, are unsigned); ``True``/``False`` forces it.
    fold_bn: train with each BatchNorm that follows a convolution folded into its weights
        before weight quantization, the form export writes and onnxruntime runs on integer
        kernels (:mod:`mpqkit.quant.fold`). Off in the library and in checkpoints written before
        the option existed; ``mpqkit finetune`` turns it on unless ``--no-fold-bn`` or the YAML
        says otherwise.
    """

    weight_method: str = "lsq"
    act_method: str = "lsq"
    per_channel: bool = False
    act_signed: bool | None = None
    fold_bn: bool = False

    def __post_init__(self) -> None:
        if self.weight_method not in WEIGHT_METHODS:
            raise ConfigError(f"unknown weight quantizer {self.weight_method!r}: use one of "
                              f"{', '.join(WEIGHT_METHODS)}")
        if self.act_method not in ACT_METHODS:
            raise ConfigError(f"unknown activation quantizer {self.act_method!r}: use one of "
                              f"{', '.join(ACT_METHODS)}")


_QLAYERS: dict[type[nn.Module], type[QuantMixin]] = {}


def register_qlayer(float_cls: type[nn.Module]):  # type: ignore[no-untyped-def]
    """Class decorator: register a quantized class as the replacement of ``float_cls``."""

    def deco(qcls: type[QuantMixin]) -> type[QuantMixin]:
        _QLAYERS[float_cls] = qcls
        return qcls

    return deco


def quantizable_types() -> tuple[type[nn.Module], ...]:
    """Float layer types that have a quantized counterpart."""
    return tuple(_QLAYERS)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers of ``model`` by fully-qualified name, in module-tree order."""
    types = quantizable_types()
    return {n: m for n, m in model.named_modules() if isinstance(m, types) and n}


def qlayer_for(module: nn.Module) -> type[QuantMixin] | None:
    """The quantized class for ``module`` (exact type match), or None."""
    return _QLAYERS.get(type(module))


class QuantMixin:
    """Shared behaviour of quantized layers: bits as data, quantizers built from a config."""

    wq: Quantizer
    aq: Quantizer
    weight: nn.Parameter

    def _init_quant(self, w_bits: int, a_bits: int, config: QuantConfig) -> None:
        w_bits = check_bits(w_bits, "w_bits")
        a_bits = check_bits(a_bits, "a_bits")
        self.qconfig = config
        out_ch = self.weight.shape[0]
        self.wq = make_weight_quantizer(config.weight_method, w_bits, out_ch, config.per_channel)
        self.aq = make_act_quantizer(config.act_method, a_bits, config.act_signed)

    def weight_for_quant(self) -> Tensor:
        """The float tensor the weight quantizer quantizes (the folded weight when folded)."""
        return self.weight

    @property
    def w_bits(self) -> int:
        return self.wq.bits

    @property
    def a_bits(self) -> int:
        return self.aq.bits

    @classmethod
    def from_float(cls, module: nn.Module, w_bits: int, a_bits: int,
                   config: QuantConfig | None = None) -> nn.Module:
        """A quantized copy of ``module`` sharing its parameter tensors."""
        q = cls.__new__(cls)
        q.__dict__ = module.__dict__.copy()
        # Fresh containers so the float module is left untouched.
        q._parameters = dict(module._parameters)
        q._buffers = dict(module._buffers)
        q._modules = dict(module._modules)
        q._init_quant(w_bits, a_bits, config or QuantConfig())
        return q

    def to_float(self) -> nn.Module:
        """The float layer with the same parameters (quantizers dropped)."""
        float_cls = next(f for f, qc in _QLAYERS.items() if qc is type(self))
        m = float_cls.__new__(float_cls)
        m.__dict__ = self.__dict__.copy()
        m._modules = {k: v for k, v in self._modules.items() if k not in ("wq", "aq")}
        m.__dict__.pop("qconfig", None)
        return m


@register_qlayer(nn.Conv2d)
class QConv2d(QuantMixin, nn.Conv2d):
    """Conv2d (any groups, incl. depthwise) with quantized weights and inputs."""

    def __init__(self, *args, w_bits: int = 8, a_bits: int = 8,  # type: ignore[no-untyped-def]
                 config: QuantConfig | None = None, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quant(w_bits, a_bits, config or QuantConfig())

    def forward(self, x: Tensor) -> Tensor:
        xin = self.quantize_input(x)
        return self.conv_quantized(xin, self.wq(self.weight), self.bias)

    def quantize_input(self, x: Tensor) -> Tensor | ConstantInput:
        """``aq(x)``; or, for an input that needs no gradient (the data batch) with a learned
        input step, ``aq``'s :meth:`~mpqkit.quant.Quantizer.quantize_constant` form, which
        :meth:`conv_quantized` turns into the step's gradient without the input's (same
        values; :mod:`mpqkit.quant.adjoint`). A quantizer with hooks is called as usual, so
        they see it, and so is everything under autocast (it changes the convolution's dtypes).
        """
        aq = self.aq
        if (x.dim() == 4 and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and calls_plainly(aq) and not torch.is_autocast_enabled(x.device.type)):
            const = aq.quantize_constant(x)
            if const is not None:
                return const
        return aq(x)

    def conv_quantized(self, xin: Tensor | ConstantInput, weight: Tensor,
                       bias: Tensor | None) -> Tensor:
        """The convolution of :meth:`quantize_input`'s result with ``weight`` and ``bias``."""
        if isinstance(xin, ConstantInput):
            conv = (self.stride, self.padding, self.dilation, self.groups)
            return constant_input_conv(xin, weight, bias, conv)
        return self._conv_forward(xin, weight, bias)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


@register_qlayer(nn.Linear)
class QLinear(QuantMixin, nn.Linear):
    """Linear with quantized weights and inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 w_bits: int = 8, a_bits: int = 8, config: QuantConfig | None = None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_quant(w_bits, a_bits, config or QuantConfig())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.aq(x), self.wq(self.weight), self.bias)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + f", w_bits={self.w_bits}, a_bits={self.a_bits}"
