"""A convolution of a constant input with a learned input step, without the input's gradient.

A network's first convolution reads the data batch, which needs no gradient. With a learned
input quantizer (LSQ) autograd still computes the whole input gradient ``conv^T(g)``, only for
the step's gradient ``sum(conv^T(g) * d)``, ``d = dx_q/ds`` a constant. The convolution is
linear in its input, so that number is also ``sum(g * conv(d)) = sum(w * conv_w(d, g))``, with
``conv_w(d, g)`` the weight gradient the convolution would have for the input ``d``: the same
value (to float rounding) from a pass that costs a fraction of the input gradient's when the
input has few channels. ResNet-20's stem (3 channels, batch 128, CPU): forward and backward in
9.2 ms instead of 13.0 with 1 thread, 5.6 instead of 7.5 with 2; the whole QAT step 1.015x
faster with 1 thread, and with 2 within the noise of the runs (``benchmarks/bench_qat.py``,
kind ``qat_input_grad``).

:class:`~mpqkit.quant.QConv2d` takes this path where its input quantizer offers it
(:meth:`~mpqkit.quant.Quantizer.quantize_constant`) and has no hooks; everything else is
unchanged. A double backward through it is exact too: it sees ``x_q`` as a function of the
step again.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

#: A convolution's stride, padding, dilation and groups.
Conv = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]


class ConstantInput(NamedTuple):
    """What :meth:`~mpqkit.quant.Quantizer.quantize_constant` returns for an input that
    needs no gradient: ``x_q``, and ``d`` with ``dL/dparam = sum(dL/dx_q * d)``."""

    xq: Tensor
    d: Tensor
    param: Tensor


def calls_plainly(m: nn.Module) -> bool:
    """Whether calling ``m`` is only its ``forward``: no hook of its own or global one (which
    a path that computes ``m``'s result without calling it would skip)."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def _weight_grads(g: Tensor, x: Tensor, w: Tensor, conv: Conv,
                  bias: bool) -> tuple[Tensor, Tensor | None]:
    """The weight (and bias) gradient of ``conv2d(x, w)`` for the output gradient ``g``."""
    stride, padding, dilation, groups = conv
    _, gw, gb = torch.ops.aten.convolution_backward(
        g, x, w, [w.shape[0]] if bias else None, stride, padding, dilation, False,
        [0] * len(stride), groups, [False, True, bias])
    return gw, gb


class _ConstantInputConv(torch.autograd.Function):
    """``conv2d(x_q, w, b)``; backward: the gradients of ``w`` and ``b``, and the step
    parameter's ``sum(w * conv_w(d, g))``, none for ``x_q``."""

    @staticmethod
    def forward(ctx, xq: Tensor, d: Tensor, param: Tensor, w: Tensor,  # type: ignore[override]
                b: Tensor | None, conv: Conv) -> Tensor:
        ctx.save_for_backward(xq, d, param, w)
        ctx.conv, ctx.has_bias = conv, b is not None
        return F.conv2d(xq, w, b, *conv)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xq, d, param, w = ctx.saved_tensors
        need_p, need_w, need_b = ctx.needs_input_grad[2:5]
        if torch.is_grad_enabled():  # a double backward: x_q depends on the step as it does in
            xq = xq + d * (param - param.detach())  # the quantizer's graph (value unchanged)
        gw = gb = gp = None
        if need_w or need_b:
            gw, gb = _weight_grads(g, xq, w, ctx.conv, need_b)
        if need_p:
            gd, _ = _weight_grads(g, d, w, ctx.conv, False)
            gp = (gd * w).sum().reshape(param.shape)
        return None, None, gp, gw if need_w else None, gb, None


def constant_input_conv(xin: ConstantInput, w: Tensor, b: Tensor | None, conv: Conv) -> Tensor:
    """``conv2d(x_q, w, b, *conv)`` with the gradient ``sum(dL/dx_q * d)`` for ``param``."""
    return _ConstantInputConv.apply(xin.xq, xin.d, xin.param, w, b, conv)
