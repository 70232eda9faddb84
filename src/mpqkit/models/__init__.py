"""Model registry: CIFAR networks, torchvision classifiers by name, user factories by path.

``build_model(name, num_classes)`` accepts:

* ``resnet20``, ``resnet32``, ``resnet56``, ``resnet18_cifar``, ``mobilenet_v2_cifar``;
* any torchvision classification model name (``resnet18``, ``mobilenet_v2``, ...); GoogLeNet
  and Inception-V3 without their auxiliary classifiers (``aux_logits=False``: mpqkit trains,
  searches and exports models that return one logits tensor; pass ``aux_logits=True`` to
  ``build_model`` for torchvision's default);
* ``timm:NAME``: a model of the optional ``timm`` package (``pip install 'mpqkit[timm]'``),
  ``timm.create_model(NAME, pretrained=False, num_classes=...)``;
* ``package.module:factory`` for a user's own model (called with ``num_classes=`` when the
  factory takes it).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mpqkit.errors import ModelError
from mpqkit.models.cifar import (
    mobilenet_v2_cifar,
    resnet18_cifar,
    resnet20,
    resnet32,
    resnet56,
)

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56,
    "resnet18_cifar": resnet18_cifar, "mobilenet_v2_cifar": mobilenet_v2_cifar,
}

# torchvision builders whose default adds auxiliary classifiers (a tuple of logits in training)
_AUX_LOGITS = ("googlenet", "inception_v3")
TIMM_PREFIX = "timm:"

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Bundled full-precision checkpoints: (model, dataset) -> file stem in WEIGHTS_DIR.
BUNDLED = {("resnet20", "cifar10"): "resnet20_cifar10",
           ("resnet20", "tiny-imagenet-32"): "resnet20_tiny-imagenet-32"}


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def available_models() -> list[str]:
    return sorted(CIFAR_MODELS) + _torchvision_names()


def default_input_size(name: str) -> int:
    """Native input resolution of a model name (32 for the CIFAR networks, else 224)."""
    return 32 if name in CIFAR_MODELS else 224


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a model by name (see module docstring). Raises :class:`ModelError` if unknown."""
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes, **kwargs)
    if name.startswith(TIMM_PREFIX):
        return _from_timm(name[len(TIMM_PREFIX):], num_classes, **kwargs)
    if ":" in name:
        return _from_import_path(name, num_classes, **kwargs)
    tv = _torchvision_names()
    if name in tv:
        from torchvision import models as tvm

        if name in _AUX_LOGITS:
            kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
        return tvm.get_model(name, num_classes=num_classes, weights=None, **kwargs)
    close = [n for n in sorted(CIFAR_MODELS) + tv if n.startswith(name[:4])][:8]
    hint = f" (close: {', '.join(close)})" if close else ""
    raise ModelError(f"unknown model {name!r}{hint}: use one of {', '.join(sorted(CIFAR_MODELS))}, "
                     "a torchvision model name, or package.module:factory")


def _from_timm(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError(f"model 'timm:{name}' needs the timm package: pip install "
                         "'mpqkit[timm]' (or pip install timm)") from None
    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name[:5]}*")[:8] if name else []
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ModelError(f"timm has no model {name!r}{hint}: use timm:NAME with a name from "
                         "timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _from_import_path(path: str, num_classes: int, **kwargs: Any) -> nn.Module:
    mod_name, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {mod_name!r} for model {path!r} ({exc}): make the module "
                         "importable (install it or add its folder to PYTHONPATH)") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelError(f"{mod_name!r} has no callable {attr!r}: give package.module:factory "
                         "where factory returns an nn.Module")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{path} returned {type(model).__name__}, not an nn.Module: make the "
                         "factory return the model")
    return model


def bundled_weights(name: str, dataset: str) -> Path | None:
    """Path of the bundled full-precision checkpoint for (model, dataset), if any."""
    stem = BUNDLED.get((name, dataset))
    if stem is None:
        return None
    p = WEIGHTS_DIR / f"{stem}.safetensors"
    return p if p.is_file() else None


def bundled_info(name: str, dataset: str) -> dict[str, Any] | None:
    """The metadata (accuracy, recipe) stored next to a bundled checkpoint."""
    p = bundled_weights(name, dataset)
    if p is None:
        return None
    meta = p.with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else None


__all__ = ["CIFAR_MODELS", "available_models", "build_model", "bundled_info", "bundled_weights",
           "default_input_size"]
