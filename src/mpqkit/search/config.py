"""The configuration of a search: what every method shares, plus the method's own options.

``SearchConfig`` holds the model, the search space, the budget, the supernet schedule (the
``optim`` section, the same :class:`~mpqkit.optim.OptimConfig` as training), the budget
multiplier, the run folder, and ``options``: the config dataclass of the chosen method (see
:mod:`mpqkit.search.registry`), e.g. ``options: {attr_weight: 40}`` for ``gmpq``.

Configs written by mpqkit 0.1 (every method's knobs flat at the top level, ``lr_w``,
``momentum``, ...) still load: :meth:`SearchConfig.migrate` moves those keys to their sections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpqkit.data import DataConfig
from mpqkit.engine.config import load_config
from mpqkit.errors import ConfigError, check_betas, check_choice
from mpqkit.optim.factory import OptimConfig
from mpqkit.policy import FIRST_LAST_MODES
from mpqkit.quant.layers import QuantConfig
from mpqkit.search.registry import get_method, method_specs
from mpqkit.search.supernet import parse_candidates

LAMBDA_ON = ("argmax", "expected")
ARCH_OPTIMIZERS = ("sgd", "adam")
DUALS = ("equality", "inequality", "reset")
# keys of mpqkit 0.1's flat SearchConfig that now live in the ``optim`` section
_LEGACY_OPTIM = {"lr_w": "lr", "momentum": "momentum", "nesterov": "nesterov",
                 "weight_decay": "weight_decay", "schedule": "schedule", "step_size": "step_size",
                 "warmup_epochs": "warmup_epochs", "rho0": "rho0", "rho_max": "rho_max",
                 "rho_min": "rho_min", "gamma": "gamma", "adaptive": "adaptive", "h_ema": "h_ema"}
_LEGACY_OPTIONS = {"fp_epochs": "teacher_epochs"}  # 0.1's free-form options renamed


def _search_data() -> DataConfig:
    return DataConfig(batch_size=256)


def _search_optim() -> OptimConfig:
    """SGD momentum 0.9, lr 0.1, wd 1e-4 (EdMIPS/GMPQ), cosine to 0 over the search.

    The schedule applies to the logits too: annealed, they settle, and the argmax policy stops
    flipping around the budget at the end of a short search (EdMIPS/GMPQ's x0.1 every 10 epochs,
    ``schedule: step``, never decays a 10-epoch search; benchmarks/search_decides.py).
    """
    return OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine", step_size=10)


@dataclass
class SearchConfig:
    """Everything a search needs. Sections ``optim``, ``data``, ``quant``, ``options``.

    Budget: exactly one of ``budget_bitops`` (``"1.2G"``), ``budget`` (a uniform policy whose
    BitOps is the budget, ``"w3a3"``), ``budget_bits`` (average bits, ``2.5``) or
    ``budget_size_mb``. ``input_size`` is the deployment
    resolution the complexity is counted at (default: the proxy data's). ``weights``: FP weights
    to start from (path or ``"bundled"``); none means random initialisation (as GMPQ).
    ``options`` is the chosen method's own config (a dataclass; a mapping in YAML; unset means
    the method's defaults, resolved by :meth:`method_options`).
    """

    model: str = "resnet20"
    num_classes: int | None = None
    input_size: int | None = None
    weights: str | None = None
    method: str = "asga"
    w_bits: list[int] | str = field(default_factory=lambda: [2, 3, 4, 6])
    a_bits: list[int] | str = field(default_factory=lambda: [2, 3, 4, 6])
    budget_bitops: str | None = None
    budget: str | None = None
    budget_size_mb: float | None = None
    budget_bits: float | None = None  # average bits b: BitOps of every searchable layer at b x b
    tol: float = 0.02
    first_last: str = "8bit"
    epochs: int = 25
    max_steps_per_epoch: int | None = None
    calib_batches: int = 1
    # the architecture logits: "adam" (default) gives them their own Adam (betas arch_betas);
    # "sgd" puts them in the weights' optimizer as a group with lr_alpha (EdMIPS/GMPQ, and
    # mpqkit 0.1). Through the mixed quantized tensors the logits get gradients of ~1e-4, so
    # SGD at lr 0.01 moves them by ~1e-3 in a few hundred steps and the budget repair picks the
    # bits; Adam's steps are ~lr whatever the gradient's scale (benchmarks/search_decides.py).
    arch_optimizer: str = "adam"
    lr_alpha: float = 0.05
    alpha_weight_decay: float = 0.0
    arch_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    arch_warmup_epochs: int = 0  # logits frozen (and lambda held) for the first epochs
    # budget dual ascent: lambda <- max(0, lambda + lambda_lr * (C / B - 1)) every step (dual
    # "inequality"; "equality" below aims at the band's middle with a free lambda). 0.5 is
    # our default: on a 100-step CIFAR-10 proxy search 0.01 left lambda without effect, 1.0
    # met the budget within ~70 steps and then overshot.
    lambda_lr: float = 0.5
    lambda_init: float = 0.0
    # what C in the dual update is: "argmax" (default), the cost of the policy the search would
    # return now, or "expected", the differentiable expected cost. Driving lambda by the expected
    # cost pushes every layer's argmax to the cheapest bits long before the expectation reaches
    # the budget (the logits stay nearly uniform in short searches), so the final repair, not
    # the search, would choose the bits. The penalty's gradient acts on the expected cost either
    # way.
    lambda_on: str = "argmax"
    # "reset" (default): lambda >= 0 on C <= (1 - tol) B, the band's lower edge, and back to 0
    # as soon as the argmax fits, so the argmax hovers inside the repair band. "inequality" (as
    # mpqkit 0.1) on C <= B without the reset: a first-epoch overshoot winds lambda up and it
    # keeps pushing the argmax down to ~0.7 x budget for an epoch; the task loss then raises
    # the bits slowly while the schedule anneals the logits (0.89 to 0.96 x budget, 1 to 5
    # layers repaired at 2.5 bits). "equality": lambda is a free multiplier of C = (1 - tol/2) B;
    # with lambda_lr 0.5 it swung the argmax between 0.68 and 1.37 x budget in a 10-epoch ASGA
    # search (benchmarks/search_decides.py).
    dual: str = "reset"
    # the argmax cost the multiplier aims at, x budget; unset: 0.95 for "reset" (the middle of
    # [0.9, 1.0]: the argmax hovers a few percent around it, and aimed at 0.98 it ended at
    # 1.019 x budget), 1.0 for "inequality", 1 - tol/2 for "equality"
    lambda_target: float | None = None
    # proportional gain of the reset/inequality multiplier: lambda = integral + kp * excess. 0
    # (a pure integral): with kp 5 the argmax landed as close to the target, but the logits
    # ended less decided (mean top-1 probability 0.33-0.40 against 0.41-0.47)
    lambda_kp: float = 0.0
    bilevel: bool = False  # logits on a held-out part of the proxy set (first-order)
    val_fraction: float = 0.5
    options: Any = None
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    compile: bool = False  # torch.compile the supernet (after calibration)
    save_every_min: float = 5.0  # mid-epoch checkpoint period (minutes); 0 = only per epoch
    optim: OptimConfig = field(default_factory=_search_optim)
    data: DataConfig = field(default_factory=_search_data)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        self.w_bits = list(parse_candidates(self.w_bits, "weight bit candidates (w_bits)"))
        self.a_bits = list(parse_candidates(self.a_bits, "activation bit candidates (a_bits)"))
        self.method = str(self.method).strip().lower()
        if self.options is not None:
            self.options = get_method(self.method).make_options(self.options)
        check_choice("first_last", self.first_last, FIRST_LAST_MODES)
        check_choice("arch_optimizer", self.arch_optimizer, ARCH_OPTIMIZERS)
        self.arch_betas = list(check_betas("arch_betas", self.arch_betas))
        if self.lambda_init < 0 and self.dual != "equality":
            raise ConfigError(f"lambda_init={self.lambda_init} must be >= 0 with dual "
                              f"{self.dual}: use --dual equality for a free multiplier")
        if self.lambda_target is not None and not 0 < self.lambda_target <= 1:
            raise ConfigError(f"lambda_target={self.lambda_target} must be in (0, 1]: the "
                              "argmax cost to aim at, x budget (e.g. 0.95)")
        if self.arch_warmup_epochs < 0:
            raise ConfigError(f"arch_warmup_epochs={self.arch_warmup_epochs} must be >= 0")
        check_choice("lambda_on", self.lambda_on, LAMBDA_ON)
        check_choice("dual", self.dual, DUALS)
        for name in ("epochs", "calib_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError("max_steps_per_epoch must be at least 1 (or unset for full epochs)")
        if not self.lr_alpha > 0:
            raise ConfigError(f"lr_alpha={self.lr_alpha} must be positive: e.g. 0.01")
        for name in ("alpha_weight_decay", "lambda_lr", "lambda_kp", "save_every_min"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.tol < 1:
            raise ConfigError(f"tol={self.tol} must be in [0, 1): e.g. 0.02 for a 2% band")
        if self.bilevel and not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1) for a bi-level "
                              "search: e.g. 0.5 holds out half of the proxy set for the logits")

    @staticmethod
    def migrate(d: dict[str, Any]) -> dict[str, Any]:
        """Move the keys of an mpqkit 0.1 config (flat method knobs) to their sections.

        A 0.1 config (it has ``lr_w``) also keeps 0.1's logits optimizer (``sgd``).
        A method knob the chosen method does not have is dropped: 0.1 wrote every method's
        defaults into every run's ``config.yaml``.
        """
        optim = dict(d.get("optim") or {})
        if "lr_w" in d:  # 0.1 kept the logits in the weights' SGD
            d["arch_optimizer"] = "sgd"
        for old, new in _LEGACY_OPTIM.items():
            if old in d:
                optim[new] = d.pop(old)
        if optim:
            d["optim"] = optim
        known = {n for m in method_specs() for n in m.option_names()}
        flat = {k: d.pop(k) for k in list(d) if k in known}
        opts = d.get("options")
        if flat or (isinstance(opts, Mapping) and set(opts) & set(_LEGACY_OPTIONS)):
            mine = set(get_method(d.get("method", "asga")).option_names())
            merged = {_LEGACY_OPTIONS.get(k, k): v for k, v in {**flat, **(opts or {})}.items()}
            d["options"] = {k: v for k, v in merged.items() if k in mine}
        return d

    def method_options(self) -> Any:
        """The method's config: ``options`` as given, or the method's defaults."""
        if self.options is None:
            self.options = get_method(self.method).make_options(None)
        return self.options


def load_search_config(config_file: str | Path | None = None,
                       overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    """Defaults < YAML file < ``overrides`` (dotted keys for ``optim.*``, ``options.*``, ...)."""
    return load_config(SearchConfig, config_file, overrides)
