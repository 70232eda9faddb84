"""One optimizer and schedule factory for training, fine-tuning and every supernet search.

* :func:`param_groups` splits parameters into a decayed group (weights of rank >= 2) and an
  undecayed one (biases, BatchNorm, quantizer steps/clips: rank <= 1), each carrying its
  ``base_lr`` so that a :class:`StepSchedule` can scale it.
* :func:`create_optimizer` builds the base optimizer (``sgd``, ``adam``, ``adamw``) over those
  groups and, when ``OptimConfig.sharpness`` says so, wraps it in :class:`~mpqkit.optim.SAM`,
  :class:`~mpqkit.optim.GSAM` or :class:`~mpqkit.optim.ASGA`: a configuration choice, so
  ``mpqkit finetune --optimizer asga`` works as a search does.
* :class:`StepSchedule` sets every group's learning rate per step:
  ``lr = base_lr * factor(step)`` with a linear warm-up, then cosine, step (x0.1 every
  ``step_size`` epochs) or constant.

Modelled on timm's ``create_optimizer_v2`` / ``create_scheduler_v2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from mpqkit.errors import ConfigError, check_betas, check_choice
from mpqkit.optim.sharpness import ASGA, GSAM, SAM, SharpnessAware

BASE_OPTIMIZERS = ("sgd", "adam", "adamw")
SHARPNESS = ("none", "sam", "gsam", "asga")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class OptimConfig:
    """Optimizer, schedule and (optional) sharpness-aware wrapper of a run.

    ``optimizer`` is the base optimizer; ``sam``, ``gsam`` or ``asga`` given as ``optimizer``
    mean "SGD wrapped by it" (``sharpness`` is set accordingly). ``rho0 .. h_ema`` configure
    ASGA (SAM and GSAM use ``rho0`` as their fixed radius), ``gsam_alpha`` GSAM.
    """

    optimizer: str = "sgd"
    sharpness: str = "none"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] | list[float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    step_size: int = 30  # epochs between x0.1 decays for schedule=step
    label_smoothing: float = 0.0
    rho0: float = 0.05
    rho_max: float = 0.1
    rho_min: float = 0.01
    gamma: float = 0.001
    adaptive: bool = True
    h_ema: float = 0.0
    gsam_alpha: float = 0.1

    def __post_init__(self) -> None:
        self.optimizer = str(self.optimizer).strip().lower()
        self.sharpness = str(self.sharpness).strip().lower()
        if self.optimizer in SHARPNESS[1:]:
            self.optimizer, self.sharpness = "sgd", self.optimizer
        check_choice("optimizer", self.optimizer, BASE_OPTIMIZERS + SHARPNESS[1:])
        check_choice("sharpness", self.sharpness, SHARPNESS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive: e.g. 0.1")
        for name in ("momentum", "weight_decay", "warmup_epochs", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.step_size < 1:
            raise ConfigError(f"step_size={self.step_size} must be at least 1")
        self.betas = check_betas("betas", self.betas)

    def describe(self) -> str:
        base = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[self.optimizer]
        return base if self.sharpness == "none" else f"{self.sharpness.upper()}({base})"

    def record(self) -> dict[str, Any]:
        """The settings that define the update, for provenance records."""
        rec: dict[str, Any] = {"base": self.describe(), "lr": self.lr,
                               "weight_decay": self.weight_decay, "schedule": self.schedule}
        if self.optimizer == "sgd":
            rec.update(momentum=self.momentum, nesterov=self.nesterov)
        else:
            rec["betas"] = list(self.betas)
        if self.schedule == "step":
            rec["step_size"] = self.step_size
        if self.sharpness != "none":
            rec.update(sharpness=self.sharpness.upper(), rho0=self.rho0, rho_max=self.rho_max,
                       rho_min=self.rho_min, gamma=self.gamma, adaptive=self.adaptive,
                       h_ema=self.h_ema)
        return rec


def param_groups(params: Iterable[nn.Parameter], lr: float, weight_decay: float,
                 **extra: Any) -> list[dict[str, Any]]:
    """Decayed (rank >= 2) and undecayed (rank <= 1) groups of the trainable ``params``."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, **extra},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, **extra}]
    return [g for g in groups if g["params"]]


def base_optimizer(groups: Sequence[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    """The plain optimizer over ``groups`` (groups may override ``lr``/``weight_decay``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(list(groups), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(list(groups), lr=cfg.lr, betas=tuple(cfg.betas))  # type: ignore[arg-type]


def wrap_sharpness(base: Optimizer, cfg: OptimConfig,
                   model: nn.Module | None = None) -> SharpnessAware | None:
    """``base`` wrapped by ``cfg.sharpness`` (None for ``"none"``)."""
    if cfg.sharpness == "sam":
        return SAM(base, rho=cfg.rho0, model=model)
    if cfg.sharpness == "gsam":
        return GSAM(base, rho=cfg.rho0, alpha=cfg.gsam_alpha, model=model)
    if cfg.sharpness == "asga":
        return ASGA(base, rho0=cfg.rho0, rho_max=cfg.rho_max, rho_min=cfg.rho_min,
                    gamma=cfg.gamma, adaptive=cfg.adaptive, h_ema=cfg.h_ema, model=model)
    return None


def create_optimizer(groups: Sequence[dict[str, Any]], cfg: OptimConfig,
                     model: nn.Module | None = None) -> tuple[Optimizer, SharpnessAware | None]:
    """``(base, wrapper)``: the base optimizer and its sharpness-aware wrapper, if configured.

    Checkpoints store ``base``'s state (the wrapper's radius and counters separately); a step
    goes through the wrapper when there is one.
    """
    base = base_optimizer(groups, cfg)
    return base, wrap_sharpness(base, cfg, model)


class OptimizerSet:
    """Several optimizers stepped, saved and restored as one (e.g. SGD weights, Adam logits).

    ``state_dict()`` has the usual ``state``/``param_groups`` layout with the parameter ids of
    later optimizers renumbered after the earlier ones', so checkpoints store it as one.
    """

    def __init__(self, *optimizers: Optimizer) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({int(k) + offset: v for k, v in sd["state"].items()})
            for g in sd["param_groups"]:
                groups.append({**g, "params": [int(i) + offset for i in g["params"]]})
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        groups, state = list(sd["param_groups"]), sd["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} saved param groups for {len(self.param_groups)}")
        for o in self.optimizers:
            mine, groups = groups[:len(o.param_groups)], groups[len(o.param_groups):]
            ids = {int(i) for g in mine for i in g["params"]}
            o.load_state_dict({"state": {k: v for k, v in state.items() if int(k) in ids},
                               "param_groups": mine})


class StepSchedule:
    """Per-step learning rates: every group's ``lr = base_lr * factor(step)``."""

    def __init__(self, optimizer: Optimizer | OptimizerSet, schedule: str, *, epochs: int,
                 steps_per_epoch: int, warmup_epochs: float = 0.0, step_size: int = 30) -> None:
        check_choice("schedule", schedule, SCHEDULES)
        self.optimizer = optimizer
        self.schedule = schedule
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = max(1, epochs * steps_per_epoch)
        self.warm = int(warmup_epochs * steps_per_epoch)
        self.step_size = max(1, step_size)
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])

    @classmethod
    def from_config(cls, optimizer: Optimizer | OptimizerSet, cfg: OptimConfig, *, epochs: int,
                    steps_per_epoch: int) -> StepSchedule:
        return cls(optimizer, cfg.schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                   warmup_epochs=cfg.warmup_epochs, step_size=cfg.step_size)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rates at global ``step``."""
        if step < self.warm:
            return (step + 1) / self.warm
        if self.schedule == "cosine":
            t = (step - self.warm) / max(1, self.total - self.warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if self.schedule == "step":
            return 0.1 ** ((step // self.steps_per_epoch) // self.step_size)
        return 1.0

    def set_step(self, step: int) -> float:
        """Set every group's learning rate for global ``step``; returns the factor."""
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return f
