"""Fake quantizers with the bit-width as a value.

Conventions (stated once, used everywhere):

* ``bits`` is an int in 2..8, or 32 for full precision (the quantizer is then the identity).
* Weights are signed and symmetric: integers in ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (``2**b - 1``
  levels, zero exactly representable), per tensor or per output channel.
* Activations after a ReLU are unsigned: integers in ``[0, 2**b - 1]`` (``2**b`` levels). Other
  activations are signed: ``[-2**(b-1), 2**(b-1) - 1]``. With ``signed=None`` the sign is decided
  from the first batch the quantizer sees (calibration): non-negative inputs mean unsigned.
* ``x_q = clamp(round(x / s), qmin, qmax) * s`` with straight-through gradients for ``x`` inside
  the range and the LSQ gradient for the step ``s``.

Every quantizer exposes :meth:`Quantizer.qparams` (scale, qmin, qmax) so export can store the same
integers that training used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mpqkit.errors import ConfigError, NonFiniteError
from mpqkit.quant import fused
from mpqkit.quant.adjoint import ConstantInput

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
MIN_RANGE = 1e-8  # the smallest range (max-abs) a quantizer is calibrated to
FULL_PRECISION = 32

WEIGHT_METHODS = ("lsq", "maxabs", "dorefa")
ACT_METHODS = ("lsq", "pact")


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` as int, or raise a one-line error if it is not in 2..8 or 32."""
    if isinstance(bits, bool) or not isinstance(bits, int | float) or int(bits) != bits:
        raise ConfigError(f"{what}={bits!r} is not an integer: use a bit-width in 2..8, or 32 for "
                          "full precision")
    bits = int(bits)
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{what}={bits} is outside the supported range: use 2..8, or 32 for full "
                          "precision")
    return bits


def int_range(bits: int, signed: bool, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide quantizer."""
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if symmetric else -qmax - 1), qmax
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return (x.round() - x).detach() + x


def keep_nonfinite(q: Tensor, x: Tensor) -> Tensor:
    """``q`` where ``x`` is finite, ``x`` (NaN/inf) elsewhere.

    The clamp of a quantizer would turn an infinite input into a finite ``qmax * scale``: the
    loss would stay finite over a diverged layer (and its BatchNorm statistics), and the inf
    would come back as NaN in the backward pass. Passing it on makes the divergence visible at
    the layer where it happened.
    """
    return torch.where(torch.isfinite(x), q, x)


def raw_step(raw: Tensor) -> tuple[Tensor, Tensor]:
    """The step ``|raw|`` floored at ``MIN_RANGE`` of raw LSQ parameters (element-wise), and
    ``d step / d raw`` as autograd has it for ``abs`` then ``clamp_min``: ``sgn(raw)``, 0 below
    the floor. Differentiable (a double backward's steps are). :class:`_LSQTensorCPU` computes
    the same per-tensor pair as Python floats."""
    return raw.abs().clamp_min(MIN_RANGE), raw.sgn() * (raw.abs() >= MIN_RANGE)


def _in_range_and_dstep(xs: Tensor, q: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """The in-range mask of ``xs = x / s`` and LSQ's ``d(x_q)/ds``: ``q - x/s`` inside
    ``[qmin, qmax]``, ``q`` (= qmin or qmax) outside (``q`` the integer grid)."""
    inside = (xs >= qmin) & (xs <= qmax)
    return inside, torch.where(inside, q - xs, q)


def _lsq_grads(xs: Tensor, q: Tensor, grad: Tensor, qmin: int, qmax: int, grad_scale: float,
               reduce_dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """LSQ gradients from ``xs = x / s`` and the integer grid ``q`` (differentiable ops only).

    ``grad_x`` is straight-through inside ``[qmin, qmax]`` and 0 outside; ``d(x_q)/ds`` is
    ``q - x/s`` inside the range and ``q`` (= qmin or qmax) outside; the step's gradient is the
    sum of that times ``grad`` (over ``reduce_dims``, or all), times ``grad_scale``.
    """
    grad = grad.float()
    inside, dstep = _in_range_and_dstep(xs, q, qmin, qmax)
    # where, not a product: an infinite gradient outside the range must give 0, not NaN
    grad_x = torch.where(inside, grad, 0.0)
    ds = dstep * grad
    grad_s = ds.sum(dim=reduce_dims, keepdim=True) if reduce_dims else ds.sum()
    return grad_x, grad_s * grad_scale


class _LSQFunction(torch.autograd.Function):
    """Fused LSQ fake quantization (Esser et al. 2020): whole-tensor ops, one autograd node.

    Computed in float32 whatever the input's dtype (under autocast a half-precision ``x / s``
    overflows for small steps, and the step's gradient is a sum over the whole tensor). This is
    the reference form: GPUs, per-channel steps, other dtypes and ``torch.compile`` (which fuses
    it into one kernel each way) use it; float32 per-tensor steps on CPU run
    :class:`_LSQTensorCPU`, which has the same values and gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_scale: float,
                reduce_dims: tuple[int, ...]) -> Tensor:
        xs = x.float() / scale.float()
        q = keep_nonfinite(xs.round().clamp_(qmin, qmax), xs)
        ctx.save_for_backward(xs, q)
        ctx.qmin, ctx.qmax, ctx.grad_scale, ctx.reduce_dims = qmin, qmax, grad_scale, reduce_dims
        ctx.scale_shape, ctx.scale_dtype, ctx.x_dtype = scale.shape, scale.dtype, x.dtype
        return (q * scale.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xs, q = ctx.saved_tensors
        grad_x, grad_s = _lsq_grads(xs, q, grad, ctx.qmin, ctx.qmax, ctx.grad_scale,
                                    ctx.reduce_dims)
        grad_s = grad_s.reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return grad_x.to(ctx.x_dtype), grad_s, None, None, None, None


#: Elements per block of the CPU kernel (1 MiB of float32): the temporaries of a block stay in
#: the core's caches, so an extra pass over them costs far less than one over the whole tensor
#: (measured best of 2**14..2**22 on ResNet-20 activations).
LSQ_CPU_BLOCK = 1 << 18


def cpu_block(per_thread: int) -> int:
    """Block size of a blocked CPU kernel: ``per_thread`` elements per intra-op thread, so that
    each thread's share stays in its core's cache and the parallel regions (one per operation
    and block: costly when a core is shared) are as few as the threads allow."""
    return per_thread * max(1, torch.get_num_threads())


class _LSQTensorCPU(torch.autograd.Function):
    """:class:`_LSQFunction` with a per-tensor step, float32 on CPU, block by block.

    Forward, per block of ``LSQ_CPU_BLOCK`` elements per thread:
    ``y = round(clamp(x / s, qmin, qmax)) * s`` (the input read and the output written once, the
    temporaries in cache). Backward, per block, with ``t = x / s``,
    ``q = round(clamp(t, qmin, qmax))`` and ``m = (clamp(t) == t)`` the in-range mask as 0/1
    floats (comparisons into bool tensors, ``where`` and ``masked_fill`` are
    several times slower on CPU than arithmetic)::

        grad_x = g * m
        grad_s = gs * sum(g * (q - t * m))

    which is ``where(inside, g, 0)`` and ``gs * sum(g * where(inside, q - t, q))``, the reference
    form; the input and the gradient are read once, ``grad_x`` written once. Only ``x`` is saved
    (its producer keeps it alive anyway). Non-finite values (NaN/inf in ``x`` or ``g``) make the
    sum non-finite; that backward is then redone in the reference form, as is a double backward.
    Tensors of :data:`mpqkit.quant.fused.MIN_ELEMENTS` or more run both formulas as one compiled
    pass each (:mod:`mpqkit.quant.fused`), with the same values.

    ``scale`` may be the raw LSQ parameter: the step is ``|scale|`` clamped at ``MIN_RANGE``
    (the identity on a step already positive), computed here instead of by two more autograd
    nodes per call, and its gradient goes back through both exactly as autograd's would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int,
                grad_scale: float) -> Tensor:
        s = scale.reshape(()).abs().clamp_min(MIN_RANGE)  # the step of a raw LSQ parameter
        res = fused.lsq_forward(x, s, qmin, qmax)  # one compiled pass, where it applies
        out, total = res if res is not None else _lsq_cpu_forward(x, s, qmin, qmax)
        if not math.isfinite(total.item()):
            out = keep_nonfinite(out, x)
        ctx.save_for_backward(x, scale)
        raw = scale.item()
        # d step / d raw (raw_step's second value, as a float on this per-call path): sgn(raw),
        # or 0 below the floor; multiplying by it is exact
        ctx.dstep = math.copysign(1.0, raw) if abs(raw) >= MIN_RANGE else 0.0
        ctx.s, ctx.qmin, ctx.qmax, ctx.grad_scale = s, qmin, qmax, grad_scale
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, raw = ctx.saved_tensors
        s, qmin, qmax, gs = ctx.s, ctx.qmin, ctx.qmax, ctx.grad_scale * ctx.dstep
        if not torch.is_grad_enabled():  # not a double backward
            g = g.contiguous()
            res = fused.lsq_backward(x, g, s, qmin, qmax)  # one compiled pass, where it applies
            grad_x, total = res if res is not None else _lsq_cpu_backward(x, g, s, qmin, qmax)
            if math.isfinite(total.item()):
                return grad_x, (total * gs).reshape(raw.shape), None, None, None
        xs = x.detach() / s  # constants, as the reference form saves them
        q = keep_nonfinite(xs.round().clamp(qmin, qmax), xs)
        grad_x, grad_s = _lsq_grads(xs, q, g, qmin, qmax, gs, ())
        return grad_x, grad_s.reshape(raw.shape), None, None, None


def _lsq_cpu_forward(x: Tensor, s: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """The eager forward of :class:`_LSQTensorCPU`: ``round(clamp(x / s)) * s`` block by block,
    and ``sum(x / s)`` (finite unless ``x`` holds NaN/inf, or overflows: the same path)."""
    block = cpu_block(LSQ_CPU_BLOCK)
    if x.numel() <= block:  # one block (every weight): fewer calls, the same values
        out = torch.div(x, s)
        total = out.sum()
        out.clamp_(qmin, qmax).round_().mul_(s)
        return out, total
    out = torch.empty_like(x)
    buf = torch.empty(block, dtype=x.dtype)
    sums = []
    for xb, ob in zip(x.view(-1).split(block), out.view(-1).split(block)):
        t = torch.div(xb, s, out=buf[:xb.numel()])
        sums.append(t.sum())
        torch.mul(t.clamp_(qmin, qmax).round_(), s, out=ob)
    return out, torch.stack(sums).sum()


def _lsq_cpu_backward(x: Tensor, g: Tensor, s: Tensor, qmin: int,
                      qmax: int) -> tuple[Tensor, Tensor]:
    """The eager backward of :class:`_LSQTensorCPU`: ``(g * m, sum(g * (q - x/s * m)))`` block
    by block (the sum is not finite when a value is not)."""
    grad_x = torch.empty_like(x)
    xf, gf, of = x.view(-1), g.view(-1), grad_x.view(-1)
    n, block = xf.numel(), cpu_block(LSQ_CPU_BLOCK)
    bufs = torch.empty(3, min(block, n), dtype=x.dtype)
    if n <= block:  # one block (every weight): no splitting, the same values
        total = _lsq_cpu_block(xf, gf, of, s, qmin, qmax, bufs)
    else:
        parts = [_lsq_cpu_block(xb, gb, ob, s, qmin, qmax, bufs[:, :xb.numel()])
                 for xb, gb, ob in zip(xf.split(block), gf.split(block), of.split(block))]
        total = torch.stack(parts).sum()
    return grad_x, total


def _lsq_cpu_block(xb: Tensor, gb: Tensor, ob: Tensor, s: Tensor, qmin: int, qmax: int,
                   bufs: Tensor) -> Tensor:
    """One block of :func:`_lsq_cpu_backward`: writes ``g * m`` to ``ob``, returns the block's
    ``sum(g * (q - x/s * m))``; ``bufs`` is three temporaries of the block's length."""
    t, c, m = bufs
    torch.div(xb, s, out=t)
    torch.eq(torch.clamp(t, qmin, qmax, out=c), t, out=m)
    torch.mul(gb, m, out=ob)
    e = c.round_().addcmul_(t, m, value=-1)  # q - x/s inside the range, q outside
    return torch.dot(e, gb)  # one pass (product and sum fused)


def _use_cpu_kernel(x: Tensor, scale: Tensor) -> bool:
    """Whether :class:`_LSQTensorCPU` applies (eager, CPU, float32, dense, per-tensor step)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and scale.numel() == 1
            and scale.dtype == torch.float32 and x.is_contiguous()
            and not torch.compiler.is_compiling())


def prepare_for_compile(model: nn.Module) -> nn.Module:
    """Call :meth:`Quantizer.prepare_for_compile` on every quantizer of ``model`` (after
    calibration or loading, before ``torch.compile``); returns ``model``."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.prepare_for_compile()
    return model


def compile_in_place(model: nn.Module) -> nn.Module:
    """:func:`prepare_for_compile`, then ``model.compile()`` (``torch.compile`` of its call, in
    place: parameter names and the state dict stay the same); returns ``model``.

    Call it after calibration (or loading a checkpoint): the quantizers are then traced with
    their integer ranges as constants, with no graph break and no recompilation.
    """
    prepare_for_compile(model)
    model.compile()
    return model


def lsq_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_scale: float,
                 reduce_dims: tuple[int, ...] = ()) -> Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` with the LSQ gradients.

    ``scale`` broadcasts against ``x`` (positive; one element, or per channel with the sums of
    its gradient over ``reduce_dims``). NaN/inf in ``x`` pass through.
    """
    if not reduce_dims and _use_cpu_kernel(x, scale):
        return _LSQTensorCPU.apply(x, scale, qmin, qmax, grad_scale)
    return _LSQFunction.apply(x, scale, qmin, qmax, grad_scale, reduce_dims)


class Quantizer(nn.Module):
    """Base class: a fake quantizer for one tensor with a fixed bit-width.

    Subclasses implement :meth:`_init_from` (range initialisation from a tensor) and
    :meth:`_quantize`. ``bits == 32`` makes the quantizer an identity with no parameters used.
    """

    method: str = ""

    def __init__(self, bits: int, signed: bool | None, symmetric: bool, channels: int = 1,
                 channel_dim: int = 0) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.channels = channels
        self.channel_dim = channel_dim
        # Sign and initialisation state are buffers so they travel with the state dict.
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed)))
        self.register_buffer("initialized", torch.tensor(0))
        self._ready = False  # python-side cache of `initialized`, avoids a device sync per call
        # python-side copy of `signed_flag`: no device sync per call, and no graph break under
        # torch.compile (reading a tensor's value is one); None until read
        self._signed_value: int | None = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.bits != FULL_PRECISION

    @property
    def signed(self) -> bool | None:
        v = self._signed_value
        if v is None:
            v = self._signed_value = int(self.signed_flag)
        return None if v < 0 else bool(v)

    @property
    def per_channel(self) -> bool:
        return self.channels > 1

    def int_range(self) -> tuple[int, int]:
        signed = self.signed
        return int_range(self.bits, True if signed is None else signed, self.symmetric)

    def extra_repr(self) -> str:
        s = "fp32" if not self.enabled else f"bits={self.bits}"
        if self.enabled:
            s += f", signed={self.signed}, per_channel={self.per_channel}"
        return s

    # -- behaviour -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Initialise the range (and the sign, if undecided) from a representative tensor."""
        if not self.enabled:
            return
        if self.signed is None:
            self.signed_flag.fill_(int(bool((x < 0).any())))
            self._signed_value = None
        x = x.detach().float()
        if not self.per_channel and x.numel() > 2**20:  # a strided sample is enough for a range
            x = x.flatten()[:: x.numel() // 2**20 + 1]
        self._init_from(x)
        self.initialized.fill_(1)
        self._ready = True

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._ready = False
        self._signed_value = None
        super()._load_from_state_dict(*args, **kwargs)

    def prepare_for_compile(self) -> None:
        """Read the state buffers into python attributes now, so that a compiled forward needs
        no tensor value (a graph break) and changes no attribute (a recompilation)."""
        if not self._ready and bool(self.initialized):
            self._ready = True
        self._signed_value = None
        _ = self.signed

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        self._ready_for(x)
        return self._quantize(x)

    def _ready_for(self, x: Tensor) -> None:
        """Initialise from ``x`` unless initialised already (from calibration or a checkpoint)."""
        if not self._ready:
            if bool(self.initialized):
                self._ready = True
            else:
                self.init_from(x)

    def quantize_constant(self, x: Tensor) -> ConstantInput | None:
        """For an input that needs no gradient (a network's input batch): ``(x_q, d, p)``, the
        quantized input and, for this quantizer's one learned parameter ``p``, the tensor ``d``
        with ``dL/dp = sum(dL/dx_q * d)`` (``x_q`` and ``d`` are constants); None where that
        form does not apply, and ``self(x)`` is the way to quantize ``x``. A layer that reads
        the input uses it to get ``dL/dp`` without the gradient for the input
        (:mod:`mpqkit.quant.adjoint`)."""
        return None

    def _shape(self, x: Tensor) -> list[int]:
        """Broadcast shape of a per-channel parameter for tensor ``x``."""
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self.channel_dim] = self.channels
        return shape

    def _reduce_dims(self, x: Tensor) -> tuple[int, ...]:
        if not self.per_channel:
            return ()
        return tuple(d for d in range(x.dim()) if d != self.channel_dim)

    def _init_from(self, x: Tensor) -> None:
        raise NotImplementedError

    def _quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def qparams(self, x: Tensor | None = None) -> tuple[Tensor, int, int]:
        """``(scale, qmin, qmax)`` in use; ``scale`` broadcasts against the quantized tensor."""
        raise NotImplementedError

    @torch.no_grad()
    def to_int(self, x: Tensor) -> Tensor:
        """The integers that represent ``x`` (``x_q = to_int(x) * scale``)."""
        scale, qmin, qmax = self.qparams(x)
        return torch.clamp(torch.round(self._pre(x) / scale), qmin, qmax).to(torch.int32)

    def _pre(self, x: Tensor) -> Tensor:
        """Transform applied before the uniform grid (identity except for DoReFa)."""
        return x


def _mse_scale(x: Tensor, qmin: int, qmax: int, reduce_dims: tuple[int, ...],
               shape: list[int], steps: int = 40) -> Tensor:
    """Step size minimising the quantization MSE over clipping ratios of the max-abs range."""
    if reduce_dims:
        amax = x.abs().amax(dim=reduce_dims, keepdim=True)
    else:
        amax = x.abs().max().reshape(shape)
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteError(f"a quantizer was calibrated on a tensor holding NaN or inf "
                             f"(max-abs {amax.max().item()}): the model's outputs are not finite "
                             "before quantization; check the weights it starts from")
    amax = amax.clamp_min(MIN_RANGE)
    best_err = None
    best = amax / qmax
    for i in range(steps):
        ratio = 1.0 - i / (steps * 1.25)  # clip from 100% down to ~20% of max-abs
        s = amax * ratio / max(qmax, -qmin)
        err = (torch.clamp(torch.round(x / s), qmin, qmax) * s - x).pow(2)
        err = err.sum(dim=reduce_dims, keepdim=True) if reduce_dims else err.sum().reshape(shape)
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best


class LSQQuantizer(Quantizer):
    """Learned step size quantization: a trainable step per tensor or per channel."""

    method = "lsq"

    def __init__(self, bits: int, signed: bool | None = None, symmetric: bool = False,
                 channels: int = 1, channel_dim: int = 0) -> None:
        super().__init__(bits, signed, symmetric, channels, channel_dim)
        self.scale = nn.Parameter(torch.ones(channels))

    def _init_from(self, x: Tensor) -> None:
        qmin, qmax = self.int_range()
        s = _mse_scale(x, qmin, qmax, self._reduce_dims(x), self._shape(x))
        self.scale.data.copy_(s.reshape(-1).to(self.scale.dtype))

    def _scale(self, x: Tensor) -> Tensor:
        return self._scale32(x).to(x.dtype)

    def _scale32(self, x: Tensor) -> Tensor:
        return self.scale.abs().clamp_min(MIN_RANGE).reshape(self._shape(x))

    def _grad_scale(self, x: Tensor) -> float:
        """LSQ's gradient scale ``1 / sqrt(n * qmax)``, ``n`` the elements per step (per sample
        for an activation)."""
        n = x.numel() // (self.channels if self.per_channel else 1)
        if not self.per_channel and self.channel_dim == 1:  # activation: features per sample
            n = max(1, x[0].numel())
        return 1.0 / math.sqrt(max(1, n) * max(1, self.int_range()[1]))

    def _quantize(self, x: Tensor) -> Tensor:
        qmin, qmax = self.int_range()
        grad_scale = self._grad_scale(x)
        if not self.per_channel and _use_cpu_kernel(x, self.scale):  # |scale| inside
            return _LSQTensorCPU.apply(x, self.scale, qmin, qmax, grad_scale)
        return lsq_quantize(x, self._scale32(x), qmin, qmax, grad_scale, self._reduce_dims(x))

    def quantize_constant(self, x: Tensor) -> ConstantInput | None:
        """:meth:`Quantizer.quantize_constant` for a per-tensor step, float32 on CPU: ``d`` is
        LSQ's ``d x_q / d s`` (``round(x/s) - x/s`` inside the range, ``qmin`` or ``qmax``
        outside) times the gradient scale and ``d s / d scale`` (the parameter is raw). Not
        for a subclass with its own ``forward`` or ``_quantize``: ``d`` would not be theirs."""
        if (not self.enabled or self.per_channel or x.requires_grad
                or not self.scale.requires_grad or not torch.is_grad_enabled()
                or not _use_cpu_kernel(x, self.scale)
                or type(self).forward is not Quantizer.forward
                or type(self)._quantize is not LSQQuantizer._quantize):
            return None
        self._ready_for(x)
        qmin, qmax = self.int_range()
        with torch.no_grad():
            xq = self._quantize(x)  # the values of the usual path, its kernel
            s, ds_draw = raw_step(self.scale.reshape(()))
            xs = x / s
            # NaN/inf in x make the step's gradient non-finite, as in the usual path
            q = keep_nonfinite(xs.round().clamp(qmin, qmax), xs)
            d = _in_range_and_dstep(xs, q, qmin, qmax)[1]
            d.mul_(ds_draw * self._grad_scale(x))
        return ConstantInput(xq, d, self.scale)

    def qparams(self, x: Tensor | None = None) -> tuple[Tensor, int, int]:
        qmin, qmax = self.int_range()
        s = self.scale.detach().abs().clamp_min(MIN_RANGE)
        return (s.reshape(self._shape(x)) if x is not None else s.reshape(-1)), qmin, qmax


class PACTQuantizer(Quantizer):
    """PACT (Choi et al. 2018): a learnable clip ``alpha``; step ``alpha / qmax``."""

    method = "pact"

    def __init__(self, bits: int, signed: bool | None = None, symmetric: bool = False,
                 channels: int = 1, channel_dim: int = 1) -> None:
        super().__init__(bits, signed, symmetric, 1, channel_dim)
        self.alpha = nn.Parameter(torch.tensor([6.0]))

    def _init_from(self, x: Tensor) -> None:
        qmin, qmax = self.int_range()
        s = _mse_scale(x, qmin, qmax, (), [1])
        self.alpha.data.copy_((s * max(qmax, -qmin)).reshape(1))

    def _quantize(self, x: Tensor) -> Tensor:
        qmin, qmax = self.int_range()
        alpha = self.alpha.abs().clamp_min(1e-6).to(x.dtype)
        # torch.minimum/maximum route the clipped part of the gradient to alpha (the PACT rule).
        y = torch.minimum(x, alpha)
        y = torch.maximum(y, -alpha) if qmin < 0 else torch.clamp(y, min=0)
        scale = alpha / max(qmax, -qmin)
        return keep_nonfinite(round_ste(y / scale).clamp(qmin, qmax) * scale, x)

    def qparams(self, x: Tensor | None = None) -> tuple[Tensor, int, int]:
        qmin, qmax = self.int_range()
        scale = self.alpha.detach().abs().clamp_min(1e-6) / max(qmax, -qmin)
        return scale.reshape(1), qmin, qmax


class MaxAbsQuantizer(Quantizer):
    """Weights scaled by their current max-abs value (no learnable parameter)."""

    method = "maxabs"

    def _init_from(self, x: Tensor) -> None:
        return None

    def _amax(self, x: Tensor) -> Tensor:
        rd = self._reduce_dims(x)
        amax = x.detach().abs().amax(dim=rd, keepdim=True) if rd else x.detach().abs().max()
        return amax.clamp_min(1e-8)

    def _quantize(self, x: Tensor) -> Tensor:
        qmin, qmax = self.int_range()
        scale = self._amax(x) / qmax
        return round_ste(x / scale).clamp(qmin, qmax) * scale

    def qparams(self, x: Tensor | None = None) -> tuple[Tensor, int, int]:
        if x is None:
            raise ValueError("MaxAbsQuantizer.qparams needs the tensor it quantizes")
        qmin, qmax = self.int_range()
        scale = self._amax(x) / qmax
        return scale.reshape(self._shape(x)) if self.per_channel else scale.reshape(1), qmin, qmax


class DoReFaQuantizer(MaxAbsQuantizer):
    """DoReFa-style weights: ``tanh`` normalisation to [-1, 1], then the symmetric b-bit grid."""

    method = "dorefa"

    def _pre(self, x: Tensor) -> Tensor:
        t = torch.tanh(x)
        rd = self._reduce_dims(x)
        m = t.detach().abs().amax(dim=rd, keepdim=True) if rd else t.detach().abs().max()
        return t / m.clamp_min(1e-8)

    def _quantize(self, x: Tensor) -> Tensor:
        qmin, qmax = self.int_range()
        return round_ste(self._pre(x) * qmax).clamp(qmin, qmax) / qmax

    def qparams(self, x: Tensor | None = None) -> tuple[Tensor, int, int]:
        qmin, qmax = self.int_range()
        return torch.tensor([1.0 / qmax]), qmin, qmax


def make_weight_quantizer(method: str, bits: int, out_channels: int,
                          per_channel: bool = False) -> Quantizer:
    """A signed symmetric weight quantizer (channel dim 0)."""
    channels = out_channels if per_channel else 1
    if method == "lsq":
        return LSQQuantizer(bits, signed=True, symmetric=True, channels=channels, channel_dim=0)
    if method == "maxabs":
        return MaxAbsQuantizer(bits, signed=True, symmetric=True, channels=channels,
                               channel_dim=0)
    if method == "dorefa":
        return DoReFaQuantizer(bits, signed=True, symmetric=True, channels=channels,
                               channel_dim=0)
    raise ConfigError(f"unknown weight quantizer {method!r}: use one of "
                      f"{', '.join(WEIGHT_METHODS)}")


def make_act_quantizer(method: str, bits: int, signed: bool | None = None) -> Quantizer:
    """An activation quantizer, per tensor; ``signed=None`` decides the sign at calibration."""
    if method == "lsq":
        return LSQQuantizer(bits, signed=signed, symmetric=False, channels=1, channel_dim=1)
    if method == "pact":
        return PACTQuantizer(bits, signed=signed, symmetric=False)
    raise ConfigError(f"unknown activation quantizer {method!r}: use one of "
                      f"{', '.join(ACT_METHODS)}")
