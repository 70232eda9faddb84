"""Feature taps shared by the methods that regularize features (GMPQ, SEAM)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mpqkit.errors import ModelError
from mpqkit.policy import first_last_layers
from mpqkit.search.supernet import Supernet


def head_name(supernet: Supernet) -> str:
    """The name of the last quantizable layer (the classifier)."""
    return first_last_layers(supernet.infos)[-1]


@torch.no_grad()
def find_feature_module(model: nn.Module, input_size: int | tuple[int, int], head: str,
                        in_channels: int = 3) -> str:
    """Name of the module producing the last spatial feature map before layer ``head`` runs.

    A probe forward (eval mode, batch 1) records the modules whose output is a 4-D tensor with
    more than one spatial position; the last one to finish before ``head`` starts wins (for
    ResNets ``layer3``/``layer4``, for MobileNet-V2 ``features``).
    """
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    mods = dict(model.named_modules())
    if head not in mods:
        raise ModelError(f"layer {head!r} is not in the model")
    state = {"done": False, "last": None}
    hooks = []

    def post(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            if (not state["done"] and isinstance(out, Tensor) and out.dim() == 4
                    and out.shape[-1] * out.shape[-2] > 1):
                state["last"] = name
        return fn

    for name, m in mods.items():
        if name and name != head:
            hooks.append(m.register_forward_hook(post(name)))
    hooks.append(mods[head].register_forward_pre_hook(
        lambda mod, inp: state.__setitem__("done", True)))
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, in_channels, *hw, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    if state["last"] is None:
        raise ModelError(f"the model has no spatial feature map before {head!r}: gmpq needs a "
                         "convolutional network")
    return str(state["last"])


class FeatureTap:
    """Keeps the output of one module (``output=True``) or the input of one, on every forward.

    With ``leaf=True`` the captured output is detached and made a leaf requiring grad, and
    replaces the module's output: the graph then starts at the feature map (a teacher's Grad-CAM
    without a backbone graph).
    """

    def __init__(self, module: nn.Module, *, output: bool = True, leaf: bool = False) -> None:
        self.value: Tensor | None = None
        self.leaf = leaf
        if output:
            self._h = module.register_forward_hook(self._post)
        else:
            self._h = module.register_forward_pre_hook(self._pre)

    def _post(self, mod: nn.Module, inp: Any, out: Tensor) -> Tensor | None:
        if self.leaf:
            out = out.detach().requires_grad_(True)
            self.value = out
            return out
        self.value = out
        return None

    def _pre(self, mod: nn.Module, inp: tuple[Tensor, ...]) -> None:
        self.value = inp[0]

    def remove(self) -> None:
        self._h.remove()
