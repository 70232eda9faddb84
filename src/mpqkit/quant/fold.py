"""BatchNorm folded into the convolution before weight quantization (deployment form).

Why: an exported graph with ``Conv -> BatchNormalization -> ... -> QuantizeLinear`` cannot run
on onnxruntime's integer kernels; ``DequantizeLinear -> Conv -> [Relu] -> QuantizeLinear`` runs
as one ``QLinearConv``. Two ways to get there:

* **Training folded** (``QuantConfig.fold_bn``): :func:`find_fold_sites` finds every
  ``Conv2d -> BatchNorm2d`` pair in the model's traced forward and :class:`QConvBn2d` replaces
  the convolution (the BatchNorm moves inside it as ``bn``; its old place becomes
  ``nn.Identity``). The weight quantizer quantizes the convolution's own weight ``w`` with
  step ``s``; the deployed weight is ``q * sign(f)`` with per-channel scale ``s * |f|``,
  ``f = gamma / sqrt(running_var + eps)`` (onnxruntime's QLinearConv takes per-channel weight
  scales, as torch.ao's fused ConvBn QAT modules use with their default per-channel weight
  fake-quant). In training the output is normalised with the batch statistics
  (:func:`batch_norm_floored`, which also updates the running ones); in eval the module
  computes exactly the folded convolution with the folded bias, the function export writes.
  Jacob et al. 2018 quantize ``w * f`` with one step per tensor instead, and divide the
  convolution's output by ``f`` in training: where ``f`` differs by 300x between channels (a
  briefly trained EfficientNet-B0) most channels round to 0 and that division multiplies
  their error and gradients by up to ``1/f``; on that model training went non-finite at the
  first steps, which is why mpqkit does not use that form.
* **Folded at export** (:func:`deployment_model`): a model fine-tuned without folding keeps
  the function it was trained with. Its quantized weights ``q * s`` are folded as
  ``(q * sign(f)) * (s * |f|)`` with ``f = gamma / sqrt(running_var + eps)`` per output channel,
  so the weight scale becomes per-channel ``s * |f|`` (the learned scale rescaled, not re-fit)
  and the integers stay those of training; only float rounding of the product can differ.

Output quantizer: a folded convolution whose output (after an optional ReLU) is consumed by
anything other than quantized layers' input quantizers (a residual add, a pooling, a float
layer) gets an 8-bit output quantizer ``oq`` (LSQ or PACT as the activations; the sign from
calibration), so that its exported form ends in ``QuantizeLinear`` too and onnxruntime runs it
as an integer kernel. Without it (``fold_bn`` off, or a model folded only at export) such a
convolution runs in float with its weights dequantized on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from mpqkit.quant.layers import QConv2d, QuantConfig, QuantMixin
from mpqkit.quant.quantizers import FULL_PRECISION, Quantizer, make_act_quantizer

#: Bits of the output quantizer of a folded convolution that feeds no input quantizer.
OUTPUT_BITS = 8


@dataclass(frozen=True)
class FoldSite:
    """A ``Conv2d -> BatchNorm2d`` pair: the BatchNorm's name, and whether the output needs
    an 8-bit output quantizer (it reaches something other than quantized layers)."""

    bn: str
    out_quant: bool


class QuantTracer(fx.Tracer):
    """``torch.fx`` tracer of quantized models: quantized layers, quantizers and
    :class:`FlooredBatchNorm2d` are leaves (one ``call_module`` node each)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, QuantMixin | Quantizer | FlooredBatchNorm2d):
            return True
        return super().is_leaf_module(m, qualname)


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _feeds_quantizers(node: fx.Node, gm: fx.GraphModule, quantized: set[str]) -> bool:
    """Whether every consumer of ``node`` (through one ReLU) is a layer with an input quantizer."""
    users = list(node.users)
    if len(users) == 1 and _is_relu(users[0], gm):
        users = list(users[0].users)
    return bool(users) and all(u.op == "call_module" and str(u.target) in quantized
                               for u in users)


def trace(model: nn.Module, what: str) -> fx.GraphModule:
    """The model's forward as an fx graph (quantized layers are leaves); one-line error if not."""
    from mpqkit.errors import ConfigError

    try:
        return fx.GraphModule(model, QuantTracer().trace(model))
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported in one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot trace the model's forward to find Conv2d -> BatchNorm2d pairs "
                          f"({msg[:120]}): {what}") from None


def find_fold_sites(model: nn.Module, quantized: set[str] | None = None,
                    fix: str = "pass --no-fold-bn") -> dict[str, FoldSite]:
    """``{conv name: FoldSite}`` for every Conv2d whose only consumer is a BatchNorm2d.

    A pair is folded when the convolution and the BatchNorm are each called once, the
    BatchNorm tracks running statistics and has one channel per output channel.
    ``quantized``: names of the layers whose inputs are quantized (default: the quantized layers
    of ``model`` with an enabled input quantizer). Already folded :class:`QConvBn2d` layers are
    sites too (with their own BatchNorm).
    """
    gm = trace(model, fix)
    if quantized is None:
        quantized = {n for n, m in model.named_modules()
                     if isinstance(m, QuantMixin) and m.aq.enabled}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    sites: dict[str, FoldSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[str(node.target)] != 1:
            continue
        name = str(node.target)
        mod = gm.get_submodule(name)
        if isinstance(mod, QConvBn2d):
            sites[name] = FoldSite("", not _feeds_quantizers(node, gm, quantized))
            continue
        if not isinstance(mod, nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls[str(user.target)] != 1:
            continue
        bn = gm.get_submodule(str(user.target))
        if (type(bn) in BATCHNORM2D and bn.track_running_stats
                and bn.running_var is not None and bn.num_features == mod.out_channels):
            sites[name] = FoldSite(str(user.target), not _feeds_quantizers(user, gm, quantized))
    return sites


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def plain_conv(m: nn.Conv2d) -> nn.Conv2d:
    """A float ``nn.Conv2d`` sharing ``m``'s parameter tensors (quantizers and bn dropped)."""
    conv = nn.Conv2d.__new__(nn.Conv2d)
    conv.__dict__ = m.__dict__.copy()
    conv._parameters = dict(m._parameters)
    conv._buffers = dict(m._buffers)
    conv._modules = {k: v for k, v in m._modules.items() if k not in ("wq", "aq", "oq", "bn")}
    conv.__dict__.pop("qconfig", None)
    return conv


def bn_factor(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(f, beta)``: ``f = gamma / sqrt(running_var + eps)`` and ``beta`` per channel."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    return gamma / std, beta


#: In quantized training a channel's batch variance counts as at least this fraction of its
#: running variance (see :func:`batch_norm_floored`).
VAR_FLOOR = 0.25


def batch_norm_floored(y: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """``bn(y)`` in training, except that each channel's batch variance is floored at
    ``VAR_FLOOR`` x its running variance; the running statistics are updated as
    ``nn.BatchNorm2d`` updates them (from the unfloored batch statistics).

    Why: low-bit quantization can make a channel constant over a whole batch (a depthwise
    filter, or the input channels of one, rounded to a single level) although the float
    channel varies. BatchNorm then divides by ``sqrt(eps)`` instead of the channel's usual
    standard deviation, and its backward multiplies the gradient by ``gamma / sqrt(eps)`` (~300
    for eps 1e-5). Through a stack of depthwise blocks these factors multiply: on a w4a4
    EfficientNet-B0 one backward pass gave gradients of 1e30 and the first step made the
    weights non-finite. With the floor a collapsed channel's gain is at most
    ``2 x gamma / running_std``, twice its usual one; a channel whose batch variance is at
    least ``VAR_FLOOR`` x its running variance (before this batch) is normalised exactly as
    ``bn`` does, by the same native kernel when no channel is under the floor."""
    if not bn.training or bn.running_var is None:
        return nn.BatchNorm2d.forward(bn, y)
    # track_running_stats off (frozen_bn_stats, a sharpness-aware second pass): floored all the
    # same, statistics untouched
    track = bn.track_running_stats
    if track and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                else bn.momentum)
    floor = VAR_FLOOR * bn.running_var  # the running variance before this batch
    if torch.compiler.is_compiling():  # one branch-free form, fused by the compiler
        return _floored_form(y, bn, floor, momentum, update=track)
    # eager: the native kernel (its running-statistics update included); the floored form only
    # when a channel is under the floor (~5% over plain BatchNorm otherwise, not 2.6x)
    out, _, invstd = torch.native_batch_norm(
        y, bn.weight, bn.bias, bn.running_mean if track else None,
        bn.running_var if track else None, True, momentum, bn.eps)
    if bool((invstd.detach().pow(-2) - bn.eps < floor).any()):
        return _floored_form(y, bn, floor, momentum, update=False)
    return out


def _floored_form(y: Tensor, bn: nn.BatchNorm2d, floor: Tensor, momentum: float,
                  update: bool) -> Tensor:
    # in float32 at least (y is bf16 under autocast), as the native kernel computes statistics:
    # a bf16 variance is too coarse, and the running statistics stay float32
    yf = y if y.dtype in (torch.float32, torch.float64) else y.float()
    var, mean = torch.var_mean(yf, dim=[0, 2, 3], correction=0)
    if update:
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            n = y.numel() // y.shape[1]
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(bn.running_var.dtype),
                                 momentum)
    scale = torch.rsqrt(torch.maximum(var, floor.to(var.dtype)) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return torch.addcmul(shift.reshape(1, -1, 1, 1), yf, scale.reshape(1, -1, 1, 1)).to(y.dtype)


class FlooredBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training forward is :func:`batch_norm_floored`: the class every
    ``nn.BatchNorm2d`` of a quantized model gets (:func:`floor_batchnorms`; same parameters,
    buffers and state dict, any training loop), the plain class again when dequantized."""

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm_floored(x, self)


#: The BatchNorm classes folded into a convolution (a quantized model's and a float one's).
BATCHNORM2D = (nn.BatchNorm2d, FlooredBatchNorm2d)


def floor_batchnorms(model: nn.Module, floored: bool = True) -> nn.Module:
    """Every ``nn.BatchNorm2d`` of ``model`` becomes a :class:`FlooredBatchNorm2d` in place
    (with ``floored=False``, the reverse); names, parameters and buffers never change."""
    src, dst = (nn.BatchNorm2d, FlooredBatchNorm2d) if floored else (FlooredBatchNorm2d,
                                                                       nn.BatchNorm2d)
    for m in model.modules():
        if type(m) is src:
            m.__class__ = dst
    return model


class QConvBn2d(QConv2d):
    """Conv2d + BatchNorm2d trained folded: quantized input, quantized folded weight, folded
    bias, optional 8-bit output quantizer ``oq`` (see the module docstring).

    Parameters keep their names: ``weight`` (and ``bias``) are the convolution's own, the
    BatchNorm is the submodule ``bn``.
    """

    bn: nn.BatchNorm2d
    oq: Quantizer

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, w_bits: int, a_bits: int,
                     config: QuantConfig, out_quant: bool) -> QConvBn2d:
        q = cls.from_float(conv, w_bits, a_bits, config)
        assert isinstance(q, QConvBn2d)
        q.bn = bn
        q.oq = make_act_quantizer(config.act_method,
                                  OUTPUT_BITS if out_quant else FULL_PRECISION, None)
        if not out_quant:  # a pass-through: its step size trains nothing (and DDP would
            q.oq.requires_grad_(False)  # stop on a parameter without a gradient)
        return q

    def folded(self) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` folded with the running statistics (before quantization)."""
        f, b = self._fold_factor_and_bias()
        return self.weight * f.reshape(-1, 1, 1, 1), b

    def _fold_factor_and_bias(self) -> tuple[Tensor, Tensor]:
        f, beta = bn_factor(self.bn)
        b = beta - self.bn.running_mean * f
        if self.bias is not None:
            b = b + self.bias * f
        return f, b

    def forward(self, x: Tensor) -> Tensor:
        xin = self.quantize_input(x)
        wq = self.wq(self.weight)
        if self.training:  # batch statistics; the running ones are updated here too
            y = batch_norm_floored(self.conv_quantized(xin, wq, self.bias), self.bn)
        else:  # the deployed function: the quantized weight folded per channel
            f, b = self._fold_factor_and_bias()
            y = self.conv_quantized(xin, wq * f.reshape(-1, 1, 1, 1), b)
        return self.oq(y)

    def to_float(self) -> nn.Module:
        """A float Conv2d with the BatchNorm folded in (running statistics), with a bias."""
        w, b = self.folded()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, True, self.padding_mode,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        return conv

    def float_pair(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """The float convolution (same parameter tensors) and the BatchNorm, unfolded."""
        return plain_conv(self), self.bn

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bn folded" + (
            f", out_bits={self.oq.bits}" if self.oq.enabled else "")


def fold_layer(model: nn.Module, name: str, conv: nn.Module, site: FoldSite, w_bits: int,
               a_bits: int, config: QuantConfig) -> QConvBn2d:
    """The :class:`QConvBn2d` for site ``name``; its BatchNorm's place becomes ``nn.Identity``."""
    if isinstance(conv, QConvBn2d):
        conv, bn = conv.float_pair()
    else:
        if isinstance(conv, QuantMixin):
            conv = conv.to_float()
        bn = model.get_submodule(site.bn)
        set_submodule(model, site.bn, nn.Identity())
    assert isinstance(conv, nn.Conv2d)
    return QConvBn2d.from_conv_bn(conv, bn, w_bits, a_bits, config, site.out_quant)
