"""The deployment form of a quantized model: BatchNorm folded into the convolutions.

:func:`deployment_model` is what export writes: every :class:`~mpqkit.quant.fold.QConvBn2d`
(trained folded) becomes its exact eval form, and every ``QConv2d -> BatchNorm2d`` pair of a
model fine-tuned without folding is folded at export: the integers of the trained weights are
kept and the learned weight scale is rescaled per output channel, ``q * s`` becoming
``(q * sign(f)) * (s * |f|)`` with ``f = gamma / sqrt(running_var + eps)``, so the folded layer
computes the trained function up to float rounding (a per-tensor scale becomes per-channel).
Such layers get no output quantizer (there is no calibrated range for one).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mpqkit.export.packed import check_calibrated, weight_integers
from mpqkit.quant.fold import (
    FoldSite,
    QConvBn2d,
    bn_factor,
    find_fold_sites,
    set_submodule,
)
from mpqkit.quant.layers import QConv2d
from mpqkit.quant.quantizers import FULL_PRECISION, LSQQuantizer, Quantizer, make_act_quantizer


class QConvOut2d(QConv2d):
    """A folded convolution as deployed: fixed folded weight and bias, the input and weight
    quantizers, and the output quantizer ``oq`` (32 bits: none). Made by
    :func:`deployment_model`, never trained."""

    oq: Quantizer

    def forward(self, x: Tensor) -> Tensor:
        return self.oq(self._conv_forward(self.aq(x), self.wq(self.weight), self.bias))

    def to_float(self) -> nn.Module:
        from mpqkit.quant.fold import plain_conv

        return plain_conv(self)


def _deploy_layer(conv: QConv2d, w: Tensor, wq: Quantizer, b: Tensor,
                  oq: Quantizer | None) -> QConvOut2d:
    """A :class:`QConvOut2d` with weight ``w`` (on ``wq``'s grid), bias ``b``, quantizers."""
    d = QConvOut2d.__new__(QConvOut2d)
    d.__dict__ = conv.__dict__.copy()
    d._parameters = {"weight": nn.Parameter(w.detach().clone(), requires_grad=False),
                     "bias": nn.Parameter(b.detach().clone(), requires_grad=False)}
    d._buffers = {}
    d._modules = {"aq": conv.aq, "wq": wq,
                  "oq": oq if oq is not None else make_act_quantizer("lsq", FULL_PRECISION)}
    return d


@torch.no_grad()
def _deploy_folded(m: QConvBn2d) -> QConvOut2d:
    w, b = m.folded()
    return _deploy_layer(m, m.wq(w), m.wq, b, m.oq)


@torch.no_grad()
def _deploy_unfolded(m: QConv2d, bn: nn.BatchNorm2d) -> QConvOut2d:
    """Fold ``bn`` into a layer trained unfolded: integers kept, scale rescaled per channel."""
    f, beta = bn_factor(bn)
    b = beta - bn.running_mean * f
    if m.bias is not None:
        b = b + m.bias * f
    if not m.wq.enabled:
        return _deploy_layer(m, m.weight * f.reshape(-1, 1, 1, 1), m.wq, b, None)
    q, scale, _, _ = weight_integers(m)
    scale = (scale.to(f.dtype) * f.abs()).clamp_min(1e-12)  # 1 or C scales -> C scales
    wq = LSQQuantizer(m.w_bits, signed=True, symmetric=True, channels=m.out_channels,
                      channel_dim=0).to(f.device)
    wq.scale.data.copy_(scale)
    wq.initialized.fill_(1)
    w = (q.to(f.dtype) * torch.sign(f).reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)
    return _deploy_layer(m, w, wq, b, None)


def deployment_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` in eval mode with the BatchNorms folded (module docstring); returns
    ``(model, names of the layers folded at export)``. Other layers are unchanged."""
    model = copy.deepcopy(model).eval()
    if any(type(m) is nn.BatchNorm2d for m in model.modules()):
        sites = find_fold_sites(model, fix="export with --no-fold-bn")
    else:
        sites = {n: FoldSite("", False) for n, m in model.named_modules()
                 if isinstance(m, QConvBn2d)}
    at_export: list[str] = []
    for name, site in sites.items():
        mod = model.get_submodule(name)
        if isinstance(mod, QConv2d):
            check_calibrated(name, mod)
        if isinstance(mod, QConvBn2d):
            set_submodule(model, name, _deploy_folded(mod))
        elif type(mod) is QConv2d:
            set_submodule(model, name, _deploy_unfolded(mod, model.get_submodule(site.bn)))
            set_submodule(model, site.bn, nn.Identity())
            at_export.append(name)
    return model, at_export
