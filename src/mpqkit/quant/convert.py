"""Swap a model's layers for quantized ones by fully-qualified name, and calibrate them."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mpqkit.errors import PolicyError
from mpqkit.quant.fold import QConvBn2d, find_fold_sites, floor_batchnorms, fold_layer
from mpqkit.quant.layers import (
    QuantConfig,
    QuantMixin,
    qlayer_for,
    quantizable_layers,
    quantizable_types,
)
from mpqkit.quant.quantizers import FULL_PRECISION, Quantizer

if TYPE_CHECKING:  # policy imports the quantizers; only the type is needed here
    from mpqkit.policy import Policy


# Subclasses of a quantizable torch.nn layer whose forward computes the same function, by
# "module.ClassName": quantized as that layer (timm's Linear only adds a TorchScript-time cast).
EQUIVALENT_SUBCLASSES: dict[str, type[nn.Module]] = {"timm.layers.linear.Linear": nn.Linear}


def quantized_class(name: str, mod: nn.Module) -> type[QuantMixin]:
    """The quantized class that replaces layer ``name``, or a one-line :class:`PolicyError`."""
    qcls = qlayer_for(mod)
    if qcls is not None:
        return qcls
    cls = type(mod)
    registered = {t: qlayer_for(t.__new__(t)) for t in quantizable_types()}
    base = EQUIVALENT_SUBCLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
    if base is not None and isinstance(mod, base) and registered.get(base) is not None:
        return registered[base]  # type: ignore[return-value]
    parent = next((b.__name__ for b in cls.__mro__[1:] if b in registered), None)
    raise PolicyError(f"layer {name!r} is a {cls.__module__}.{cls.__qualname__}, a subclass of "
                      f"{parent or 'a quantizable layer'} with a forward of its own, which mpqkit "
                      "cannot quantize as it is: register a quantized class for it with "
                      "mpqkit.quant.layers.register_qlayer, or build the model with torch.nn "
                      "layers")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, policy: Policy, config: QuantConfig | None = None, *,
                   inplace: bool = False) -> nn.Module:
    """Replace every layer named in ``policy`` by its quantized version with the policy's bits.

    The policy must name exactly the model's quantizable layers (checked first, with every
    missing and extra layer in the message). Parameters are shared with the float layers when
    ``inplace`` is true; otherwise the model is deep-copied first. Already quantized layers get
    new bits. Quantizer ranges are initialised from the first batch seen, or by :func:`calibrate`.
    With ``config.fold_bn`` every ``Conv2d -> BatchNorm2d`` pair becomes one
    :class:`~mpqkit.quant.fold.QConvBn2d` (found by tracing the forward). Every other
    ``BatchNorm2d`` becomes a :class:`~mpqkit.quant.fold.FlooredBatchNorm2d` (its batch
    variance floored in training: :func:`~mpqkit.quant.fold.batch_norm_floored`).
    """
    policy.validate(model)
    config = config or QuantConfig()
    if not inplace:
        model = copy.deepcopy(model)
    sites = find_fold_sites(model, {n for n, lp in policy.layers.items()
                                    if lp.a_bits < FULL_PRECISION}) if config.fold_bn else {}
    for name, mod in list(quantizable_layers(model).items()):
        lp = policy.layers[name]
        if name in sites:
            fold = fold_layer(model, name, mod, sites[name], lp.w_bits, lp.a_bits, config)
            _set_submodule(model, name, fold)
            continue
        if isinstance(mod, QuantMixin):
            mod = mod.to_float()
        qmod = quantized_class(name, mod).from_float(mod, lp.w_bits, lp.a_bits, config)
        _set_submodule(model, name, qmod)
    return floor_batchnorms(model)


def dequantize_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The float model with the same (trained) parameters, quantizers removed."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantMixin):
            _set_submodule(model, name, mod.to_float())
    return floor_batchnorms(model, floored=False)


def model_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (w_bits, a_bits)}`` of the quantized layers actually present in ``model``."""
    return {n: (m.w_bits, m.a_bits) for n, m in model.named_modules()
            if isinstance(m, QuantMixin)}


def quantizers(model: nn.Module) -> Iterable[tuple[str, Quantizer]]:
    for n, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield n, m


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]] | Tensor,
              max_batches: int = 1, batch_stats: bool = False) -> nn.Module:
    """Initialise every quantizer's range (and activation sign) from real data.

    Runs ``max_batches`` batches through the model in eval mode with every quantizer passing
    its input through unchanged, so each activation quantizer is calibrated on the float
    model's activations (the concatenation of its inputs over those batches), as an observer
    on the float model would be; each weight quantizer is calibrated on its weight. The
    training mode is restored afterwards.

    ``batch_stats``: BatchNorms normalise with each batch's statistics, as they do in
    quantization-aware training, instead of the running ones (which are left unchanged); what
    fine-tuning calibrates with. A model whose running statistics are far from its batch
    statistics (a briefly trained one) otherwise gets ranges of the wrong size for training:
    on a 20-step EfficientNet-B0, eval-mode ranges rounded whole stages of training-mode
    activations to 0.
    """
    qlayers = [m for m in model.modules() if isinstance(m, QuantMixin)]
    if not qlayers:
        return model
    if isinstance(batches, Tensor):
        batches = [batches]
    outs = [m.oq for m in qlayers if isinstance(getattr(m, "oq", None), Quantizer)]
    seen: dict[int, list[Tensor]] = {id(m): [] for m in [*qlayers, *outs]}
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp: seen[id(mod)].append(inp[0].detach())) for m in [*qlayers, *outs]]
    with passing_through(model), _eval(model, batch_stats):
        try:
            for i, b in enumerate(batches):
                if i >= max_batches:
                    break
                x = b[0] if isinstance(b, tuple | list) else b
                model(x.to(next(model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
    for m in qlayers:
        m.wq.init_from(m.weight_for_quant())
    for m, q in [*((m, m.aq) for m in qlayers), *((q, q) for q in outs)]:
        if seen[id(m)]:
            q.init_from(torch.cat([t.flatten(1) for t in seen[id(m)]], 0))
    return model


@contextlib.contextmanager
def passing_through(model: nn.Module) -> Iterator[None]:
    """Every enabled quantizer of ``model`` is the identity inside the block (its bit-width is
    set to full precision and restored after): activations are collected un-quantized, and a
    quantizer that is not yet calibrated does not initialise itself on the way."""
    qs = [(q, q.bits) for q in model.modules() if isinstance(q, Quantizer) and q.enabled]
    for q, _ in qs:
        q.bits = FULL_PRECISION
    try:
        yield
    finally:
        for q, bits in qs:
            q.bits = bits


@contextlib.contextmanager
def _eval(model: nn.Module, batch_stats: bool) -> Iterator[None]:
    """``model`` in eval mode inside the block; with ``batch_stats`` its BatchNorms normalise
    with the batch's statistics (as in training) and their running statistics are restored
    after. The training modes are restored after."""
    modes = [(m, m.training) for m in model.modules()]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats] if batch_stats else []
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    model.eval()
    for m in [*bns, *(m for m in model.modules() if isinstance(m, QConvBn2d))] if bns else []:
        m.train()  # a folded convolution normalises with its BatchNorm's batch statistics
    try:
        yield
    finally:
        for m, st in zip(bns, saved, strict=True):
            m.load_state_dict(st)
        for m, mode in modes:
            m.training = mode
