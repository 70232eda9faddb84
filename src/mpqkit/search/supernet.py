"""The search supernet: every searchable layer mixes its candidate bit-widths, one conv per layer.

A searchable layer ``l`` holds architecture logits ``alpha_w`` over the weight candidates and
``alpha_a`` over the activation candidates, one quantizer per candidate (LSQ by default) and the
shared full-precision weight. Its forward is::

    W_q = sum_i softmax(alpha_w)_i * Q_i(W)        x_q = sum_j softmax(alpha_a)_j * Q_j(x)
    y   = conv(x_q, W_q)                           (one convolution, not one per pair)

With LSQ quantizers both sums run as one fused autograd function (:func:`mix_quantized`): only
the input is kept for the backward (no copy, no per-candidate tensors), the backward recomputes
the integer grids ``round(clamp(x / s_i))`` and gets the input, step and mixing-probability
gradients with a few dot products, block by block so that on CPUs every temporary stays in
cache. Other quantizers (PACT, max-abs, DoReFa) mix their outputs directly.

Fixed layers (the first conv and the last linear layer by default) become ordinary
:class:`~mpqkit.quant.QConv2d` / :class:`~mpqkit.quant.QLinear` at their fixed bits.

Expected complexity, differentiable in the logits, at the deployment input size::

    bitops:  C = sum_l MACs[l] * E[b_w[l]] * E[b_a[l]]   (+ fixed layers at their bits)
    size_mb: C = sum_l params[l] * E[b_w[l]] / 8 / 1e6   (+ fixed layers at their bits)

in the units of :class:`mpqkit.complexity.Budget` and with its conventions (full-precision
fixed layers count no BitOps but 32 bits of size).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpqkit.complexity import FP, MB, LayerInfo, normalize_input_size, profile_model
from mpqkit.engine.trainer import evaluate_model
from mpqkit.errors import ConfigError, ModelError
from mpqkit.optim.bn import frozen_bn_stats
from mpqkit.policy import FIRST_LAST_MODES, Policy, first_last_bits, first_last_layers
from mpqkit.quant import fused
from mpqkit.quant.convert import passing_through, quantized_class
from mpqkit.quant.layers import QuantConfig, QuantMixin, quantizable_layers
from mpqkit.quant.quantizers import (
    LSQQuantizer,
    Quantizer,
    check_bits,
    cpu_block,
    make_act_quantizer,
    make_weight_quantizer,
    raw_step,
)

__all__ = [
    "MixedConv2d", "MixedLinear", "MixedQuantMixin", "Supernet", "build_supernet",
    "mix_quantized", "parse_candidates",
]


# ----------------------------------------------------------------------------------------------
# candidates
# ----------------------------------------------------------------------------------------------
def parse_candidates(value: str | Iterable[int], what: str = "bit candidates") -> tuple[int, ...]:
    """``"2,3,4,6"`` or ``[2, 3, 4, 6]`` -> ``(2, 3, 4, 6)`` (sorted, unique, each in 2..8)."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"cannot read {what} {value!r}: write integers separated by commas, "
                              "e.g. 2,3,4,6") from None
    elif isinstance(value, int):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise ConfigError(f"no {what} given: write integers separated by commas, e.g. 2,3,4,6")
    out = sorted({check_bits(b, what) for b in items})
    if out[-1] >= FP:
        raise ConfigError(f"{what} {out} include full precision (32), which a search cannot trade "
                          "against BitOps: use bit-widths in 2..8")
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# fused mixing of LSQ quantizers
# ----------------------------------------------------------------------------------------------
def _lsq_grad_scale(q: LSQQuantizer, x: Tensor, qmax: int) -> float:
    """The LSQ step-gradient scale ``1 / sqrt(n * qmax)``, exactly as :class:`LSQQuantizer`."""
    n = x.numel() // (q.channels if q.per_channel else 1)
    if not q.per_channel and q.channel_dim == 1:  # activation: features per sample
        n = max(1, x[0].numel())
    return 1.0 / math.sqrt(max(1, n) * max(1, qmax))


def _ensure_ready(q: Quantizer, x: Tensor) -> None:
    """Initialise ``q`` from ``x`` on first use, as :meth:`Quantizer.forward` does."""
    if q.enabled and not q._ready:
        if bool(q.initialized):
            q._ready = True
        else:
            q.init_from(x)


#: Elements per block of the CPU kernel: one block of every temporary stays in cache.
CPU_BLOCK = 1 << 18


def _masks_mode(specs: Sequence[tuple]) -> str:
    if all(sp[0] == 0 for sp in specs):
        return "unsigned"
    if all(sp[0] == -sp[1] for sp in specs):
        return "symmetric"
    return "general"


def _steps(raw: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`~mpqkit.quant.quantizers.raw_step` of raw per-tensor LSQ parameters as one
    vector: the steps and ``d step / d raw``."""
    return raw_step(torch.cat([t.reshape(1) for t in raw]))


class _MixedLSQTensor(torch.autograd.Function):
    """``sum_i p_i * s_i * clamp(round(x / s_i), qmin_i, qmax_i)``, per-tensor steps, LSQ grads.

    ``scales`` are the candidates' raw LSQ parameters: each step is ``|scale|`` floored at
    ``MIN_RANGE`` (:meth:`LSQQuantizer._scale`), computed here for all candidates at once
    instead of by four autograd nodes per candidate, its gradient going back through it as
    autograd's would. Only ``x`` is saved (no copy); the backward recomputes the integer grids
    ``q_i`` block by block (``CPU_BLOCK`` elements on CPU, so the temporaries stay in cache; one
    block on GPUs). With ``g`` the output gradient and ``M_i`` the in-range mask of candidate
    ``i``:

        dL/dx   = g * sum_i p_i M_i                         (straight-through inside the range)
        dL/dp_i = s_i * sum(g * q_i)
        dL/ds_i = gs_i * p_i * sum(g * (q_i - x/s_i * M_i))   (the LSQ step gradient)
    """

    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, specs: tuple, *scales: Tensor) -> Tensor:
        xc = x.contiguous()
        steps = _steps(scales)[0].to(x.dtype)
        coefs = probs * steps
        ctx.specs = specs
        ctx.save_for_backward(x, probs, *scales)
        res = fused.mix_forward(xc, steps, coefs, tuple(sp[:2] for sp in specs))
        if res is not None:  # one compiled pass
            return res
        out = torch.empty_like(xc)
        xf, of = xc.view(-1), out.view(-1)
        s0, coef = steps.unbind(), coefs.unbind()
        n = xf.numel()
        block = cpu_block(CPU_BLOCK) if x.device.type == "cpu" else max(1, n)
        buf = torch.empty(min(block, n), dtype=xf.dtype, device=xf.device)
        for xb, ob in zip(xf.split(block), of.split(block)):
            t = buf if xb.numel() == buf.numel() else buf[:xb.numel()]
            for i, (qmin, qmax, _gs) in enumerate(specs):
                torch.div(xb, s0[i], out=t).round_().clamp_(qmin, qmax)
                if i == 0:
                    torch.mul(t, coef[0], out=ob)
                else:
                    ob.addcmul_(t, coef[i])
        return out.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        specs = ctx.specs
        x, probs, *scales = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        create = torch.is_grad_enabled()  # double backward: differentiable, out-of-place ops
        xf, gf = x.contiguous().view(-1), g.contiguous().view(-1)
        steps, dstep = _steps(scales)
        steps_x = steps.to(x.dtype)
        s0 = steps_x.unbind()
        res = None if create else fused.mix_backward(xf, gf, steps_x, probs,
                                                     tuple(sp[:2] for sp in specs))
        if res is not None:  # one compiled pass
            grad_x, a_sum, c_sum = res
        elif x.device.type == "cpu" and not create:
            grad_x, a_sum, c_sum = _mixed_backward_cpu(xf, gf, probs, s0, specs, need_x)
        else:
            grad_x, a_sum, c_sum = _mixed_backward_whole(xf, gf, probs, s0, specs, need_x,
                                                         create)
        return _mixed_grads(x, probs, scales, specs, grad_x, a_sum, c_sum, need_p, steps, dstep)


def _mixed_backward_whole(xf: Tensor, gf: Tensor, probs: Tensor, s0: Sequence[Tensor],
                          specs: tuple, need_x: bool, create: bool
                          ) -> tuple[Tensor | None, Tensor, Tensor]:
    """The backward of :class:`_MixedLSQTensor` on the whole tensor at once (GPUs, and double
    backward: differentiable, out-of-place ops)."""
    mode = _masks_mode(specs)
    if mode == "unsigned":
        base = xf.clamp_min(0)
        gx = gf * base
    elif mode == "symmetric":
        base, gx = xf.abs(), gf * xf
    else:
        base, gx = xf, gf * xf
    a_parts, c_parts = [], []
    m: Tensor | None = None
    for i, (qmin, qmax, _gs) in enumerate(specs):
        t = torch.div(xf, s0[i]).round_().clamp_(qmin, qmax)
        a_parts.append(torch.dot(gf, t))
        mask = _range_mask(xf, base, qmin * s0[i], qmax * s0[i], mode)
        c_parts.append(torch.dot(gx, mask))
        if need_x:
            m = mask * probs[i] if m is None else m + mask * probs[i]
    grad_x = _masked_grad_x(gf, m, xf, mode) if need_x else None
    return grad_x, torch.stack(a_parts), torch.stack(c_parts)


def _range_mask(x: Tensor, base: Tensor, lo: Tensor, hi: Tensor, mode: str) -> Tensor:
    """The in-range mask of a candidate as 0/1 values (``base`` is ``x`` folded by ``mode``:
    clamped at 0 for unsigned ranges, absolute for symmetric ones)."""
    if mode == "general":
        return ((x >= lo) & (x <= hi)).to(x.dtype)
    return (base <= hi).to(x.dtype)


def _masked_grad_x(g: Tensor, m: Tensor | None, x: Tensor, mode: str) -> Tensor:
    """``g * sum_i p_i M_i`` (``m``), zero below an unsigned range."""
    assert m is not None
    grad_x = g * m
    return grad_x.masked_fill(x < 0, 0.0) if mode == "unsigned" else grad_x


def _mixed_grads(x: Tensor, probs: Tensor, scales: Sequence[Tensor], specs: tuple,
                 grad_x: Tensor | None, a_sum: Tensor, c_sum: Tensor, need_p: bool,
                 steps: Tensor, dstep: Tensor) -> tuple[Tensor | None, ...]:
    """The outputs of :meth:`_MixedLSQTensor.backward` from the vectors ``a_i = sum(g * q_i)``
    and ``c_i = sum(g * x * M_i)`` over the candidates ``i``."""
    a_sum, c_sum = a_sum.to(steps.dtype), c_sum.to(steps.dtype)
    gp = (a_sum * steps).to(probs.dtype) if need_p else None
    gs = torch.tensor([sp[2] for sp in specs], dtype=steps.dtype, device=steps.device)
    grad_s = ((a_sum - c_sum / steps) * (probs.to(steps.dtype) * gs) * dstep).unbind()
    gx = grad_x.view_as(x) if grad_x is not None else None
    return (gx, gp, None, *(grad_s[i].reshape(s.shape).to(s.dtype)
                            for i, s in enumerate(scales)))


def _mixed_backward_cpu(xf: Tensor, gf: Tensor, probs: Tensor, s0: Sequence[Tensor],
                        specs: tuple, need_x: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """The CPU backward of :class:`_MixedLSQTensor`, ``CPU_BLOCK`` elements at a time.

    Per candidate ``t = x / s_i``, ``c = clamp(t, qmin, qmax)``, ``M_i = (c == t)`` (the range
    test of the reference quantizer, on ``x / s_i``), ``q_i = round(c)``. Masks are 0/1 floats
    written by comparisons into float buffers: bool tensors (``&``, ``masked_fill``,
    ``.to(dtype)``) cost several times more on CPUs than arithmetic. Returns ``grad_x`` and the
    vectors ``a_i``, ``c_i``.
    """
    k, n = len(s0), xf.numel()
    block = cpu_block(CPU_BLOCK)
    bufs = torch.empty(5, min(block, n), dtype=xf.dtype)
    parts: list[Tensor] = []  # per block: a_0, c_0, a_1, c_1, ...
    grad_x = torch.empty_like(xf) if need_x else None
    gx_blocks = grad_x.split(block) if grad_x is not None else ()
    for j, (xb, gb) in enumerate(zip(xf.split(block), gf.split(block))):
        t, c, mask, acc, gxb = bufs if xb.numel() == bufs.shape[1] else bufs[:, :xb.numel()]
        torch.mul(gb, xb, out=gxb)
        for i, (qmin, qmax, _gs) in enumerate(specs):
            torch.div(xb, s0[i], out=t)
            torch.eq(torch.clamp(t, qmin, qmax, out=c), t, out=mask)
            parts.append(torch.dot(gb, c.round_()))
            parts.append(torch.dot(gxb, mask))
            if need_x:
                if i == 0:
                    torch.mul(mask, probs[0], out=acc)
                else:
                    acc.addcmul_(mask, probs[i])
        if need_x:
            torch.mul(gb, acc, out=gx_blocks[j])
    sums = torch.stack(parts).view(-1, k, 2).sum(0) if parts else xf.new_zeros(k, 2)
    return grad_x, sums[:, 0], sums[:, 1]


class _MixedLSQChannel(torch.autograd.Function):
    """The same mixture with per-channel steps (weights); saves the integer grids."""

    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, specs: tuple, *scales: Tensor) -> Tensor:
        out: Tensor | None = None
        grids = []
        for i, (s, (qmin, qmax, _gs, _rd)) in enumerate(zip(scales, specs)):
            t = torch.div(x, s)
            t.round_().clamp_(qmin, qmax)
            c = probs[i] * s
            if out is None:
                out = t * c
            else:
                out.addcmul_(t, c)
            grids.append(t)
        ctx.specs = specs
        ctx.n = len(scales)
        ctx.save_for_backward(x, probs, *scales, *grids)
        assert out is not None
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        specs, k = ctx.specs, ctx.n
        saved = ctx.saved_tensors
        x, probs = saved[0], saved[1]
        scales, grids = saved[2:2 + k], saved[2 + k:]
        need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_s = ctx.needs_input_grad[3:]
        mode = _masks_mode(specs)
        base = x.clamp_min(0) if mode == "unsigned" else (x.abs() if mode == "symmetric" else x)
        gx = g * x.clamp_min(0) if mode == "unsigned" else g * x
        m: Tensor | None = None
        grad_p = []
        grad_s: list[Tensor | None] = []
        for i in range(k):
            s, q = scales[i], grids[i]
            qmin, qmax, gs, rd = specs[i]
            mask = _range_mask(x, base, qmin * s, qmax * s, mode)
            a_sum = (g * q).sum(dim=rd, keepdim=True)
            c_sum = (gx * mask).sum(dim=rd, keepdim=True)
            grad_p.append((a_sum * s).sum() if need_p else None)
            grad_s.append((a_sum - c_sum / s) * (probs[i] * gs) if need_s[i] else None)
            if need_x:
                m = mask * probs[i] if m is None else m + mask * probs[i]
        grad_x = _masked_grad_x(g, m, x, mode) if need_x else None
        gp = torch.stack(grad_p).to(probs.dtype) if need_p else None  # type: ignore[arg-type]
        return (grad_x, gp, None, *grad_s)


def mix_quantized(x: Tensor, quantizers: Sequence[Quantizer], probs: Tensor) -> Tensor:
    """``sum_i probs[i] * quantizers[i](x)``; fused (one pass per candidate) for LSQ quantizers.

    Uninitialised quantizers are initialised from ``x`` first (as on their own first call).
    """
    for q in quantizers:
        _ensure_ready(q, x)
    fused = not torch.compiler.is_compiling()  # compiled: the plain sum, which inductor fuses
    if fused and all(isinstance(q, LSQQuantizer) and q.enabled for q in quantizers):
        p = probs.to(x.dtype)
        if not any(q.per_channel for q in quantizers):
            specs = tuple((qmin, qmax, _lsq_grad_scale(q, x, qmax))
                          for q in quantizers for qmin, qmax in [q.int_range()])
            return _MixedLSQTensor.apply(x, p, specs, *(q.scale for q in quantizers))
        scales = [q._scale(x) for q in quantizers]
        specs = tuple((*q.int_range(), _lsq_grad_scale(q, x, q.int_range()[1]),
                       q._reduce_dims(x)) for q in quantizers)
        return _MixedLSQChannel.apply(x, p, specs, *scales)
    out = probs[0] * quantizers[0](x)
    for i in range(1, len(quantizers)):
        out = out + probs[i] * quantizers[i](x)
    return out


# ----------------------------------------------------------------------------------------------
# mixed layers
# ----------------------------------------------------------------------------------------------
class MixedQuantMixin:
    """A layer with logits over weight and activation bit candidates (shared FP weight)."""

    weight: nn.Parameter
    alpha_w: nn.Parameter
    alpha_a: nn.Parameter
    wqs: nn.ModuleList
    aqs: nn.ModuleList

    def _init_mixed(self, w_cands: Sequence[int], a_cands: Sequence[int],
                    config: QuantConfig) -> None:
        self.w_candidates = tuple(int(b) for b in w_cands)
        self.a_candidates = tuple(int(b) for b in a_cands)
        self.qconfig = config
        dev = self.weight.device
        self.alpha_w = nn.Parameter(torch.zeros(len(self.w_candidates), device=dev))
        self.alpha_a = nn.Parameter(torch.zeros(len(self.a_candidates), device=dev))
        out_ch = self.weight.shape[0]
        self.wqs = nn.ModuleList(make_weight_quantizer(config.weight_method, b, out_ch,
                                                       config.per_channel)
                                 for b in self.w_candidates).to(dev)
        self.aqs = nn.ModuleList(make_act_quantizer(config.act_method, b, config.act_signed)
                                 for b in self.a_candidates).to(dev)
        self.fp_mode = False  # calibration: run the float layer

    @classmethod
    def from_float(cls, module: nn.Module, w_cands: Sequence[int], a_cands: Sequence[int],
                   config: QuantConfig | None = None) -> nn.Module:
        """A mixed copy of ``module`` sharing its parameter tensors."""
        m = cls.__new__(cls)
        m.__dict__ = module.__dict__.copy()
        m._parameters = dict(module._parameters)
        m._buffers = dict(module._buffers)
        m._modules = dict(module._modules)
        m._init_mixed(w_cands, a_cands, config or QuantConfig())
        return m

    # -- probabilities and expectations ---------------------------------------------------------
    def probs(self) -> tuple[Tensor, Tensor]:
        """Softmax of the weight and activation logits."""
        return torch.softmax(self.alpha_w, 0), torch.softmax(self.alpha_a, 0)

    def argmax_bits(self) -> tuple[int, int]:
        return (self.w_candidates[int(self.alpha_w.detach().argmax())],
                self.a_candidates[int(self.alpha_a.detach().argmax())])

    def decidedness(self) -> float:
        """Mean softmax margin (top-1 minus top-2 probability) of the two logit vectors."""
        out = []
        for a in (self.alpha_w, self.alpha_a):
            p = torch.softmax(a.detach().float(), 0)
            top = p.topk(min(2, p.numel())).values
            out.append(float(top[0] - top[1]) if top.numel() > 1 else 1.0)
        return sum(out) / len(out)

    def mixed_weight(self) -> Tensor:
        return mix_quantized(self.weight, list(self.wqs), torch.softmax(self.alpha_w, 0))

    def mixed_input(self, x: Tensor) -> Tensor:
        return mix_quantized(x, list(self.aqs), torch.softmax(self.alpha_a, 0))

    def set_one_hot(self, w_bits: int, a_bits: int, logit: float = 1e4) -> None:
        """Put (almost) all mass on one candidate pair (for tests and inspection)."""
        with torch.no_grad():
            self.alpha_w.zero_()
            self.alpha_a.zero_()
            self.alpha_w[self.w_candidates.index(w_bits)] = logit
            self.alpha_a[self.a_candidates.index(a_bits)] = logit

    def _mixed_repr(self) -> str:
        return f", w_cands={list(self.w_candidates)}, a_cands={list(self.a_candidates)}"


class MixedConv2d(MixedQuantMixin, nn.Conv2d):
    """Conv2d mixing its candidate quantizations of weight and input; one convolution."""

    def forward(self, x: Tensor) -> Tensor:
        if self.fp_mode:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(self.mixed_input(x), self.mixed_weight(), self.bias)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + self._mixed_repr()


class MixedLinear(MixedQuantMixin, nn.Linear):
    """Linear mixing its candidate quantizations of weight and input; one matmul."""

    def forward(self, x: Tensor) -> Tensor:
        if self.fp_mode:
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.mixed_input(x), self.mixed_weight(), self.bias)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + self._mixed_repr()


_MIXED: dict[type[nn.Module], type[MixedQuantMixin]] = {nn.Conv2d: MixedConv2d,
                                                        nn.Linear: MixedLinear}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ----------------------------------------------------------------------------------------------
# the supernet
# ----------------------------------------------------------------------------------------------
class Supernet(nn.Module):
    """A model whose searchable layers are mixed layers; the fixed ones are quantized layers.

    Built by :func:`build_supernet`. ``supernet.net`` is the wrapped model (its layers keep their
    fully-qualified names); ``supernet(x)`` runs it.
    """

    def __init__(self, net: nn.Module, infos: Mapping[str, LayerInfo], searchable: Sequence[str],
                 fixed_bits: Mapping[str, tuple[int, int]], w_candidates: Sequence[int],
                 a_candidates: Sequence[int], input_size: tuple[int, int], first_last: str,
                 model_name: str = "", quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.net = net
        self.infos = dict(infos)
        self.searchable = list(searchable)
        self.fixed_bits = {n: (int(w), int(a)) for n, (w, a) in fixed_bits.items()}
        self.w_candidates = tuple(w_candidates)
        self.a_candidates = tuple(a_candidates)
        self.input_size = tuple(input_size)
        self.first_last = first_last
        self.model_name = model_name
        self.quant = quant or QuantConfig()
        mods = dict(net.named_modules())
        self._mixed = {n: mods[n] for n in self.searchable}
        self.register_buffer("_macs", torch.tensor([float(infos[n].macs) for n in self.searchable],
                                                   dtype=torch.float64), persistent=False)
        self.register_buffer("_params", torch.tensor(
            [float(infos[n].params) for n in self.searchable], dtype=torch.float64),
            persistent=False)
        self.register_buffer("_wc", torch.tensor(self.w_candidates, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("_ac", torch.tensor(self.a_candidates, dtype=torch.float64),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # -- parameters -----------------------------------------------------------------------------
    def mixed_layers(self) -> dict[str, MixedQuantMixin]:
        """The searchable layers by name, in model order."""
        return dict(self._mixed)  # type: ignore[arg-type]

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture logits (``alpha_w`` and ``alpha_a`` of every mixed layer)."""
        out = []
        for m in self._mixed.values():
            out += [m.alpha_w, m.alpha_a]
        return out

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter that is not an architecture logit."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch and p.requires_grad]

    # -- complexity -----------------------------------------------------------------------------
    def fixed_cost(self, kind: str) -> float:
        """Cost of the fixed layers (budget conventions)."""
        total = 0.0
        for n, (w, a) in self.fixed_bits.items():
            info = self.infos[n]
            if kind == "bitops":
                total += float(info.macs * w * a) if (w < FP and a < FP) else 0.0
            elif kind == "size_mb":
                total += info.params * w / 8 / MB
            else:
                raise ConfigError(f"complexity kind {kind!r} is unknown: use bitops or size_mb")
        return total

    def expected_bits(self) -> tuple[Tensor, Tensor]:
        """``E[b_w]`` and ``E[b_a]`` per searchable layer (float64, differentiable)."""
        if not self._mixed:
            z = torch.zeros(0, dtype=torch.float64, device=self._wc.device)
            return z, z
        aw = torch.stack([m.alpha_w for m in self._mixed.values()]).double()
        aa = torch.stack([m.alpha_a for m in self._mixed.values()]).double()
        return torch.softmax(aw, 1) @ self._wc, torch.softmax(aa, 1) @ self._ac

    def expected_complexity(self, kind: str = "bitops") -> Tensor:
        """Differentiable expected BitOps (or size in MB), fixed layers included (float64)."""
        ew, ea = self.expected_bits()
        if kind == "bitops":
            c = (self._macs * ew * ea).sum()
        elif kind == "size_mb":
            c = (self._params * ew).sum() / 8 / MB
        else:
            raise ConfigError(f"complexity kind {kind!r} is unknown: use bitops or size_mb")
        return c + self.fixed_cost(kind)

    # -- the policy -----------------------------------------------------------------------------
    def argmax_bits(self) -> dict[str, tuple[int, int]]:
        """Bits of every quantizable layer: argmax of the logits, fixed layers at their bits."""
        out = {}
        for n in self.infos:
            out[n] = self.fixed_bits[n] if n in self.fixed_bits else self._mixed[n].argmax_bits()
        return out

    def decidedness(self) -> dict[str, float]:
        """Per searchable layer, the mean softmax margin of its logits (0 = undecided)."""
        return {n: m.decidedness() for n, m in self._mixed.items()}

    def decision_stats(self) -> dict[str, float]:
        """How decided the logits are, over every weight and activation logit vector.

        ``top1_prob``: mean top-1 softmax probability (1/k undecided, 1 decided); ``entropy``:
        mean entropy of the softmax divided by ``log k`` (1 undecided, 0 decided); ``margin``:
        mean top-1 minus top-2 probability (:meth:`decidedness`).
        """
        top, ent = [], []
        for m in self._mixed.values():
            for p in m.probs():
                p = p.detach().float()
                top.append(float(p.max()))
                k = p.numel()
                ent.append(float(-(p * p.clamp_min(1e-12).log()).sum()) / math.log(k)
                           if k > 1 else 0.0)
        marg = list(self.decidedness().values())
        n = max(len(top), 1)
        return {"top1_prob": sum(top) / n if top else 1.0, "entropy": sum(ent) / n,
                "margin": sum(marg) / len(marg) if marg else 1.0}

    def alpha_probs(self) -> dict[str, dict[str, list[float]]]:
        """Per searchable layer, the softmax of the weight and activation logits."""
        out = {}
        for n, m in self._mixed.items():
            pw, pa = m.probs()
            out[n] = {"w": [round(float(v), 6) for v in pw.detach().cpu()],
                      "a": [round(float(v), 6) for v in pa.detach().cpu()]}
        return out

    def policy(self, bits: Mapping[str, tuple[int, int]] | None = None, *,
               provenance: Mapping[str, Any] | None = None,
               budget: Mapping[str, Any] | None = None) -> Policy:
        """The argmax policy (or ``bits``) as a :class:`~mpqkit.policy.Policy`."""
        prov = {"method": "supernet-argmax"}
        prov.update(provenance or {})
        return Policy.from_bits(self.net, dict(bits) if bits is not None else self.argmax_bits(),
                                self.input_size, model_name=self.model_name,
                                first_last=self.first_last, fixed=list(self.fixed_bits),
                                w_candidates=self.w_candidates, a_candidates=self.a_candidates,
                                provenance=prov, budget=budget, infos=self.infos)

    def set_policy(self, bits: Mapping[str, tuple[int, int]]) -> None:
        """Put (almost) all of every searchable layer's mass on its bits in ``bits`` (keyed by
        module name, e.g. a policy's ``{name: (w_bits, a_bits)}``): the supernet then computes
        that policy's sub-network with the shared weights."""
        for name, layer in self._mixed.items():
            if name not in bits:
                raise ConfigError(f"the policy has no bits for searchable layer {name!r}: give "
                                  "a policy of this model (every layer, keyed by module name)")
            w, a = bits[name]
            if w not in layer.w_candidates or a not in layer.a_candidates:
                raise ConfigError(
                    f"{name}: w{w}a{a} is not among the supernet's candidates (weights "
                    f"{list(layer.w_candidates)}, activations {list(layer.a_candidates)}): "
                    "rate policies searched with the same candidates")
            layer.set_one_hot(int(w), int(a))

    # -- calibration ----------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Initialise every candidate quantizer (and the fixed layers') from one batch.

        The batch runs through the float network (mixed layers in full precision, fixed layers'
        quantizers bypassed) in training mode with BatchNorm statistics frozen; every activation
        quantizer is initialised from its layer's float input, every weight quantizer from the
        weight.
        """
        layers = {n: m for n, m in self.net.named_modules()
                  if isinstance(m, MixedQuantMixin | QuantMixin)}
        seen: dict[str, Tensor] = {}
        hooks = [m.register_forward_pre_hook(
            lambda mod, inp, n=n: seen.__setitem__(n, inp[0].detach())) for n, m in layers.items()]
        for m in layers.values():
            if isinstance(m, MixedQuantMixin):
                m.fp_mode = True
        was_training = self.training
        self.train()
        try:  # the fixed layers' quantizers pass through, as in mpqkit.quant.calibrate
            with passing_through(self.net), frozen_bn_stats(self.net):
                self.net(x)
        finally:
            for h in hooks:
                h.remove()
            for m in layers.values():
                if isinstance(m, MixedQuantMixin):
                    m.fp_mode = False
            self.train(was_training)
        for n, m in layers.items():
            if isinstance(m, MixedQuantMixin):
                wqs, aqs = list(m.wqs), list(m.aqs)
            else:
                wqs, aqs = [m.wq], [m.aq]
            for q in wqs:
                q.init_from(m.weight)
            if n in seen:
                for q in aqs:
                    q.init_from(seen[n])


def build_supernet(model: nn.Module, input_size: int | tuple[int, int], *,
                   w_bits: str | Iterable[int] = (2, 3, 4, 6),
                   a_bits: str | Iterable[int] = (2, 3, 4, 6), first_last: str = "8bit",
                   quant: QuantConfig | None = None, model_name: str = "",
                   infos: Mapping[str, LayerInfo] | None = None,
                   inplace: bool = False) -> Supernet:
    """Wrap ``model`` into a :class:`Supernet` (a deep copy unless ``inplace``).

    ``first_last``: ``"8bit"`` (first conv and last linear fixed at 8/8, counted in BitOps),
    ``"fp"`` (fixed at full precision, not counted in BitOps) or ``"search"`` (searched like any
    other layer). Complexity is profiled at ``input_size`` (the deployment resolution).
    """
    if first_last not in FIRST_LAST_MODES:
        raise ConfigError(f"first_last={first_last!r} is unknown: use one of "
                          f"{', '.join(FIRST_LAST_MODES)}")
    wc = parse_candidates(w_bits, "weight bit candidates")
    ac = parse_candidates(a_bits, "activation bit candidates")
    hw = normalize_input_size(input_size)
    infos = dict(infos) if infos is not None else profile_model(model, hw)
    fb = first_last_bits(first_last)
    ends = first_last_layers(infos) if fb is not None else []
    fixed_bits = {n: fb for n in ends} if fb is not None else {}
    searchable = [n for n in infos if n not in fixed_bits]
    config = quant or QuantConfig()
    net = model if inplace else copy.deepcopy(model)
    layers = quantizable_layers(net)
    missing = [n for n in infos if n not in layers]
    if missing:
        raise ModelError(f"layers {', '.join(missing[:6])} were profiled but are not in the model: "
                         "profile the same model you pass")
    for name, mod in layers.items():
        if isinstance(mod, QuantMixin):
            mod = mod.to_float()
        if name in fixed_bits:
            qcls = quantized_class(name, mod)  # as quantize_model: timm's Linear, ...
            w, a = fixed_bits[name]
            new = qcls.from_float(mod, w, a, config)
            for q in (new.wq, new.aq):  # full-precision quantizers have unused parameters
                if not q.enabled:
                    q.requires_grad_(False)
        else:
            mcls = _MIXED.get(type(mod))
            if mcls is None:
                raise ModelError(f"layer {name!r} is a {type(mod).__name__}, which the supernet "
                                 "cannot mix: only Conv2d and Linear layers can be searched")
            new = mcls.from_float(mod, wc, ac, config)  # type: ignore[attr-defined]
        _set_submodule(net, name, new)
    return Supernet(net, infos, searchable, fixed_bits, wc, ac, hw, first_last, model_name,
                    config)


@torch.no_grad()
def rate_policy(supernet: Supernet, bits: Mapping[str, tuple[int, int]],
                calib: Sequence[tuple[Tensor, Tensor]],
                batches: Sequence[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """How the supernet's shared weights rate a policy: the sub-network of ``bits``
    (:meth:`Supernet.set_policy`, on a copy) with its BatchNorm statistics re-estimated on the
    ``calib`` batches (a cumulative average in training mode, as one-shot NAS evaluates its
    sub-networks), then :func:`~mpqkit.engine.trainer.evaluate_model` on ``batches``: loss,
    top-1 and top-5 (%), images ``n``.
    """
    if not calib or not batches:
        raise ConfigError("rate_policy needs at least one batch for the BatchNorm statistics "
                          "(calib) and one to rate on (batches)")
    net = copy.deepcopy(supernet)
    net.set_policy(bits)
    dev = next(net.parameters()).device  # the batches go where the supernet is
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calib batches
    net.train()
    for x, _ in calib:
        net(x.to(dev))
    return evaluate_model(net, batches, dev, desc="rating", progress=False)
