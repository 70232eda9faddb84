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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mpqkit.errors import ConfigError, ModelError

FP = 32
MB = 1e6


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


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers of ``model`` by fully-qualified name, in module-tree order."""
    from mpqkit.quant.layers import quantizable_types  # quant imports this module

    types = quantizable_types()
    return {n: m for n, m in model.named_modules() if isinstance(m, types) and n}


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
