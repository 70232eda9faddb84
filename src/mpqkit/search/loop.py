"""The policy search: :func:`search` and the supernet loop every supernet method shares.

``search(cfg)`` opens the run folder (:class:`mpqkit.engine.run.Run`), builds the proxy data and
the model, states the budget (refusing an infeasible one before any training), and runs the
method registered under ``cfg.method`` (:mod:`mpqkit.search.registry`):

* a supernet method (a :class:`~mpqkit.search.context.SupernetMethod` subclass: ``asga``,
  ``edmips``, ``gmpq``, ``seam``) trains the :class:`~mpqkit.search.supernet.Supernet` through
  the engine's epoch loop (:func:`mpqkit.engine.run.fit`) with :class:`SupernetSearch`'s step;
* a policy method (a function: ``hawq``, ``uniform``, ``random``) returns bits.

Budget targeting (no hand-tuned penalty weight): the loss is ``task + lambda * C(alpha) / B``
and ``lambda`` follows a dual (Lagrange) ascent every step on the argmax policy's cost C
(:func:`dual_lambda`): by default ``lambda <- max(0, lambda + eta * (C / (0.95 B) - 1))``,
back to 0 as soon as ``C <= 0.95 B`` (``dual="reset"``); ``dual="inequality"`` aims at ``B``
without the reset, ``dual="equality"`` at ``(1 - tol/2) B`` with lambda free. The argmax
policy is finally repaired into ``[(1 - tol) B, B]`` by :func:`mpqkit.search.budget.repair`,
changing as few layers as it can, least decided layers first.

A run folder holds ``config.yaml``, ``policy.json``, ``search.csv`` (per epoch), ``alpha.json``
(per-epoch softmax of every layer's logits), ``log.txt`` and ``last.safetensors``/``last.json``
(the supernet, optimizer, lambda and counters, every epoch and every ``save_every_min``
minutes: ``resume=True`` continues a killed search from there).

Under ``torchrun`` (supernet methods; the policy methods run in one process) every rank takes a
disjoint share of every batch (``--batch-size`` is per process, as in training), calibrates on
the same global batches, averages the gradients of the weights and the logits after every
backward (:func:`mpqkit.engine.distributed.average_gradients`; ASGA's wrapper averages its own
pass-1 gradients and losses), and normalizes with the global batch's BatchNorm statistics
(:func:`~mpqkit.engine.distributed.synced_batchnorm`): the logits, hence lambda, stay identical
on every rank, and N processes with batch B search as one process with batch N * B (up to
rounding). Only rank 0 prints and writes; a resume needs the same number of processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mpqkit.complexity import policy_cost
from mpqkit.data import make_loader
from mpqkit.engine.checkpoint import load_model_state, register_checkpoint_builder
from mpqkit.engine.config import from_dict, to_dict
from mpqkit.engine.distributed import (
    average_gradients,
    broadcast_module,
    synced_batchnorm,
    world_info,
)
from mpqkit.engine.run import (
    EpochStats,
    LoopState,
    Run,
    RunFiles,
    StepOut,
    fit,
    log,
    resume,
    setup_logging,
)
from mpqkit.errors import ConfigError
from mpqkit.models import build_model
from mpqkit.optim.bn import frozen_bn_stats
from mpqkit.optim.factory import OptimizerSet, StepSchedule, create_optimizer, param_groups
from mpqkit.policy import Policy
from mpqkit.quant.quantizers import compile_in_place
from mpqkit.runio import atomic_write_text
from mpqkit.search.config import SearchConfig
from mpqkit.search.context import (
    MethodResult,
    Provenance,
    SearchContext,
    SearchResult,
    SupernetMethod,
    build_context,
)
from mpqkit.search.registry import MethodSpec, get_method
from mpqkit.search.supernet import Supernet, build_supernet

CSV_FIELDS = ("epoch", "steps", "lr_w", "lr_alpha", "loss", "acc", "task_loss", "extra_loss",
              "expected_bitops", "expected_size_mb", "expected_ratio", "argmax_bitops",
              "argmax_size_mb", "lambda", "rho", "h", "cos", "decidedness", "epoch_seconds",
              "images_per_s", "argmax_ratio", "top1_prob", "entropy")
FILES = RunFiles("search", "search.csv", CSV_FIELDS,
                 artifacts=("search.csv", "alpha.json", "log.txt", "last.safetensors",
                            "last.json", "policy.json", "config.yaml", "hawq_traces.json",
                            "hawq_sensitivity.json"),
                 subdirs=("teacher", "fp"), resume_file="config.yaml",
                 keep_on_resume=("device", "progress", "epochs"))


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


register_checkpoint_builder("supernet", supernet_from_checkpoint)


class DualLambda:
    """Penalty weight by dual ascent: ``lambda <- lambda + eta * (C / (target B) - 1)``.

    ``lower=0`` (the inequality ``C <= B``): lambda stays >= 0, so below the budget only the task
    loss moves the logits. ``lower=None`` (the equality ``C = target B``): lambda may turn
    negative and pull the cost up to the target as well. ``reset=True`` (with ``lower=0``):
    lambda drops back to 0 as soon as ``C <= target B``, so a multiplier wound up by an
    overshoot does not keep pushing the cost far below the target afterwards. ``kp > 0`` adds
    a proportional term, ``lambda = integral + kp * max(0, gap)``: an excess is answered at
    once instead of after the integral has grown (a PI controller).
    """

    def __init__(self, eta: float, value: float = 0.0, *, lower: float | None = 0.0,
                 target: float = 1.0, reset: bool = False, kp: float = 0.0) -> None:
        if reset and lower is None:
            raise ValueError("reset needs a lower bound for lambda")
        self.eta, self.lower, self.target = float(eta), lower, float(target)
        self.reset, self.kp = reset, float(kp)
        self.integral = self._clamp(float(value))
        self.value = self.integral

    def _clamp(self, v: float) -> float:
        return v if self.lower is None else max(self.lower, v)

    def update(self, cost: float, budget: float) -> float:
        """One step on the constraint gap; returns the new ``lambda``."""
        gap = cost / (self.target * budget) - 1.0
        if self.reset and gap <= 0:
            self.integral = float(self.lower)  # type: ignore[arg-type]
        else:
            self.integral = self._clamp(self.integral + self.eta * gap)
        self.value = self.integral + self.kp * max(0.0, gap)
        return self.value

    def state(self) -> dict[str, float]:
        return {"lambda": self.value, "lambda_integral": self.integral}

    def load_state(self, st: Mapping[str, Any]) -> None:
        self.value = float(st["lambda"])
        self.integral = float(st.get("lambda_integral", self.value))


def dual_lambda(cfg: SearchConfig) -> DualLambda:
    """The multiplier ``cfg.dual`` names, aimed at ``cfg.lambda_target`` x budget, by default:
    ``reset`` at 0.95 (the argmax hovers around it and stays under the budget), ``equality``
    at the middle of the repair band ``[(1 - tol) B, B]``, ``inequality`` at ``B``."""
    t = cfg.lambda_target
    if cfg.dual == "equality":
        return DualLambda(cfg.lambda_lr, cfg.lambda_init, lower=None,
                          target=1.0 - cfg.tol / 2 if t is None else t)
    if cfg.dual == "reset":
        return DualLambda(cfg.lambda_lr, cfg.lambda_init, target=0.95 if t is None else t,
                          reset=True, kp=cfg.lambda_kp)
    return DualLambda(cfg.lambda_lr, cfg.lambda_init, target=1.0 if t is None else t,
                      kp=cfg.lambda_kp)


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


class SupernetSearch:
    """The state of one supernet search and its step: supernet, optimizer, lambda, counters.

    ``step(x, y)`` is one single-level step (weights and logits on the same batch; the
    sharpness-aware wrapper's two passes when the method or ``cfg.optim`` asks for one);
    ``step(x, y, xv, yv)`` one bi-level step (weights on ``(x, y)`` with the logits frozen, then
    the logits on the held-out ``(xv, yv)`` with the weights frozen, first-order). The
    complexity penalty ``lambda * C / B`` reaches the logits once per step.
    """

    def __init__(self, ctx: SearchContext, method: SupernetMethod) -> None:
        cfg = ctx.cfg
        self.ctx, self.method = ctx, method
        self.kind, self.budget_value = ctx.budget.kind, ctx.budget.value
        self.supernet = build_supernet(ctx.model, ctx.input_size, w_bits=ctx.w_candidates,
                                       a_bits=ctx.a_candidates, first_last=cfg.first_last,
                                       quant=cfg.quant, model_name=cfg.model,
                                       infos=ctx.infos).to(ctx.device)
        self.optim_cfg = cfg.optim
        if method.sharpness is not None:
            self.optim_cfg = dataclasses.replace(cfg.optim, sharpness=method.sharpness)
        arch = {"params": self.supernet.arch_parameters(), "weight_decay": cfg.alpha_weight_decay,
                "lr": cfg.lr_alpha, "base_lr": cfg.lr_alpha, "role": "arch", "perturb": False,
                **method.param_group_options(ctx)}
        groups = param_groups(self.supernet.weight_parameters(), cfg.optim.lr,
                              cfg.optim.weight_decay, role="weights", perturb=True)
        self.arch_opt: torch.optim.Optimizer | None = None
        if cfg.arch_optimizer == "adam":
            if arch["perturb"]:
                raise ConfigError("perturb_logits needs the logits in the weights' optimizer: "
                                  "use --arch-optimizer sgd, or drop --perturb-logits")
            self.arch_opt = torch.optim.Adam([arch], lr=cfg.lr_alpha,
                                             betas=tuple(cfg.arch_betas))  # type: ignore[arg-type]
        else:
            groups.append(arch)
        self.base, self.asga = create_optimizer(groups, self.optim_cfg, self.supernet)
        self.optimizers = OptimizerSet(self.base, *([self.arch_opt] if self.arch_opt else []))
        self.arch_frozen = False
        self.dual = dual_lambda(cfg)
        self.counters = _Counters()
        self._arch = self.supernet.arch_parameters()
        self._weights = self.supernet.weight_parameters()
        self.world_size = world_info().world_size

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        st = {**self.dual.state(), "counters": self.counters.to_dict(),
              "method_counters": self.method.counters()}
        if self.asga is not None:
            st["asga"] = self.asga.state_dict()["sharpness_aware"]
        return st

    def load_extra_state(self, ex: Mapping[str, Any]) -> None:
        self.dual.load_state(ex)
        self.counters = _Counters(**ex["counters"])
        if self.asga is not None and ex.get("asga"):
            self.asga.load_state_dict({**self.asga.state_dict(), "sharpness_aware": ex["asga"]})
        self.method.load_counters(ex.get("method_counters", {}))

    # -- the step -------------------------------------------------------------------------------
    def _penalty(self) -> float:
        if self.arch_frozen:
            for p in self._arch:
                p.grad = None
            return self._cost()
        c = self.supernet.expected_complexity(self.kind)
        (c * (self.dual.value / self.budget_value)).float().backward()
        return float(c.detach())

    def _arch_update(self) -> None:
        if self.arch_opt is not None and not self.arch_frozen:
            self.arch_opt.step()

    def _cost(self) -> float:
        with torch.no_grad():
            return float(self.supernet.expected_complexity(self.kind))

    def _count(self, passes: int, n: int) -> None:
        self.counters.forward_passes += passes
        self.counters.backward_passes += passes
        self.counters.images_processed += passes * n * self.world_size

    def _weight_step(self, x: Tensor, y: Tensor,
                     penalty: bool) -> tuple[Tensor, Tensor, dict[str, float], float]:
        sn, method, ctx = self.supernet, self.method, self.ctx
        self.optimizers.zero_grad(set_to_none=True)
        sharp = self.asga
        if sharp is None:
            loss, logits, extras = method.loss(ctx, sn, x, y)
            loss.backward()
            average_gradients(sn.parameters())
            cost = self._penalty() if penalty else self._cost()
            self.base.step()
            self._arch_update()
            self._count(1, int(x.shape[0]))
            return loss, logits, extras, cost
        with sharp.first_pass_context(sn):
            loss, logits, extras = method.loss(ctx, sn, x, y)
            loss.backward()
        sharp.first_step(loss)
        arch_g = self._take_arch_grads()
        try:
            with sharp.second_pass(sn):
                loss_adv, _, _ = method.loss(ctx, sn, x, y)
                loss_adv.backward()
            average_gradients(sn.parameters())  # pass 2 (the wrapper averages pass 1)
        except BaseException:
            sharp.cancel_step()
            raise
        held: dict[str, float] = {}

        def before_update() -> None:
            self._combine_arch_grads(arch_g, sharp.update)
            if penalty:
                held["cost"] = self._penalty()

        stats = sharp.second_step(loss_adv, before_update=before_update)
        if not stats.get("skipped"):  # a step with non-finite grads moves nothing
            self._arch_update()
        extras = {**extras, "rho": stats["rho"], "h": stats["h"], "cos": stats["cos_g_gadv"]}
        self._count(2, int(x.shape[0]))
        return loss, logits, extras, held["cost"] if penalty else self._cost()

    def _take_arch_grads(self) -> list[Tensor | None] | None:
        """Pass-1 gradients of the logits when they have their own optimizer (then cleared)."""
        if self.arch_opt is None:
            return None
        average_gradients(self._arch)  # outside the wrapper, which averages its own
        grads = [p.grad for p in self._arch]
        for p in self._arch:
            p.grad = None
        return grads

    def _combine_arch_grads(self, first: list[Tensor | None] | None, update: str) -> None:
        """The logits' update direction: ``(g + g_adv) / 2`` for ``mean``, else ``g_adv``."""
        if first is None or update != "mean":
            return
        for p, g in zip(self._arch, first, strict=True):
            if g is not None and p.grad is not None:
                p.grad.add_(g).mul_(0.5)

    def _arch_step(self, x: Tensor, y: Tensor) -> float:
        sn = self.supernet
        for p in self._weights:
            p.requires_grad_(False)
        try:
            self.optimizers.zero_grad(set_to_none=True)
            with frozen_bn_stats(sn):
                loss, _, _ = self.method.loss(self.ctx, sn, x, y)
            loss.backward()
            average_gradients(self._arch)
            cost = self._penalty()
            self.base.step()
            self._arch_update()
        finally:
            for p in self._weights:
                p.requires_grad_(True)
        self._count(1, int(x.shape[0]))
        return cost

    def step(self, x: Tensor, y: Tensor, xv: Tensor | None = None,
             yv: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, float], float]:
        """One search step; returns the loss and logits of the first pass, extras, and C."""
        if xv is None or yv is None:
            loss, logits, extras, cost = self._weight_step(x, y, penalty=True)
        else:
            for p in self._arch:
                p.requires_grad_(False)
            try:
                loss, logits, extras, _ = self._weight_step(x, y, penalty=False)
            finally:
                for p in self._arch:
                    p.requires_grad_(True)
            cost = self._arch_step(xv, yv)
        if self.ctx.cfg.lambda_on == "argmax":
            control = policy_cost(self.ctx.infos, self.supernet.argmax_bits(), self.kind)
        else:
            control = cost
        if not self.arch_frozen:
            self.dual.update(control, self.budget_value)
        self.counters.steps += 1
        return loss, logits, extras, cost


def _skip(it: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        next(it, None)
    return it


def _cycle(make: Any) -> Iterator[Any]:
    """Batches of ``make(0)``, then ``make(1)``, ... (stops if one is empty)."""
    epoch = 0
    while True:
        got = False
        for b in make(epoch):
            got = True
            yield b
        if not got:
            return
        epoch += 1


class _SearchTask:
    """A supernet search as a task of :func:`mpqkit.engine.run.fit`."""

    nonfinite_hint = "lower the learning rates (--lr, --lr-alpha)"

    def __init__(self, run: Run, ctx: SearchContext, search: SupernetSearch,
                 steps_per_epoch: int) -> None:
        self.run, self.ctx, self.search = run, ctx, search
        self.name = search.method.name
        self.model, self.optimizer = search.supernet, search.optimizers
        cfg = ctx.cfg
        self.schedule = StepSchedule.from_config(search.optimizers, cfg.optim, epochs=cfg.epochs,
                                                 steps_per_epoch=steps_per_epoch)
        self.alpha_log: list[dict[str, Any]] = []
        self._val: Iterator[Any] | None = None
        self._cost = 0.0
        self._t0: float | None = None
        self._seconds_before = 0.0
        self._images_before = 0

    def read_alpha(self, upto: int) -> list[dict[str, Any]]:
        """The ``alpha.json`` entries of the first ``upto`` epochs."""
        path = self.run.dir / "alpha.json"
        if upto == 0 or not path.is_file():
            return []
        return [e for e in json.loads(path.read_text())["epochs"] if e["epoch"] <= upto]

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        cfg, dev, data = self.ctx.cfg, self.ctx.device, self.ctx.data
        if self._t0 is None:
            self._t0, self._seconds_before = time.time(), self.search.counters.seconds
        self._images_before = self.search.counters.images_processed
        self.search.arch_frozen = epoch < cfg.arch_warmup_epochs
        self.model.train()
        bs, workers = cfg.data.batch_size, cfg.data.workers
        if cfg.bilevel:
            self._val = _skip(_cycle(lambda e: make_loader(
                data.val, bs, train=True, seed=cfg.seed + 1, epoch=epoch * 1000 + e,
                workers=workers)), start)
        for x, y in make_loader(data.train, bs, train=True, seed=cfg.seed, epoch=epoch,
                                start_batch=start, workers=workers):
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def step(self, x: Tensor, y: Tensor) -> StepOut:
        xv = yv = None
        if self._val is not None:
            xv, yv = (t.to(self.ctx.device, non_blocking=True) for t in next(self._val))
        loss, logits, extras, self._cost = self.search.step(x, y, xv, yv)
        return StepOut(loss, logits, extras)

    def epoch_row(self, st: EpochStats) -> dict[str, Any]:
        s, ctx, cfg = self.search, self.ctx, self.ctx.cfg
        assert self._t0 is not None
        s.counters.seconds = self._seconds_before + (time.time() - self._t0)
        sn = s.supernet
        with torch.no_grad():
            eb = float(sn.expected_complexity("bitops"))
            es = float(sn.expected_complexity("size_mb"))
        argmax, stats = sn.argmax_bits(), sn.decision_stats()
        images = s.counters.images_processed - self._images_before
        row = {"epoch": st.epoch, "steps": s.counters.steps,
               "lr_w": cfg.optim.lr * st.lr_factor, "lr_alpha": cfg.lr_alpha * st.lr_factor,
               "loss": st.loss, "acc": st.acc, "task_loss": st.extras.get("task_loss"),
               "extra_loss": st.extras.get("extra_loss"), "expected_bitops": eb,
               "expected_size_mb": es,
               "expected_ratio": (eb if ctx.budget.kind == "bitops" else es) / ctx.budget.value,
               "argmax_bitops": policy_cost(ctx.infos, argmax, "bitops"),
               "argmax_size_mb": policy_cost(ctx.infos, argmax, "size_mb"),
               "lambda": s.dual.value, "rho": st.extras.get("rho"), "h": st.extras.get("h"),
               "cos": st.extras.get("cos"),
               "decidedness": stats["margin"], "epoch_seconds": round(st.seconds, 3),
               "images_per_s": round(images / max(st.seconds, 1e-9), 1),
               "argmax_ratio": policy_cost(ctx.infos, argmax, ctx.budget.kind) / ctx.budget.value,
               "top1_prob": stats["top1_prob"], "entropy": stats["entropy"]}
        self._write_alpha(st.epoch)
        return row

    def _write_alpha(self, epoch: int) -> None:
        self.alpha_log.append({"epoch": epoch, "layers": self.search.supernet.alpha_probs()})
        if not self.run.is_main:
            return
        atomic_write_text(self.run.dir / "alpha.json", json.dumps(
            {"w_candidates": list(self.ctx.w_candidates),
             "a_candidates": list(self.ctx.a_candidates), "epochs": self.alpha_log},
            indent=1) + "\n")

    def describe(self, row: Mapping[str, Any]) -> str:
        b, kind = self.ctx.budget, self.ctx.budget.kind
        return (f"loss {row['loss']:.4f} acc {row['acc']:.2f}% | expected "
                f"{b.format(row['expected_' + kind])} ({row['expected_ratio']:.3f} x budget), "
                f"argmax {b.format(row['argmax_' + kind])} ({row['argmax_ratio']:.3f} x budget)"
                f" | top-1 p {row['top1_prob']:.3f} | lambda {row['lambda']:.4g}"
                + (f" | rho {row['rho']:.4f} h {row['h']:.4f} cos {row['cos']:.3f}"
                   if row.get("rho") is not None else ""))

    def postfix(self) -> dict[str, str]:
        return {"c": f"{self._cost / self.search.budget_value:.3f}",
                "lam": f"{self.search.dual.value:.3g}"}

    def meta(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"model": ctx.cfg.model, "num_classes": ctx.num_classes,
                "input_size": list(ctx.input_size), "dataset": ctx.data.name,
                "method": ctx.cfg.method, "kind": "supernet", "config": to_dict(ctx.cfg)}

    def extra_state(self) -> dict[str, Any]:
        if self._t0 is not None:  # mid-epoch too: the time of a partial epoch counts
            self.search.counters.seconds = self._seconds_before + (time.time() - self._t0)
        world = self.search.world_size
        return {**self.search.extra_state(), **({"world_size": world} if world > 1 else {})}

    def load_extra_state(self, ex: Mapping[str, Any]) -> None:
        saved, world = int(ex.get("world_size", 1)), self.search.world_size
        if saved != world:  # the batches of an epoch (per process) depend on the world size
            raise ConfigError(f"{self.run.dir} was searched by {saved} process(es), this resume "
                              f"runs {world}: resume it with torchrun --nproc_per_node={saved}"
                              if saved > 1 else f"{self.run.dir} was searched by one process, "
                              f"this resume runs {world}: resume it without torchrun")
        self.search.load_extra_state(ex)


def _steps_per_epoch(ctx: SearchContext) -> int:
    cfg, data = ctx.cfg, ctx.data
    bs = cfg.data.batch_size
    steps = len(make_loader(data.train, bs, train=True, seed=cfg.seed))
    steps = min(steps, cfg.max_steps_per_epoch or steps)
    if steps < 1:
        raise ConfigError(f"the proxy set ({len(data.train)} images) gives no training batch of "
                          f"{bs}: lower --batch-size or use a larger --subset")
    if cfg.bilevel and (data.val is None or len(data.val) == 0):
        raise ConfigError("a bi-level search needs a held-out part of the proxy set: set "
                          "--val-fraction (e.g. 0.5) or data.val_split")
    return steps


def _start(run: Run, ctx: SearchContext, search: SupernetSearch, steps: int
           ) -> tuple[_SearchTask, LoopState, bool]:
    """The task and its state, resumed from ``last`` when there is one; and whether it was."""
    resumed = ctx.cfg.resume and run.has_last()
    if ctx.cfg.resume and not resumed:
        log.info(f"no finished epoch in {run.dir}: starting the search from the beginning")
    task = _SearchTask(run, ctx, search, steps)
    state = resume(run, task) if resumed else LoopState()
    task.alpha_log = task.read_alpha(state.epoch)
    return task, state, resumed


def _calibration_batch(ctx: SearchContext, world_size: int) -> Tensor:
    """The first ``calib_batches`` global batches of epoch 0: the same images on every rank,
    those one process with batch ``world_size * batch_size`` calibrates on."""
    cfg = ctx.cfg
    if world_size == 1:
        return torch.cat([x for x, _ in ctx.batches(cfg.calib_batches)])
    loader = make_loader(ctx.data.train, cfg.data.batch_size * world_size, train=True,
                         seed=cfg.seed, epoch=0, workers=cfg.data.workers, rank=0, world_size=1)
    xs = [x for x, _ in itertools.islice(loader, cfg.calib_batches)]
    return torch.cat(xs).to(ctx.device)


def _run_supernet(run: Run, ctx: SearchContext, method: SupernetMethod) -> SearchResult:
    cfg, world = ctx.cfg, run.world.world_size
    search = SupernetSearch(ctx, method)
    steps = _steps_per_epoch(ctx)
    task, state, resumed = _start(run, ctx, search, steps)
    method_prov = method.setup(ctx, search.supernet)
    setup_logging(run.dir, run.is_main)  # a method may have run another job (e.g. a teacher)
    if not resumed:
        x_cal = _calibration_batch(ctx, world)
        search.supernet.calibrate(x_cal)
        search.counters.calibration_images += int(x_cal.shape[0])
    broadcast_module(search.supernet)  # every rank starts from rank 0's state (a guard)
    if cfg.compile:  # in place: parameter names (checkpoints) unchanged
        compile_in_place(search.supernet.net)
    log.info(f"{method.name}: {cfg.epochs} epoch(s) x {steps} steps, batch "
             f"{cfg.data.batch_size}" + (f" x {world} processes" if world > 1 else "")
             + f", {'bi-level' if cfg.bilevel else 'single-level'}, "
             f"optimizer {search.optim_cfg.describe()}; lambda by dual ascent on the "
             f"{cfg.lambda_on} cost (eta {cfg.lambda_lr})")
    with synced_batchnorm(search.supernet):  # the global batch's statistics under torchrun
        history = fit(run, task, state, epochs=cfg.epochs, steps_per_epoch=steps,
                      save_every_min=cfg.save_every_min, progress=cfg.progress)
    sn, counters = search.supernet, search.counters
    argmax, decided = sn.argmax_bits(), sn.decidedness()
    final, repair_rec = ctx.repair(argmax, sorted(decided, key=lambda n: decided[n]))
    prov = Provenance.of(
        ctx, epochs=cfg.epochs, steps=counters.steps, wall_time_s=round(counters.seconds, 3),
        level=("bi-level (first-order), logits on a held-out "
               f"{cfg.val_fraction:g} of the proxy set") if cfg.bilevel else "single-level",
        search_cost={**counters.to_dict(), **method.counters(),
                     "seconds": round(counters.seconds, 3)},
        optimizer={**search.optim_cfg.record(), "arch_optimizer": cfg.arch_optimizer,
                   "lr_alpha": cfg.lr_alpha, "batch_size": cfg.data.batch_size,
                   **({"processes": world, "global_batch_size": world * cfg.data.batch_size}
                      if world > 1 else {}),
                   **({"arch_betas": cfg.arch_betas} if cfg.arch_optimizer == "adam" else {})},
        dual={"eta": cfg.lambda_lr, "on": cfg.lambda_on, "constraint": cfg.dual,
              "target": search.dual.target, "lambda_final": search.dual.value},
        decidedness_mean=(sum(decided.values()) / len(decided)) if decided else 1.0,
        argmax_bits={n: list(b) for n, b in argmax.items()}, repair=repair_rec,
        details={"decision": sn.decision_stats(), **method_prov})
    policy = sn.policy(final, provenance=prov.to_dict(), budget=ctx.budget.to_dict())
    if run.is_main:
        policy.save(run.dir / "policy.json")
    return SearchResult(policy, run.dir, cfg.method, ctx.budget, counters.seconds, history,
                        argmax, repair_rec["changed_layers"])


def _run_policy_method(ctx: SearchContext, spec: MethodSpec, t_start: float) -> SearchResult:
    t0 = time.time()
    out = spec.impl(ctx)
    seconds = time.time() - t0
    if isinstance(out, Policy):
        out = MethodResult(out.bits(), dict(out.provenance))
    if not isinstance(out, MethodResult):
        raise TypeError(f"search method {spec.name!r} returned {type(out).__name__}; "
                        "expected a Policy or a MethodResult")
    bits = {n: (int(w), int(a)) for n, (w, a) in out.bits.items()}
    if out.repair:
        final, repair_rec = ctx.repair(bits)
    else:
        final = bits
        repair_rec = {"skipped": True, "cost": policy_cost(ctx.infos, bits, ctx.budget.kind)}
    details = {k: v for k, v in out.provenance.items() if k not in ("tool", "created")}
    prov = Provenance.of(ctx, wall_time_s=round(seconds, 3), repair=repair_rec,
                         argmax_bits={n: list(b) for n, b in bits.items()}, details=details)
    policy = ctx.policy(final, prov.to_dict())
    policy.save(ctx.run_dir / "policy.json")
    return SearchResult(policy, ctx.run_dir, ctx.cfg.method, ctx.budget, time.time() - t_start,
                        [], bits, repair_rec.get("changed_layers", []))


def search(cfg: SearchConfig) -> SearchResult:
    """Search a policy with ``cfg.method`` under the budget; writes the run folder.

    With ``cfg.resume`` the run folder's ``config.yaml`` is authoritative (``epochs``,
    ``device`` and ``progress`` may change).
    """
    spec = get_method(cfg.method)  # an unknown method fails before the run folder is touched
    if not spec.is_supernet and world_info().enabled:
        raise ConfigError(f"mpqkit search --method {cfg.method} runs in one process: launch it "
                          "without torchrun (asga, edmips, gmpq and seam run on several)")
    run, cfg = Run.open(cfg, FILES, (cfg.method, cfg.model, cfg.data.name))
    spec = get_method(cfg.method)
    cfg.method_options()  # resolved, so that config.yaml records the method's options
    t_start = time.time()
    ctx = build_context(cfg, run.dir, bilevel_split=spec.is_supernet)
    run.write_config(cfg)
    h, w = ctx.input_size
    log.info(f"search {cfg.method}: {cfg.model} on {ctx.data.description}; budget "
             f"{ctx.budget.describe()} at {h}x{w}; {len(ctx.searchable)} searchable layers, "
             f"first/last {cfg.first_last}; weights {ctx.weights_init}; run folder {run.dir}")
    if spec.is_supernet:
        result = _run_supernet(run, ctx, spec.impl())  # a fresh instance per search
    else:
        result = _run_policy_method(ctx, spec, t_start)
    log.info(f"done: {result.summary()}")
    return result
