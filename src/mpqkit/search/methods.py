"""The supernet search methods: each adds only its own part to the shared loop.

* ``edmips`` (CVPR 2020): cross-entropy + budget penalty, plain SGD.
* ``asga`` (ICML 2025): the same loss, optimized by :class:`mpqkit.optim.ASGA` (adaptive-radius
  sharpness-aware minimization with implicit gradient alignment). All parameters except the
  logits are perturbed (``perturb_logits`` switches that); the logits receive the aligned
  gradient ``(g + g_adv) / 2``; the complexity gradient is added to the logits once, after the
  two passes (``before_update``).
* ``gmpq`` (ICCV 2021): plus the attribution-rank loss: the Grad-CAM map of the last feature map
  of the supernet must match the teacher's map raised to ``attr_power`` (L2 distance of the
  L2-normalized maps, weight ``attr_weight``). The supernet map is differentiated through its
  own gradient (``create_graph=True``: a double backward). The teacher is a full-precision model
  trained on the proxy set: ``cfg.teacher`` (a checkpoint), or trained first with
  :func:`mpqkit.engine.train` for ``teacher_epochs`` epochs into ``RUN_DIR/teacher``.
* ``seam`` (ACM MM 2023): plus a large-margin regularizer on the penultimate features (the input
  of the last linear layer), our reading of the paper: with L2-normalized features ``z_i`` and
  normalized batch class centres ``c_k``, ``intra = mean_i (1 - <z_i, c_{y_i}>)`` (compactness)
  and ``inter = mean_{k != l} relu(<c_k, c_l> - seam_margin)`` (separation); the loss adds
  ``seam_weight * (intra + inter)``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpqkit.errors import ConfigError, ModelError
from mpqkit.policy import first_last_layers
from mpqkit.search.loop import SearchContext, SupernetMethod, register_method
from mpqkit.search.supernet import Supernet

log = logging.getLogger("mpqkit")

__all__ = ["ASGAMethod", "EdMIPS", "FeatureTap", "GMPQ", "SEAM", "attribution_loss",
           "find_feature_module", "gradcam", "margin_loss"]


# ----------------------------------------------------------------------------------------------
# feature taps
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# loss terms
# ----------------------------------------------------------------------------------------------
def gradcam(feature: Tensor, logits: Tensor, target: Tensor, *,
            create_graph: bool) -> Tensor:
    """Grad-CAM maps ``relu(sum_c mean_hw(d score/d A_c) * A_c)`` of the target classes, (N,H,W)."""
    score = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, feature, create_graph=create_graph)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * feature).sum(1))


def attribution_loss(cam: Tensor, cam_teacher: Tensor, power: float = 3.0,
                     eps: float = 1e-8) -> Tensor:
    """Mean L2 distance of the normalized maps, the teacher map raised to ``power`` first."""
    s = cam.flatten(1)
    t = cam_teacher.detach().flatten(1).pow(power)
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    return (s - t).norm(dim=1).mean()


def margin_loss(features: Tensor, target: Tensor, margin: float = 0.0) -> Tensor:
    """Intra-class compactness plus inter-class separation of L2-normalized features."""
    z = F.normalize(features.flatten(1), dim=1)
    classes, inv = torch.unique(target, return_inverse=True)
    centres = torch.zeros(len(classes), z.shape[1], device=z.device, dtype=z.dtype)
    centres = centres.index_add(0, inv, z)
    centres = F.normalize(centres, dim=1)
    intra = (1.0 - (z * centres[inv]).sum(1)).mean()
    if len(classes) < 2:
        return intra
    sim = centres @ centres.t()
    off = ~torch.eye(len(classes), dtype=torch.bool, device=z.device)
    inter = F.relu(sim[off] - margin).mean()
    return intra + inter


def _head_name(supernet: Supernet) -> str:
    return first_last_layers(supernet.infos)[-1]


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
class EdMIPS(SupernetMethod):
    """EdMIPS: differentiable search with plain SGD."""

    name = "edmips"
    optimizer = "sgd"
    description = "EdMIPS (CVPR 2020): differentiable search, plain SGD"


class ASGAMethod(SupernetMethod):
    """ASGA: the supernet trained with adaptive sharpness-aware gradient aligning."""

    name = "asga"
    optimizer = "asga"
    description = "ASGA (ICML 2025): supernet with adaptive sharpness-aware gradient aligning"


class SEAM(SupernetMethod):
    """SEAM: large-margin regularization of the penultimate features."""

    name = "seam"
    optimizer = "sgd"
    description = "SEAM (ACM MM 2023): large-margin feature regularizer"

    def __init__(self) -> None:
        self.tap: FeatureTap | None = None

    def setup(self, ctx: SearchContext, supernet: Supernet) -> dict[str, Any]:
        head = _head_name(supernet)
        self.tap = FeatureTap(supernet.net.get_submodule(head), output=False)
        return {"seam": {"weight": ctx.cfg.seam_weight, "margin": ctx.cfg.seam_margin,
                         "features": f"input of {head}"}}

    def loss(self, ctx: SearchContext, supernet: Supernet, x: Tensor,
             y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        assert self.tap is not None, "setup() first"
        logits = supernet(x)
        ce = F.cross_entropy(logits, y)
        assert self.tap.value is not None
        reg = margin_loss(self.tap.value, y, ctx.cfg.seam_margin)
        loss = ce + ctx.cfg.seam_weight * reg
        return loss, logits, {"task_loss": float(ce.detach()), "extra_loss": float(reg.detach())}


class GMPQ(SupernetMethod):
    """GMPQ: attribution-rank consistency with a full-precision teacher (double backward)."""

    name = "gmpq"
    optimizer = "sgd"
    description = "GMPQ (ICCV 2021): attribution-rank loss against an FP teacher"

    def __init__(self) -> None:
        self._state: dict[str, Any] = {}
        self.teacher_forward_passes = 0
        self.double_backward_passes = 0

    def counters(self) -> dict[str, int]:
        return {"teacher_forward_passes": self.teacher_forward_passes,
                "double_backward_passes": self.double_backward_passes}

    def load_counters(self, state: Mapping[str, int]) -> None:
        self.teacher_forward_passes = int(state.get("teacher_forward_passes", 0))
        self.double_backward_passes = int(state.get("double_backward_passes", 0))

    def setup(self, ctx: SearchContext, supernet: Supernet) -> dict[str, Any]:
        teacher, record = self._teacher(ctx)
        teacher = teacher.to(ctx.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        head = _head_name(supernet)
        size = ctx.data.input_size
        # probe the float model (same layer names): a probe of the supernet would initialise
        # its quantizers from the probe image
        feat = find_feature_module(ctx.model, size, head)
        tfeat = find_feature_module(teacher, size, head)
        self._state = {
            "teacher": teacher,
            "tap": FeatureTap(supernet.net.get_submodule(feat)),
            "teacher_tap": FeatureTap(teacher.get_submodule(tfeat), leaf=True),
        }
        record.update(feature_map=feat, attr_weight=ctx.cfg.attr_weight,
                      attr_power=ctx.cfg.attr_power)
        return {"gmpq": record}

    def _teacher(self, ctx: SearchContext) -> tuple[nn.Module, dict[str, Any]]:
        from mpqkit.engine import load_checkpoint_model

        cfg = ctx.cfg
        if cfg.teacher:
            model, meta = load_checkpoint_model(cfg.teacher)
            if meta.get("policy"):
                raise ConfigError(f"teacher {cfg.teacher} is a quantized checkpoint: pass a "
                                  "full-precision one (from mpqkit train)")
            if int(meta["num_classes"]) != ctx.num_classes:
                raise ConfigError(f"teacher {cfg.teacher} predicts {meta['num_classes']} classes "
                                  f"but the proxy set has {ctx.num_classes}: pass a teacher "
                                  "trained on the proxy set")
            return model, {"teacher": f"checkpoint:{cfg.teacher}",
                           "teacher_model": meta.get("model")}
        tdir = ctx.run_dir / "teacher"
        best = tdir / "best.safetensors"
        record: dict[str, Any] = {"teacher": f"trained:{best}",
                                  "teacher_epochs": cfg.teacher_epochs,
                                  "teacher_data": ctx.data.description}
        if best.is_file():
            model, meta = load_checkpoint_model(best)
            record["teacher_top1"] = (meta.get("metrics") or {}).get("eval_acc")
            record["teacher_reused"] = True
            return model, record
        model, extra = self._train_teacher(ctx, tdir)
        record.update(extra)
        return model, record

    @staticmethod
    def _train_teacher(ctx: SearchContext, tdir: Path) -> tuple[nn.Module, dict[str, Any]]:
        from mpqkit.engine import OptimConfig, RunConfig, load_checkpoint_model, train

        cfg = ctx.cfg
        log.info(f"gmpq: training the full-precision teacher for {cfg.teacher_epochs} epoch(s) "
                 f"on {ctx.data.description} into {tdir}")
        rc = RunConfig(model=cfg.model, num_classes=ctx.num_classes, weights=cfg.weights,
                       epochs=cfg.teacher_epochs, max_steps_per_epoch=cfg.max_steps_per_epoch,
                       seed=cfg.seed, device=cfg.device, out=str(tdir), overwrite=True,
                       save_every_min=0.0, data=copy.deepcopy(ctx.cfg.data),
                       optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4,
                                         schedule="cosine"))
        res = train(rc)
        model, _ = load_checkpoint_model(tdir / "best.safetensors")
        return model, {"teacher_top1": res.best_acc, "teacher_train_seconds": round(res.seconds, 3),
                       "teacher_reused": False}

    def loss(self, ctx: SearchContext, supernet: Supernet, x: Tensor,
             y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        st = self._state
        logits = supernet(x)
        ce = F.cross_entropy(logits, y)
        feat = st["tap"].value
        with torch.enable_grad():
            t_logits = st["teacher"](x)
            cam_t = gradcam(st["teacher_tap"].value, t_logits, y, create_graph=False)
        self.teacher_forward_passes += 1
        cam_s = gradcam(feat, logits, y, create_graph=True)
        self.double_backward_passes += 1
        attr = attribution_loss(cam_s, cam_t, ctx.cfg.attr_power)
        loss = ce + ctx.cfg.attr_weight * attr
        return loss, logits, {"task_loss": float(ce.detach()), "extra_loss": float(attr.detach())}


register_method("edmips", EdMIPS())
register_method("asga", ASGAMethod())
register_method("gmpq", GMPQ())
register_method("seam", SEAM())
