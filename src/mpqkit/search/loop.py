"""The policy search: one configuration, one run folder, one loop shared by every method.

``search(cfg)`` builds the proxy data and the model, states the budget (refusing an infeasible
one before any training), and dispatches by ``cfg.method`` through a registry:

* supernet methods (``asga``, ``edmips``, ``gmpq``, ``seam``; :mod:`mpqkit.search.methods`)
  train the :class:`~mpqkit.search.supernet.Supernet` with the loop below; each adds only its
  optimizer and its loss terms;
* other methods (``hawq``, ``uniform``, ``random``, registered by their own modules with
  :func:`register_method`) get a :class:`SearchContext` and return a policy.

Budget targeting (no hand-tuned penalty weight): the loss is ``task + lambda * C(alpha) / B``
and ``lambda`` follows a dual (Lagrange) ascent on the constraint ``C <= B`` every step,
``lambda <- max(0, lambda + eta * (C / B - 1))``. The argmax policy is finally repaired into
``[(1 - tol) B, B]`` by :func:`mpqkit.search.budget.repair`, least decided layers first.

A run folder holds ``config.yaml``, ``policy.json``, ``search.csv`` (per epoch), ``alpha.json``
(per-epoch softmax of every layer's logits), ``log.txt`` and ``last.safetensors``/``last.json``
(the supernet, optimizer, lambda and counters after every finished epoch: ``resume=True``
continues a killed search from there).
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mpqkit.complexity import (
    Budget,
    LayerInfo,
    normalize_input_size,
    parse_budget,
    policy_cost,
    profile_model,
)
from mpqkit.data import DataBundle, DataConfig, build_data, make_loader
from mpqkit.engine.checkpoint import (
    load_model_state,
    read_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from mpqkit.engine.config import from_dict, load_config, to_dict, write_yaml
from mpqkit.engine.distributed import resolve_device
from mpqkit.engine.trainer import resolve_weights, setup_logging
from mpqkit.errors import ConfigError
from mpqkit.models import build_model
from mpqkit.optim import ASGA
from mpqkit.optim.bn import frozen_bn_stats
from mpqkit.policy import FIRST_LAST_MODES, Policy, first_last_bits, first_last_layers
from mpqkit.quant.layers import QuantConfig
from mpqkit.runio import atomic_write_text, default_run_dir, prepare_run_dir
from mpqkit.search.budget import check_feasible, repair
from mpqkit.search.supernet import Supernet, build_supernet, parse_candidates

log = logging.getLogger("mpqkit")

SCHEDULES = ("step", "cosine", "constant")
CSV_FIELDS = ["epoch", "steps", "lr_w", "lr_alpha", "loss", "acc", "task_loss", "extra_loss",
              "expected_bitops", "expected_size_mb", "expected_ratio", "argmax_bitops",
              "argmax_size_mb", "lambda", "rho", "h", "cos", "decidedness", "epoch_seconds",
              "images_per_s"]


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _search_data() -> DataConfig:
    return DataConfig(batch_size=256)


@dataclass
class SearchConfig:
    """Everything a search needs. Sections ``data`` and ``quant``; flags override a YAML file.

    Budget: exactly one of ``budget_bitops`` (``"1.2G"``), ``budget`` (a uniform policy whose
    BitOps is the budget, ``"w3a3"``) or ``budget_size_mb``. ``input_size`` is the deployment
    resolution the complexity is counted at (default: the proxy data's). ``weights``: FP weights
    to start from (path or ``"bundled"``); none means random initialisation (as GMPQ).
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
    tol: float = 0.02
    first_last: str = "8bit"
    # schedule (EdMIPS/GMPQ search recipe)
    epochs: int = 25
    max_steps_per_epoch: int | None = None
    lr_w: float = 0.1
    lr_alpha: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    alpha_weight_decay: float = 0.0
    schedule: str = "step"  # step | cosine | constant (applies to weights and logits)
    step_size: int = 10  # epochs between x0.1 decays (schedule=step)
    warmup_epochs: float = 0.0
    calib_batches: int = 1
    # budget dual ascent: lambda <- max(0, lambda + lambda_lr * (C / B - 1)) every step. 0.5 is
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
    # asga
    rho0: float = 0.05
    rho_max: float = 0.1
    rho_min: float = 0.01
    gamma: float = 0.001
    adaptive: bool = True
    h_ema: float = 0.0
    perturb_logits: bool = False
    # bi-level: logits on a held-out part of the proxy set (first-order)
    bilevel: bool = False
    val_fraction: float = 0.5
    # gmpq
    teacher: str | None = None
    teacher_epochs: int = 5
    attr_weight: float = 40.0
    attr_power: float = 3.0
    # seam
    seam_weight: float = 1.0
    seam_margin: float = 0.0
    # hawq (mpqkit.search.hawq) and free-form options of other registered methods
    hawq_batches: int = 4
    hawq_iters: int = 16
    options: dict[str, Any] = field(default_factory=dict)
    # run
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    data: DataConfig = field(default_factory=_search_data)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        self.w_bits = list(parse_candidates(self.w_bits, "weight bit candidates (w_bits)"))
        self.a_bits = list(parse_candidates(self.a_bits, "activation bit candidates (a_bits)"))
        self.method = str(self.method).strip().lower()
        if self.first_last not in FIRST_LAST_MODES:
            raise ConfigError(f"first_last={self.first_last!r} is unknown: use one of "
                              f"{', '.join(FIRST_LAST_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is unknown: use one of "
                              f"{', '.join(SCHEDULES)}")
        if self.lambda_on not in ("argmax", "expected"):
            raise ConfigError(f"lambda_on={self.lambda_on!r} is unknown: use argmax or expected")
        for name in ("epochs", "step_size", "calib_batches", "teacher_epochs", "hawq_batches",
                     "hawq_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError("max_steps_per_epoch must be at least 1 (or unset for full epochs)")
        for name in ("lr_w", "lr_alpha"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive: e.g. 0.1")
        for name in ("momentum", "weight_decay", "alpha_weight_decay", "lambda_lr",
                     "lambda_init", "attr_weight", "seam_weight", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.tol < 1:
            raise ConfigError(f"tol={self.tol} must be in [0, 1): e.g. 0.02 for a 2% band")
        if self.bilevel and not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1) for a bi-level "
                              "search: e.g. 0.5 holds out half of the proxy set for the logits")
        if self.attr_power <= 0:
            raise ConfigError(f"attr_power={self.attr_power} must be positive: e.g. 3")
        if not isinstance(self.options, dict):
            raise ConfigError("options must be a mapping of method options")


def load_search_config(config_file: str | Path | None = None,
                       overrides: Mapping[str, Any] | None = None) -> SearchConfig:
    """Defaults < YAML file < ``overrides`` (dotted keys for ``data.*`` and ``quant.*``)."""
    return load_config(SearchConfig, config_file, overrides)


def supernet_from_checkpoint(tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
                             source: str) -> Supernet:
    """Rebuild the supernet a search saved (``RUN_DIR/last.safetensors``) with its state."""
    cfg = from_dict(SearchConfig, meta["config"], f"{source} config")
    model = build_model(cfg.model, num_classes=int(meta["num_classes"]))
    sn = build_supernet(model, tuple(meta["input_size"]), w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                        first_last=cfg.first_last, quant=cfg.quant, model_name=cfg.model,
                        inplace=True)
    load_model_state(sn, tensors, source)
    return sn


# ----------------------------------------------------------------------------------------------
# method registry
# ----------------------------------------------------------------------------------------------
class SupernetMethod:
    """A differentiable search on the shared supernet: subclasses add an optimizer / a loss.

    ``optimizer`` is ``"sgd"`` or ``"asga"``. :meth:`loss` returns ``(loss, logits, extras)``:
    the task loss plus the method's terms (the complexity penalty is added by the loop),
    the logits for accuracy, and scalar extras for the logs (``task_loss``, ``extra_loss``).
    """

    name = ""
    optimizer = "sgd"
    description = ""

    def setup(self, ctx: SearchContext, supernet: Supernet) -> dict[str, Any]:
        """Prepare (e.g. a teacher); returns provenance entries."""
        return {}

    def loss(self, ctx: SearchContext, supernet: Supernet, x: Tensor,
             y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        logits = supernet(x)
        loss = F.cross_entropy(logits, y)
        return loss, logits, {"task_loss": float(loss.detach())}

    def counters(self) -> dict[str, int]:
        """Extra cost of the method (e.g. teacher forwards), for the search cost record."""
        return {}

    def load_counters(self, state: Mapping[str, int]) -> None:
        """Restore :meth:`counters` on resume."""


@dataclass
class MethodResult:
    """What a non-supernet method may return instead of a :class:`Policy`.

    ``repair=False`` exempts the bits from the move into the budget band (e.g. the uniform
    baseline, which need not come within the band); they are recorded as they are.
    """

    bits: dict[str, tuple[int, int]]
    provenance: dict[str, Any] = field(default_factory=dict)
    repair: bool = True


PolicyFn = Callable[["SearchContext"], "Policy | MethodResult"]


@dataclass
class MethodEntry:
    name: str
    impl: SupernetMethod | PolicyFn
    description: str = ""

    @property
    def is_supernet(self) -> bool:
        return isinstance(self.impl, SupernetMethod)


_REGISTRY: dict[str, MethodEntry] = {}
# Modules that register methods when imported (absent ones are skipped).
METHOD_MODULES = ("mpqkit.search.methods", "mpqkit.search.hawq", "mpqkit.search.baselines")
_loaded = False


def register_method(name: str, impl: SupernetMethod | PolicyFn, *, description: str = "") -> None:
    """Make ``mpqkit search --method NAME`` run ``impl``.

    ``impl`` is a :class:`SupernetMethod` (trained by the shared loop), or a function
    ``fn(ctx: SearchContext) -> Policy | MethodResult`` for methods without a supernet: the
    context holds the FP model (weights loaded), the proxy data, the layer infos, the
    searchable/fixed layers, the candidates and the budget (feasibility already checked). The
    loop records the common provenance, repairs a policy outside the budget band and writes the
    run folder.
    """
    key = name.strip().lower()
    _REGISTRY[key] = MethodEntry(key, impl, description or getattr(impl, "description", "")
                                 or (getattr(impl, "__doc__", "") or "").strip().split("\n")[0])


def _load_methods() -> None:
    global _loaded
    if _loaded:
        return
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and mod.startswith(exc.name):
                continue
            raise
    _loaded = True


def available_methods() -> list[str]:
    """Names of the registered search methods."""
    _load_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodEntry:
    """The registered method ``name``; a one-line error listing the known ones otherwise."""
    _load_methods()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown search method {name!r}: use one of "
                          f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


# ----------------------------------------------------------------------------------------------
# context and result
# ----------------------------------------------------------------------------------------------
@dataclass
class SearchContext:
    """What a method gets: model, data, layers, candidates, budget and the run folder."""

    cfg: SearchConfig
    model: nn.Module  # full precision, weights loaded (if any), on ``device``
    data: DataBundle
    device: torch.device
    input_size: tuple[int, int]  # deployment resolution of the complexity
    infos: dict[str, LayerInfo]
    searchable: list[str]
    fixed_bits: dict[str, tuple[int, int]]
    w_candidates: tuple[int, ...]
    a_candidates: tuple[int, ...]
    budget: Budget
    run_dir: Path
    weights_init: str
    num_classes: int

    def batches(self, n: int, batch_size: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """The first ``n`` proxy training batches of epoch 0 (deterministic), on the device."""
        loader = make_loader(self.data.train, batch_size or self.cfg.data.batch_size, train=True,
                             seed=self.cfg.seed, epoch=0, workers=self.cfg.data.workers)
        out = []
        for i, (x, y) in enumerate(loader):
            if i >= n:
                break
            out.append((x.to(self.device), y.to(self.device)))
        return out

    def policy(self, bits: Mapping[str, tuple[int, int]],
               provenance: Mapping[str, Any] | None = None) -> Policy:
        """A :class:`Policy` of ``bits`` with this search's conventions and budget."""
        return Policy.from_bits(self.model, bits, self.input_size, model_name=self.cfg.model,
                                first_last=self.cfg.first_last, fixed=list(self.fixed_bits),
                                w_candidates=self.w_candidates, a_candidates=self.a_candidates,
                                provenance=provenance, budget=self.budget.to_dict(),
                                infos=self.infos)


@dataclass
class SearchResult:
    """What a search produced."""

    policy: Policy
    run_dir: Path
    method: str
    budget: Budget
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    argmax_bits: dict[str, tuple[int, int]] | None = None
    repaired_layers: list[str] = field(default_factory=list)

    def summary(self) -> str:
        cost = policy_cost(self.policy.layer_infos(), self.policy.bits(), self.budget.kind)
        return (f"{self.method}: {self.policy.describe()}; {self.budget.format(cost)} = "
                f"{cost / self.budget.value:.2%} of budget {self.budget.describe()}; "
                f"{len(self.repaired_layers)} layer(s) repaired; {self.seconds:.0f}s")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
class DualLambda:
    """Penalty weight by dual ascent: ``lambda <- max(0, lambda + eta * (C / B - 1))``."""

    def __init__(self, eta: float, value: float = 0.0) -> None:
        self.eta = float(eta)
        self.value = max(0.0, float(value))

    def update(self, cost: float, budget: float) -> float:
        """One step on the constraint gap; returns the new ``lambda``."""
        self.value = max(0.0, self.value + self.eta * (cost / budget - 1.0))
        return self.value


def lr_factor(schedule: str, step: int, steps_per_epoch: int, epochs: int, step_size: int,
              warmup_epochs: float = 0.0) -> float:
    """Multiplier of the base learning rates at global ``step``."""
    total = max(1, epochs * steps_per_epoch)
    warm = int(warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        return 0.1 ** ((step // max(1, steps_per_epoch)) // max(1, step_size))
    return 1.0


def _prepare_run_dir(cfg: SearchConfig) -> Path:
    run_dir = Path(cfg.out) if cfg.out else default_run_dir("search", cfg.method, cfg.model,
                                                             cfg.data.name)
    return prepare_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                           resume_file="config.yaml", subdirs=("teacher",),
                           artifacts=("search.csv", "alpha.json", "log.txt", "last.safetensors",
                                      "last.json", "policy.json", "config.yaml"))


def _append_csv(path: Path, row: Mapping[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _read_csv(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Rows of finished epochs (a row of an epoch after ``upto_epoch`` is dropped)."""
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= upto_epoch]
    with path.open("w", newline="") as f:  # drop rows of an epoch the checkpoint lacks
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


def _weights_init(cfg: SearchConfig, model: nn.Module, dataset: str) -> str:
    path = resolve_weights(cfg, dataset)  # type: ignore[arg-type]
    if path is None:
        return "random"
    tensors, _ = read_checkpoint(path)
    load_model_state(model, tensors, str(path))
    return f"fp:{path}"


def _single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("mpqkit search runs in one process (the proxy set is small): launch it "
                          "without torchrun")


# ----------------------------------------------------------------------------------------------
# the public entry point
# ----------------------------------------------------------------------------------------------
def build_context(cfg: SearchConfig, run_dir: str | Path, *,
                  bilevel_split: bool = True) -> SearchContext:
    """Proxy data, model (FP weights loaded if any), layer infos and the checked budget.

    Raises :class:`~mpqkit.errors.BudgetError` (with the achievable range) for a budget no
    policy can meet, before any training.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data_cfg = cfg.data
    if cfg.bilevel and bilevel_split and not data_cfg.val_split:
        data_cfg = DataConfig(**{**to_dict(data_cfg), "val_split": cfg.val_fraction})
    data = build_data(data_cfg)
    num_classes = cfg.num_classes or data.num_classes
    model = build_model(cfg.model, num_classes=num_classes)
    weights_init = _weights_init(cfg, model, data.name)
    input_size = normalize_input_size(cfg.input_size or data.input_size)
    infos = profile_model(model, input_size)
    fb = first_last_bits(cfg.first_last)
    fixed_names = first_last_layers(infos) if fb is not None else []
    fixed_bits = {n: fb for n in fixed_names} if fb is not None else {}
    searchable = [n for n in infos if n not in fixed_bits]
    wc, ac = tuple(cfg.w_bits), tuple(cfg.a_bits)
    budget = parse_budget(bitops=cfg.budget_bitops, uniform=cfg.budget,
                          size_mb=cfg.budget_size_mb, infos=infos, fixed_bits=fixed_bits,
                          searchable=searchable)
    check_feasible(budget, infos, searchable, fixed_bits, wc, ac, cfg.tol)
    model.to(device)
    return SearchContext(cfg, model, data, device, input_size, infos, searchable, fixed_bits,
                         wc, ac, budget, Path(run_dir), weights_init, num_classes)


def search(cfg: SearchConfig) -> SearchResult:
    """Search a policy with ``cfg.method`` under the budget; writes the run folder."""
    _single_process()
    entry = get_method(cfg.method)
    run_dir = _prepare_run_dir(cfg)
    if cfg.resume:  # the run folder's config is authoritative; more epochs may be asked for
        saved = load_search_config(run_dir / "config.yaml")
        if cfg.epochs != saved.epochs:
            saved.epochs = cfg.epochs
        saved.resume, saved.out, saved.device, saved.progress = (True, str(run_dir), cfg.device,
                                                                 cfg.progress)
        cfg = saved
        entry = get_method(cfg.method)
    setup_logging(run_dir, True)
    t_start = time.time()
    ctx = build_context(cfg, run_dir, bilevel_split=entry.is_supernet)
    write_yaml(cfg, run_dir / "config.yaml")
    h, w = ctx.input_size
    log.info(f"search {cfg.method}: {cfg.model} on {ctx.data.description}; budget "
             f"{ctx.budget.describe()} at {h}x{w}; {len(ctx.searchable)} searchable layers, "
             f"first/last {cfg.first_last}; weights {ctx.weights_init}; run folder {run_dir}")
    if entry.is_supernet:
        result = _run_supernet(ctx, type(entry.impl)())  # a fresh instance per search
    else:
        result = _run_policy_method(ctx, entry, t_start)
    log.info(f"done: {result.summary()}")
    return result


def _common_provenance(ctx: SearchContext) -> dict[str, Any]:
    cfg = ctx.cfg
    return {"method": cfg.method, "proxy_data": ctx.data.description,
            "dataset": ctx.data.name, "subset": cfg.data.subset, "seed": cfg.seed,
            "weights_init": ctx.weights_init, "budget": ctx.budget.to_dict(),
            "first_last": cfg.first_last, "quant": to_dict(cfg.quant),
            "run_dir": str(ctx.run_dir)}


def _repair(ctx: SearchContext, bits: Mapping[str, tuple[int, int]],
            order: list[str] | None) -> tuple[dict[str, tuple[int, int]], list[str]]:
    fixed = {n: tuple(ctx.fixed_bits[n]) for n in ctx.fixed_bits}
    start = {n: (fixed[n] if n in fixed else tuple(bits[n])) for n in ctx.infos}
    out = repair(start, ctx.infos, ctx.budget, ctx.w_candidates, ctx.a_candidates,
                 ctx.searchable, order=order, tol=ctx.cfg.tol)
    changed = [n for n in ctx.infos if tuple(out[n]) != tuple(start[n])]
    return {n: (int(w), int(a)) for n, (w, a) in out.items()}, changed


def _run_policy_method(ctx: SearchContext, entry: MethodEntry, t_start: float) -> SearchResult:
    t0 = time.time()
    out = entry.impl(ctx)  # type: ignore[operator]
    seconds = time.time() - t0
    do_repair = True
    if isinstance(out, Policy):
        bits, extra = out.bits(), dict(out.provenance)
    elif isinstance(out, MethodResult):
        bits, extra, do_repair = dict(out.bits), dict(out.provenance), out.repair
    else:
        raise TypeError(f"search method {entry.name!r} returned {type(out).__name__}; "
                        "expected a Policy or a MethodResult")
    bits = {n: (int(w), int(a)) for n, (w, a) in bits.items()}
    if do_repair:
        final, changed = _repair(ctx, bits, None)
        repair_rec: dict[str, Any] = {
            "changed_layers": changed,
            "cost_before": policy_cost(ctx.infos, bits, ctx.budget.kind),
            "cost_after": policy_cost(ctx.infos, final, ctx.budget.kind)}
    else:
        final, changed = bits, []
        repair_rec = {"skipped": True, "cost": policy_cost(ctx.infos, bits, ctx.budget.kind)}
    prov = _common_provenance(ctx)
    prov.update({k: v for k, v in extra.items() if k not in ("tool", "created")})
    prov.update({"method": ctx.cfg.method, "wall_time_s": round(seconds, 3),
                 "repair": repair_rec})
    policy = ctx.policy(final, prov)
    policy.save(ctx.run_dir / "policy.json")
    return SearchResult(policy, ctx.run_dir, ctx.cfg.method, ctx.budget, time.time() - t_start,
                        [], bits, changed)


# ----------------------------------------------------------------------------------------------
# the supernet loop
# ----------------------------------------------------------------------------------------------
@dataclass
class _Counters:
    steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    images_processed: int = 0
    calibration_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _param_groups(cfg: SearchConfig, sn: Supernet) -> list[dict[str, Any]]:
    weights = sn.weight_parameters()
    decay = [p for p in weights if p.ndim > 1]
    no_decay = [p for p in weights if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr_w, "base_lr": cfg.lr_w,
         "role": "weights", "perturb": True},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr_w, "base_lr": cfg.lr_w,
         "role": "weights", "perturb": True},
        {"params": sn.arch_parameters(), "weight_decay": cfg.alpha_weight_decay,
         "lr": cfg.lr_alpha, "base_lr": cfg.lr_alpha, "role": "arch",
         "perturb": cfg.perturb_logits},
    ]
    return [g for g in groups if g["params"]]


def _cycle(make: Callable[[int], Any]) -> Iterator[Any]:
    epoch = 0
    while True:
        got = False
        for b in make(epoch):
            got = True
            yield b
        if not got:
            return
        epoch += 1


class SupernetSearch:
    """The state of one supernet search and its step: supernet, optimizer, lambda, counters.

    ``step(x, y)`` is one single-level step (weights and logits on the same batch; ASGA's two
    passes when the method says so); ``step(x, y, xv, yv)`` one bi-level step (weights on
    ``(x, y)`` with the logits frozen, then the logits on the held-out ``(xv, yv)`` with the
    weights frozen, first-order). The complexity penalty ``lambda * C / B`` reaches the logits
    once per step, and ``lambda`` is updated from the expected cost ``C`` of the step.
    """

    def __init__(self, ctx: SearchContext, method: SupernetMethod) -> None:
        cfg = ctx.cfg
        self.ctx, self.method = ctx, method
        self.kind, self.budget_value = ctx.budget.kind, ctx.budget.value
        self.supernet = build_supernet(ctx.model, ctx.input_size, w_bits=ctx.w_candidates,
                                       a_bits=ctx.a_candidates, first_last=cfg.first_last,
                                       quant=cfg.quant, model_name=cfg.model,
                                       infos=ctx.infos).to(ctx.device)
        self.base = torch.optim.SGD(_param_groups(cfg, self.supernet), lr=cfg.lr_w,
                                    momentum=cfg.momentum,
                                    nesterov=cfg.nesterov and cfg.momentum > 0)
        self.asga: ASGA | None = None
        if method.optimizer == "asga":
            self.asga = ASGA(self.base, rho0=cfg.rho0, rho_max=cfg.rho_max, rho_min=cfg.rho_min,
                             gamma=cfg.gamma, adaptive=cfg.adaptive, h_ema=cfg.h_ema,
                             model=self.supernet)
        self.dual = DualLambda(cfg.lambda_lr, cfg.lambda_init)
        self.counters = _Counters()
        self._arch = self.supernet.arch_parameters()
        self._weights = self.supernet.weight_parameters()

    # -- state ----------------------------------------------------------------------------------
    def set_lr_factor(self, f: float) -> None:
        for g in self.base.param_groups:
            g["lr"] = g["base_lr"] * f

    def extra_state(self, epoch: int) -> dict[str, Any]:
        st = {"epoch": epoch, "lambda": self.dual.value, "counters": self.counters.to_dict(),
              "method_counters": self.method.counters()}
        if self.asga is not None:
            st["asga"] = self.asga.state_dict()["sharpness_aware"]
        return st

    def load(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], source: str) -> int:
        """Restore a ``last`` checkpoint; returns the number of finished epochs."""
        load_model_state(self.supernet, tensors, source)
        restore_optimizer(self.base, tensors, meta)
        ex = meta.get("extra_state", {})
        self.dual.value = float(ex["lambda"])
        self.counters = _Counters(**ex["counters"])
        if self.asga is not None and ex.get("asga"):
            self.asga.load_state_dict({**self.asga.state_dict(), "sharpness_aware": ex["asga"]})
        self.method.load_counters(ex.get("method_counters", {}))
        return int(ex["epoch"])

    # -- the step -------------------------------------------------------------------------------
    def _penalty(self) -> float:
        c = self.supernet.expected_complexity(self.kind)
        (c * (self.dual.value / self.budget_value)).float().backward()
        return float(c.detach())

    def _cost(self) -> float:
        with torch.no_grad():
            return float(self.supernet.expected_complexity(self.kind))

    def _count(self, passes: int, n: int) -> None:
        self.counters.forward_passes += passes
        self.counters.backward_passes += passes
        self.counters.images_processed += passes * n

    def _weight_step(self, x: Tensor, y: Tensor,
                     penalty: bool) -> tuple[Tensor, Tensor, dict[str, float], float]:
        sn, method, ctx = self.supernet, self.method, self.ctx
        self.base.zero_grad(set_to_none=True)
        asga = self.asga
        if asga is None:
            loss, logits, extras = method.loss(ctx, sn, x, y)
            loss.backward()
            cost = self._penalty() if penalty else self._cost()
            self.base.step()
            self._count(1, int(x.shape[0]))
            return loss, logits, extras, cost
        with asga.first_pass_context(sn):
            loss, logits, extras = method.loss(ctx, sn, x, y)
            loss.backward()
        asga.first_step(loss)
        try:
            with asga.second_pass(sn):
                loss_adv, _, _ = method.loss(ctx, sn, x, y)
                loss_adv.backward()
        except BaseException:
            asga.cancel_step()
            raise
        held: dict[str, float] = {}

        def before_update() -> None:
            if penalty:
                held["cost"] = self._penalty()

        stats = asga.second_step(loss_adv, before_update=before_update)
        extras = {**extras, "rho": stats["rho"], "h": stats["h"], "cos": stats["cos_g_gadv"]}
        self._count(2, int(x.shape[0]))
        return loss, logits, extras, held["cost"] if penalty else self._cost()

    def _arch_step(self, x: Tensor, y: Tensor) -> float:
        sn = self.supernet
        for p in self._weights:
            p.requires_grad_(False)
        try:
            self.base.zero_grad(set_to_none=True)
            with frozen_bn_stats(sn):
                loss, _, _ = self.method.loss(self.ctx, sn, x, y)
            loss.backward()
            cost = self._penalty()
            self.base.step()
        finally:
            for p in self._weights:
                p.requires_grad_(True)
        self._count(1, int(x.shape[0]))
        return cost

    def step(self, x: Tensor, y: Tensor, xv: Tensor | None = None,
             yv: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, float], float]:
        """One search step; returns the loss and logits of the first pass, extras, and C."""
        if xv is None:
            loss, logits, extras, cost = self._weight_step(x, y, penalty=True)
        else:
            for p in self._arch:
                p.requires_grad_(False)
            try:
                loss, logits, extras, _ = self._weight_step(x, y, penalty=False)
            finally:
                for p in self._arch:
                    p.requires_grad_(True)
            assert yv is not None
            cost = self._arch_step(xv, yv)
        if self.ctx.cfg.lambda_on == "argmax":
            control = policy_cost(self.ctx.infos, self.supernet.argmax_bits(), self.kind)
        else:
            control = cost
        self.dual.update(control, self.budget_value)
        self.counters.steps += 1
        return loss, logits, extras, cost


def _run_supernet(ctx: SearchContext, method: SupernetMethod) -> SearchResult:
    cfg, device, run_dir = ctx.cfg, ctx.device, ctx.run_dir
    kind = ctx.budget.kind
    run = SupernetSearch(ctx, method)
    sn = run.supernet
    start_epoch = 0
    history: list[dict[str, Any]] = []
    alpha_log: list[dict[str, Any]] = []
    ckpt = run_dir / "last.safetensors"
    if cfg.resume and ckpt.is_file():
        tensors, meta = read_checkpoint(ckpt)
        start_epoch = run.load(tensors, meta, str(ckpt))
        history = _read_csv(run_dir / "search.csv", start_epoch)
        if (run_dir / "alpha.json").is_file():
            alpha_log = [e for e in json.loads((run_dir / "alpha.json").read_text())["epochs"]
                         if e["epoch"] <= start_epoch]
        log.info(f"resumed {run_dir} after epoch {start_epoch} (lambda {run.dual.value:.4g})")
    elif cfg.resume:
        log.info(f"no finished epoch in {run_dir}: starting the search from the beginning")
        (run_dir / "search.csv").unlink(missing_ok=True)
    method_prov = method.setup(ctx, sn)
    setup_logging(run_dir, True)  # a method may have run another job (e.g. a teacher)
    if start_epoch == 0:
        calib = ctx.batches(cfg.calib_batches)
        x_cal = torch.cat([x for x, _ in calib])
        sn.calibrate(x_cal)
        run.counters.calibration_images += int(x_cal.shape[0])

    data = ctx.data
    bs, workers = cfg.data.batch_size, cfg.data.workers
    steps_per_epoch = len(make_loader(data.train, bs, train=True, seed=cfg.seed))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(f"the proxy set ({len(data.train)} images) gives no training batch of "
                          f"{bs}: lower --batch-size or use a larger --subset")
    if cfg.bilevel and (data.val is None or len(data.val) == 0):
        raise ConfigError("a bi-level search needs a held-out part of the proxy set: set "
                          "--val-fraction (e.g. 0.5) or data.val_split")
    log.info(f"{method.name}: {cfg.epochs} epoch(s) x {steps_per_epoch} steps, batch {bs}, "
             f"{'bi-level' if cfg.bilevel else 'single-level'}, optimizer "
             f"{'ASGA(SGD)' if run.asga else 'SGD'}; lambda by dual ascent on the "
             f"{cfg.lambda_on} cost (eta {cfg.lambda_lr})")

    t_resume = time.time()
    seconds_before = run.counters.seconds
    for epoch in range(start_epoch, cfg.epochs):
        sn.train()
        loader = make_loader(data.train, bs, train=True, seed=cfg.seed, epoch=epoch,
                             workers=workers)
        val_iter: Iterator[Any] | None = None
        if cfg.bilevel:
            val_iter = _cycle(lambda e, ep=epoch: make_loader(
                data.val, bs, train=True, seed=cfg.seed + 1, epoch=ep * 1000 + e,
                workers=workers))
        sums: dict[str, float] = {"loss": 0.0, "correct": 0.0, "n": 0.0}
        extra_sums: dict[str, list[float]] = {}
        t0 = time.time()
        images_before = run.counters.images_processed
        bar = tqdm(total=steps_per_epoch, desc=f"{method.name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or None, file=sys.stderr, dynamic_ncols=True,
                   leave=False)
        f = 1.0
        for step, (x, y) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            f = lr_factor(cfg.schedule, epoch * steps_per_epoch + step, steps_per_epoch,
                          cfg.epochs, cfg.step_size, cfg.warmup_epochs)
            run.set_lr_factor(f)
            xv = yv = None
            if val_iter is not None:
                xv, yv = (t.to(device, non_blocking=True) for t in next(val_iter))
            loss, logits, extras, cost = run.step(x, y, xv, yv)
            if not torch.isfinite(loss):
                raise ConfigError(f"the search loss became {loss.item()} at epoch {epoch + 1} "
                                  f"step {step}: lower the learning rates (--lr-w, --lr-alpha)")
            n = int(y.numel())
            sums["loss"] += float(loss.detach()) * n
            sums["correct"] += float((logits.detach().argmax(1) == y).sum())
            sums["n"] += n
            for k, v in extras.items():
                extra_sums.setdefault(k, []).append(float(v))
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}",
                            c=f"{cost / run.budget_value:.3f}", lam=f"{run.dual.value:.3g}")
        bar.close()
        dt = time.time() - t0
        run.counters.seconds = seconds_before + (time.time() - t_resume)
        row = _epoch_row(sn, ctx, epoch, run.counters, sums, extra_sums, run.dual.value,
                         cfg.lr_w * f, cfg.lr_alpha * f, dt,
                         run.counters.images_processed - images_before)
        history.append(row)
        alpha_log.append({"epoch": epoch + 1, "layers": sn.alpha_probs()})
        _append_csv(run_dir / "search.csv", row)
        atomic_write_text(run_dir / "alpha.json", json.dumps(
            {"w_candidates": list(ctx.w_candidates), "a_candidates": list(ctx.a_candidates),
             "epochs": alpha_log}, indent=1) + "\n")
        save_checkpoint(run_dir / "last", sn,
                        {"model": cfg.model, "num_classes": ctx.num_classes,
                         "input_size": list(ctx.input_size), "dataset": data.name,
                         "method": cfg.method, "epoch": epoch + 1, "metrics": row,
                         "kind": "supernet", "config": to_dict(cfg)},
                        run.base, run.extra_state(epoch + 1))
        log.info(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} acc {row['acc']:.2f}% "
                 f"| expected {ctx.budget.format(row['expected_' + kind])} "
                 f"({row['expected_ratio']:.3f} x budget), argmax "
                 f"{ctx.budget.format(row['argmax_' + kind])} | lambda {run.dual.value:.4g}"
                 + (f" | rho {row['rho']:.4f} h {row['h']:.4f} cos {row['cos']:.3f}"
                    if row.get("rho") is not None else "") + f" | {dt:.0f}s")

    # -- the policy -----------------------------------------------------------------------------
    counters = run.counters
    argmax = sn.argmax_bits()
    decided = sn.decidedness()
    order = sorted(decided, key=lambda n: decided[n])
    final, changed = _repair(ctx, argmax, order)
    prov = _common_provenance(ctx)
    prov.update({
        "epochs": cfg.epochs, "steps": counters.steps,
        "level": "bi-level (first-order), logits on a held-out "
                 f"{cfg.val_fraction:g} of the proxy set" if cfg.bilevel else "single-level",
        "wall_time_s": round(counters.seconds, 3),
        "search_cost": {**counters.to_dict(), **method.counters(),
                        "seconds": round(counters.seconds, 3)},
        "optimizer": _optimizer_record(cfg, run.asga is not None),
        "dual": {"eta": cfg.lambda_lr, "on": cfg.lambda_on, "lambda_final": run.dual.value},
        "decidedness_mean": (sum(decided.values()) / len(decided)) if decided else 1.0,
        "argmax_bits": {n: list(b) for n, b in argmax.items()},
        "repair": {"changed_layers": changed,
                   "cost_before": policy_cost(ctx.infos, argmax, kind),
                   "cost_after": policy_cost(ctx.infos, final, kind)},
        **method_prov,
    })
    policy = sn.policy(final, provenance=prov, budget=ctx.budget.to_dict())
    policy.save(run_dir / "policy.json")
    return SearchResult(policy, run_dir, cfg.method, ctx.budget, counters.seconds, history,
                        argmax, changed)


def _optimizer_record(cfg: SearchConfig, asga: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {"base": "SGD", "lr_w": cfg.lr_w, "lr_alpha": cfg.lr_alpha,
                           "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                           "schedule": cfg.schedule, "batch_size": cfg.data.batch_size}
    if cfg.schedule == "step":
        rec["step_size"] = cfg.step_size
    if asga:
        rec.update(sharpness="ASGA", rho0=cfg.rho0, rho_max=cfg.rho_max, rho_min=cfg.rho_min,
                   gamma=cfg.gamma, adaptive=cfg.adaptive, h_ema=cfg.h_ema,
                   perturb_logits=cfg.perturb_logits)
    return rec


def _epoch_row(sn: Supernet, ctx: SearchContext, epoch: int, counters: _Counters,
               sums: Mapping[str, float], extra_sums: Mapping[str, list[float]], lam: float,
               lr_w: float, lr_a: float, dt: float, images: int) -> dict[str, Any]:
    n = max(sums["n"], 1.0)
    with torch.no_grad():
        eb = float(sn.expected_complexity("bitops"))
        es = float(sn.expected_complexity("size_mb"))
    argmax = sn.argmax_bits()
    decided = sn.decidedness()

    def mean(k: str) -> float | None:
        v = extra_sums.get(k)
        return sum(v) / len(v) if v else None

    expected = eb if ctx.budget.kind == "bitops" else es
    return {
        "epoch": epoch + 1, "steps": counters.steps, "lr_w": lr_w, "lr_alpha": lr_a,
        "loss": sums["loss"] / n, "acc": 100.0 * sums["correct"] / n,
        "task_loss": mean("task_loss"), "extra_loss": mean("extra_loss"),
        "expected_bitops": eb, "expected_size_mb": es,
        "expected_ratio": expected / ctx.budget.value,
        "argmax_bitops": policy_cost(ctx.infos, argmax, "bitops"),
        "argmax_size_mb": policy_cost(ctx.infos, argmax, "size_mb"),
        "lambda": lam, "rho": mean("rho"), "h": mean("h"), "cos": mean("cos"),
        "decidedness": (sum(decided.values()) / len(decided)) if decided else 1.0,
        "epoch_seconds": round(dt, 3), "images_per_s": round(images / max(dt, 1e-9), 1),
    }
