"""GMPQ (ICCV 2021): the supernet search plus an attribution-rank loss.

The Grad-CAM map of the last feature map of the supernet must match the teacher's map raised to
``attr_power`` (L2 distance of the L2-normalized maps, weight ``attr_weight``). The supernet map
is differentiated through its own gradient (``create_graph=True``: a double backward). The
teacher is a full-precision model trained on the proxy set: ``teacher`` (a checkpoint), or
trained first with :func:`mpqkit.engine.train` for ``teacher_epochs`` epochs into
``RUN_DIR/teacher``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mpqkit.errors import ConfigError
from mpqkit.search.context import SearchContext, SupernetMethod
from mpqkit.search.methods._taps import FeatureTap, find_feature_module, head_name
from mpqkit.search.methods._teacher import TeacherOptions, proxy_fp_model
from mpqkit.search.registry import register_method
from mpqkit.search.supernet import Supernet


@dataclass
class GMPQConfig(TeacherOptions):
    attr_weight: float = field(default=40.0, metadata={
        "help": "weight of the attribution-rank loss"})
    attr_power: float = field(default=3.0, metadata={
        "help": "power the teacher's attribution map is raised to"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attr_weight < 0:
            raise ConfigError(f"attr_weight={self.attr_weight} must be >= 0")
        if self.attr_power <= 0:
            raise ConfigError(f"attr_power={self.attr_power} must be positive: e.g. 3")


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


@register_method("gmpq", config=GMPQConfig,
                 description="GMPQ (ICCV 2021): attribution-rank loss against an FP teacher")
class GMPQ(SupernetMethod):
    """GMPQ: attribution-rank consistency with a full-precision teacher (double backward)."""

    name = "gmpq"

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
        opts = ctx.options
        teacher, rec = proxy_fp_model(ctx, opts.teacher, opts.teacher_epochs, "teacher", "gmpq")
        head = head_name(supernet)
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
        record = {("teacher" if k == "source" else f"teacher_{k}"): v for k, v in rec.items()}
        record.update(feature_map=feat, attr_weight=opts.attr_weight, attr_power=opts.attr_power)
        return {"gmpq": record}

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
        attr = attribution_loss(cam_s, cam_t, ctx.options.attr_power)
        loss = ce + ctx.options.attr_weight * attr
        return loss, logits, {"task_loss": float(ce.detach()), "extra_loss": float(attr.detach())}
