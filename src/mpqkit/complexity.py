"""Per-layer MACs and parameters, and the cost of a bit-width policy.

Conventions:

* MACs are counted by forward hooks on one image at a stated input resolution, for the
  quantizable layers only (Conv2d: ``C_in/groups * C_out * k_h * k_w * H_out * W_out``; Linear:
  ``in * out`` per output row). Layers that run more than once add up.
* ``BitOps = sum_l MACs[l] * w_bits[l] * a_bits[l]`` over the layers whose weights AND inputs are
  quantized (bits < 32). Full-precision layers (e.g. first/last layer with ``first_last="fp"``) are
  left out of BitOps, as in the EdMIPS/GMPQ tables, and reported as ``fp_macs``.
* ``size_mb`` is the storage of the quantizable layers' weights at their bit-widths
  (``params[l] * w_bits[l]`` bits, biases and BatchNorm excluded, 1 MB = 10^6 bytes).

This module is the one home of cost: profiling (:func:`profile_model`), policy totals
(:func:`compute_complexity`), per-layer and per-policy cost in a budget's unit
(:func:`layer_cost`, :func:`policy_cost`), budgets (:class:`Budget`, :func:`parse_budget`) and
their re-evaluation on another model (:func:`retarget_budget`). Whether a budget can be met and
moving a policy into it (feasibility, repair) live in :mod:`mpqkit.search.budget`; which layers
are quantizable is the layer registry's (:func:`mpqkit.quant.layers.quantizable_layers`).

Budgets: a budget is stated as BitOps (absolute, ``"1.2G"``, or as ``"same as uniform wWaA"``)
or as model size in MB. BitOps count only layers whose weights and inputs are both quantized;
the size counts every quantizable layer's weights at its bits (32 for full precision).

Retargeting a budget onto another model (policy transfer): a ``w3a3`` budget becomes the BitOps
of uniform w3a3 on the target (fixed layers at their fixed bits). An absolute budget ``B``
becomes its average bit product over the searchable layers, ``p = (B - fixed BitOps) /
searchable MACs`` on the proxy, then ``fixed BitOps + p * searchable MACs`` on the target
(``p = 9`` for a w3a3 budget, so both rules agree). A size budget likewise becomes average bits
per searchable weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mpqkit.errors import ConfigError, ModelError
from mpqkit.quant.layers import quantizable_layers
from mpqkit.quant.quantizers import check_bits

FP = 32
MB = 1e6
KINDS = ("bitops", "size_mb")


@dataclass
class LayerInfo:
    """One quantizable layer: its name, type and cost at the profiled input size."""

    name: str
    kind: str  # "conv" or "linear"
    macs: int
    params: int  # weight elements (bias excluded)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int = 1
    calls: int = 0


def normalize_input_size(input_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``32`` -> ``(32, 32)``; ``(h, w)`` kept. Raises on non-positive sizes."""
    if isinstance(input_size, int):
        hw = (input_size, input_size)
    else:
        hw = tuple(int(v) for v in input_size)  # type: ignore[assignment]
    if len(hw) != 2 or min(hw) <= 0:
        raise ConfigError(f"input size {input_size!r} is invalid: give one positive int (e.g. 32) "
                          "or height,width")
    return hw  # type: ignore[return-value]


@torch.no_grad()
def profile_model(model: nn.Module, input_size: int | tuple[int, int],
                  in_channels: int = 3) -> dict[str, LayerInfo]:
    """MACs and parameters of every quantizable layer, in execution order.

    Runs one forward pass of a zero image of ``in_channels x H x W`` (batch 1, eval mode; the
    training mode is restored afterwards). Layers that are never executed get ``macs=0`` and come
    after the executed ones.
    """
    h, w = normalize_input_size(input_size)
    layers = quantizable_layers(model)
    if not layers:
        raise ModelError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize: "
                         "pass a model built from torch.nn.Conv2d / torch.nn.Linear")
    infos: dict[str, LayerInfo] = {}
    order: list[str] = []
    handles = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inp[0]
            if isinstance(mod, nn.Conv2d):
                kh, kw = mod.kernel_size
                macs = (mod.in_channels // mod.groups) * mod.out_channels * kh * kw
                macs *= out.shape[-1] * out.shape[-2]
                kind, groups = "conv", mod.groups
            else:
                macs = mod.in_features * mod.out_features * (out.numel() // out.shape[-1])
                kind, groups = "linear", 1
            info = infos.get(name)
            if info is None:
                infos[name] = LayerInfo(name, kind, int(macs), int(mod.weight.numel()),
                                        tuple(x.shape[1:]), tuple(out.shape[1:]), groups, 1)
                order.append(name)
            else:
                info.macs += int(macs)
                info.calls += 1

        return fn

    for name, mod in layers.items():
        handles.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(iter(model.parameters()))
        x = torch.zeros(1, in_channels, h, w, device=p.device, dtype=p.dtype)
        try:
            model(x)
        except Exception as exc:  # noqa: BLE001 - re-raised as a one-line user error
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the model does not run on a {in_channels}x{h}x{w} input ({msg}): "
                             "pass the input size it was built for with --input-size") from exc
    finally:
        model.train(was_training)
        for hd in handles:
            hd.remove()
    for name, mod in layers.items():
        if name not in infos:
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            infos[name] = LayerInfo(name, kind, 0, int(mod.weight.numel()), (), (),
                                    getattr(mod, "groups", 1), 0)
            order.append(name)
    return {n: infos[n] for n in order}


@dataclass
class Complexity:
    """Totals of a policy at an input size."""

    input_size: tuple[int, int]
    macs: int
    bitops: int
    fp_macs: int
    size_mb: float
    params: int
    avg_w_bits: float  # parameter-weighted, over quantized layers
    avg_a_bits: float  # MAC-weighted, over quantized layers

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def compute_complexity(layers: Mapping[str, LayerInfo],
                       bits: Mapping[str, tuple[int, int]],
                       input_size: tuple[int, int]) -> Complexity:
    """Totals for per-layer ``(w_bits, a_bits)`` over profiled ``layers``."""
    macs = bitops = fp_macs = params = 0
    size_bits = 0.0
    wsum = asum = pq = mq = 0.0
    for name, info in layers.items():
        wb, ab = bits[name]
        macs += info.macs
        params += info.params
        size_bits += info.params * wb
        if wb < FP and ab < FP:
            bitops += info.macs * wb * ab
            wsum += info.params * wb
            pq += info.params
            asum += info.macs * ab
            mq += info.macs
        else:
            fp_macs += info.macs
    return Complexity(
        input_size=tuple(input_size),  # type: ignore[arg-type]
        macs=macs, bitops=bitops, fp_macs=fp_macs, size_mb=size_bits / 8 / MB, params=params,
        avg_w_bits=wsum / pq if pq else float(FP), avg_a_bits=asum / mq if mq else float(FP),
    )


def format_count(n: float) -> str:
    """``1814073344`` -> ``1.814G``."""
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def parse_count(text: str) -> float:
    """``"1.2G"`` -> ``1.2e9``; accepts K, M, G, T suffixes and plain numbers."""
    t = str(text).strip().upper()
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    try:
        if t and t[-1] in mult:
            return float(t[:-1]) * mult[t[-1]]
        return float(t)
    except ValueError:
        raise ConfigError(f"cannot read the number {text!r}: write e.g. 1.2G, 350M or "
                          "1.5e9") from None


# ----------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """A complexity budget: ``kind`` is ``"bitops"`` or ``"size_mb"``; ``spec`` what was asked."""

    kind: str  # "bitops" | "size_mb"
    value: float  # BitOps count or MB (1 MB = 1e6 bytes)
    spec: str  # what the user wrote: "w3a3", "1.2G", "0.5MB"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"budget kind {self.kind!r} is unknown: use one of "
                              f"{', '.join(KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "spec": self.spec}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Budget:
        """The inverse of :meth:`to_dict` (extra keys are ignored)."""
        try:
            return cls(str(d["kind"]), float(d["value"]), str(d.get("spec", d["value"])))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"budget {dict(d)!r} is malformed: write it as "
                              '{"kind": "bitops", "value": 1.2e9, "spec": "1.2G"}') from None

    def format(self, value: float | None = None) -> str:
        """``value`` (default: the budget) in this budget's unit, e.g. ``1.234G BitOps``."""
        return format_cost(self.value if value is None else value, self.kind)

    def describe(self) -> str:
        """E.g. ``w3a3 (1.234G BitOps)`` or ``0.5MB (0.5000 MB)``."""
        return f"{self.spec} ({self.format()})"


def format_cost(value: float, kind: str) -> str:
    """A cost in its unit: ``1.234G BitOps`` or ``0.1234 MB``."""
    if kind == "bitops":
        return f"{format_count(value)} BitOps"
    return f"{value:.4f} MB"


# ----------------------------------------------------------------------------------------------
# costs
# ----------------------------------------------------------------------------------------------
def policy_cost(infos: Mapping[str, LayerInfo], bits: Mapping[str, tuple[int, int]],
                kind: str) -> float:
    """BitOps or size (MB) of per-layer ``bits`` over ``infos`` (via ``compute_complexity``)."""
    if kind not in KINDS:
        raise ConfigError(f"budget kind {kind!r} is unknown: use one of {', '.join(KINDS)}")
    c = compute_complexity(infos, bits, (0, 0))
    return float(c.bitops) if kind == "bitops" else float(c.size_mb)


def layer_cost(info: LayerInfo, w: int, a: int, kind: str) -> float:
    """Cost of one layer at ``(w, a)``; sums to :func:`policy_cost`."""
    if kind == "bitops":
        return float(info.macs * w * a) if (w < FP and a < FP) else 0.0
    return info.params * w / 8 / MB


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
_UNIFORM_RE = re.compile(r"\s*w\d+a\d+\s*", re.IGNORECASE)
_MB_RE = re.compile(r"\s*([0-9.eE+-]+)\s*mb\s*", re.IGNORECASE)


def is_uniform_spec(text: str) -> bool:
    """True for a uniform policy spec such as ``w4a4``."""
    return bool(_UNIFORM_RE.fullmatch(str(text)))


def parse_budget(*, bitops: str | None = None, uniform: str | None = None,
                 size_mb: float | str | None = None, bits: float | str | None = None,
                 infos: Mapping[str, LayerInfo], fixed_bits: Mapping[str, tuple[int, int]],
                 searchable: Sequence[str]) -> Budget:
    """A :class:`Budget` from exactly one of ``bitops``, ``uniform``, ``size_mb`` or ``bits``.

    ``bitops``: a count such as ``"1.2G"`` or ``"3.5e8"``; for convenience a uniform spec
    (``"w4a4"``) or a size (``"0.5MB"``) given here is read as such. ``uniform``: ``"w3a3"`` means
    the BitOps of the policy with every searchable layer at w3a3 and the fixed layers at their
    ``fixed_bits``. ``size_mb``: megabytes (10^6 bytes) of quantized weights. ``bits``: an
    average bit-width ``b`` (e.g. 2.5): the BitOps of every searchable layer at ``b x b`` bits,
    fixed layers at their ``fixed_bits`` (the EdMIPS/GMPQ way of stating a budget).
    """
    given = [v for v in (bitops, uniform, size_mb, bits) if v not in (None, "")]
    if len(given) != 1:
        raise ConfigError("give exactly one budget: BitOps (e.g. 1.2G), a uniform policy "
                          "(e.g. w4a4), average bits (e.g. 2.5) or a model size in MB "
                          "(e.g. 0.5MB)")
    if bitops not in (None, ""):
        text = str(bitops)
        if _UNIFORM_RE.fullmatch(text):
            uniform = text
        elif _MB_RE.fullmatch(text):
            size_mb = text
        else:
            value = parse_count(text)
            if not value > 0:
                raise ConfigError(f"budget {text!r} must be a positive BitOps count: e.g. 1.2G")
            return Budget("bitops", float(value), text.strip())
    if uniform not in (None, ""):
        return _uniform_budget(str(uniform).strip().lower(), infos, fixed_bits, searchable)
    if bits not in (None, ""):
        return _bits_budget(bits, infos, fixed_bits, searchable)
    return _size_budget(size_mb)


def _check_covered(infos: Mapping[str, LayerInfo], fixed_bits: Mapping[str, tuple[int, int]],
                   searchable: Sequence[str]) -> None:
    missing = [n for n in infos if n not in fixed_bits and n not in set(searchable)]
    if missing:
        raise ConfigError(f"layers {', '.join(missing[:8])} are neither searchable nor fixed: "
                          "list every quantizable layer in one of the two")


def _uniform_budget(spec: str, infos: Mapping[str, LayerInfo],
                    fixed_bits: Mapping[str, tuple[int, int]], searchable: Sequence[str]) -> Budget:
    w, a = _uniform_bits(spec)
    if w >= FP or a >= FP:
        raise ConfigError(f"uniform budget {spec} has full-precision layers, which count no "
                          "BitOps: give quantized bits such as w4a4")
    _check_covered(infos, fixed_bits, searchable)
    bits = {n: tuple(fixed_bits[n]) if n in fixed_bits else (w, a) for n in infos}
    value = policy_cost(infos, bits, "bitops")  # type: ignore[arg-type]
    if not value > 0:
        raise ConfigError(f"uniform budget {spec} gives 0 BitOps on this model: give an "
                          "absolute budget such as 1.2G")
    return Budget("bitops", value, spec)


def _bits_budget(bits: float | str, infos: Mapping[str, LayerInfo],
                 fixed_bits: Mapping[str, tuple[int, int]], searchable: Sequence[str]) -> Budget:
    try:
        b = float(str(bits).strip().lower().removesuffix("bits").removesuffix("bit"))
    except ValueError:
        raise ConfigError(f"cannot read the average-bits budget {bits!r}: write a number of "
                          "bits, e.g. 2.5") from None
    if not 2 <= b <= 8:
        raise ConfigError(f"average-bits budget {b:g} is outside 2..8 bits: e.g. 2.5 or 3")
    _check_covered(infos, fixed_bits, searchable)
    s = set(searchable)
    value = sum(infos[n].macs * b * b for n in infos if n in s)
    value += sum(layer_cost(infos[n], *fixed_bits[n], "bitops") for n in fixed_bits)
    return Budget("bitops", float(value), f"{b:g}bits")


def _size_budget(size_mb: float | str | None) -> Budget:
    text = str(size_mb).strip()
    m = _MB_RE.fullmatch(text)
    try:
        value = float(m.group(1) if m else text)
    except ValueError:
        raise ConfigError(f"cannot read the size budget {size_mb!r}: write megabytes, e.g. "
                          "0.5 or 0.5MB") from None
    if not value > 0:
        raise ConfigError(f"size budget {size_mb!r} must be positive: e.g. 0.5MB")
    return Budget("size_mb", value, text if m else f"{value:g}MB")


def _uniform_bits(spec: str) -> tuple[int, int]:
    """``"w3a3"`` -> ``(3, 3)`` for a uniform budget (bits checked against the supported ones)."""
    m = re.fullmatch(r"\s*w(\d+)a(\d+)\s*", str(spec).lower())
    if not m:
        raise ConfigError(f"cannot read the uniform budget {spec!r}: write it as wWaA, e.g. w4a4")
    return (check_bits(int(m.group(1)), f"uniform budget {spec} weight bits"),
            check_bits(int(m.group(2)), f"uniform budget {spec} activation bits"))


# ----------------------------------------------------------------------------------------------
# budgets on another model (policy transfer)
# ----------------------------------------------------------------------------------------------
def _split_cost(infos: Mapping[str, LayerInfo], fixed_bits: Mapping[str, tuple[int, int]],
                kind: str) -> tuple[float, float]:
    """(cost of the fixed layers at their bits, unit cost of the searchable layers).

    The unit cost is searchable MACs (BitOps per bit product) or searchable weights in MB per bit.
    """
    fixed = unit = 0.0
    for n, info in infos.items():
        if n in fixed_bits:
            fixed += layer_cost(info, *fixed_bits[n], kind)
        else:
            unit += info.macs if kind == "bitops" else info.params / 8 / MB
    return fixed, unit


def _uniform_cost(infos: Mapping[str, LayerInfo], fixed_bits: Mapping[str, tuple[int, int]],
                  w: int, a: int, kind: str) -> float:
    bits = {n: (tuple(fixed_bits[n]) if n in fixed_bits else (w, a)) for n in infos}
    return policy_cost(infos, bits, kind)  # type: ignore[arg-type]


def retarget_budget(budget: Budget, proxy_infos: Mapping[str, LayerInfo],
                    proxy_fixed: Mapping[str, tuple[int, int]],
                    target_infos: Mapping[str, LayerInfo],
                    target_fixed: Mapping[str, tuple[int, int]],
                    input_size: tuple[int, int]) -> tuple[float, str]:
    """The budget's value on the target and a short description of the rule used.

    ``*_infos`` are the layers of the proxy and the target, ``*_fixed`` the bits of their fixed
    (not searched) layers; every other layer is searchable. ``input_size`` is the target's, for
    the description. The rules are in the module docstring.
    """
    h, w_ = input_size
    if is_uniform_spec(budget.spec) and budget.kind == "bitops":
        wb, ab = _uniform_bits(budget.spec)
        return (_uniform_cost(target_infos, target_fixed, wb, ab, "bitops"),
                f"BitOps of uniform {budget.spec} on the target at {h}x{w_}")
    pf, pu = _split_cost(proxy_infos, proxy_fixed, budget.kind)
    tf, tu = _split_cost(target_infos, target_fixed, budget.kind)
    if pu <= 0:
        return budget.value, "unchanged (the proxy policy has no searchable layer)"
    p = (budget.value - pf) / pu
    if budget.kind == "bitops":
        return tf + p * tu, (f"the same average bit product w*a = {p:.2f} over the searchable "
                             f"layers, on the target at {h}x{w_}")
    return tf + p * tu, f"the same average {p:.2f} bits per searchable weight, on the target"
