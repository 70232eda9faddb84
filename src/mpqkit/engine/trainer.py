"""Training, quantization-aware fine-tuning and evaluation.

``train(cfg)`` trains a full-precision model; ``finetune(cfg)`` quantizes a full-precision model
with a policy, calibrates it and fine-tunes it (QAT); ``evaluate(checkpoint, data)`` scores any
checkpoint either wrote. Both drive the run lifecycle of :mod:`mpqkit.engine.run` (run folder,
resume, metrics, ``best``/``last`` checkpoints) with the optimizer of
:func:`mpqkit.optim.factory.create_optimizer` (``optim.sharpness`` adds SAM/GSAM/ASGA).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mpqkit.complexity import profile_model
from mpqkit.data import DataBundle, DataConfig, build_data, make_loader
from mpqkit.engine.checkpoint import (
    check_classes,
    load_checkpoint_model,
)
from mpqkit.engine.config import RunConfig, from_dict, sync_input_size, to_dict
from mpqkit.engine.distributed import all_reduce_sum, barrier, resolve_device
from mpqkit.engine.numerics import check_gradients, describe_state
from mpqkit.engine.run import EpochStats, LoopState, Run, RunFiles, StepOut, fit, log, resume
from mpqkit.engine.weights import load_weights
from mpqkit.errors import ConfigError, NonFiniteError
from mpqkit.models import build_model
from mpqkit.optim.factory import StepSchedule, create_optimizer, param_groups
from mpqkit.policy import Policy, parse_uniform
from mpqkit.quant import calibrate, quantize_model
from mpqkit.quant.quantizers import prepare_for_compile

METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc",
                 "eval_top5", "epoch_seconds", "images_per_s")


def _files(command: str) -> RunFiles:
    return RunFiles(command, "metrics.csv", METRIC_FIELDS,
                    artifacts=("metrics.csv", "log.txt", "last.safetensors", "last.json",
                               "best.safetensors", "best.json", "policy.json"))


@dataclass
class RunResult:
    """What a train/finetune run produced."""

    run_dir: Path
    final_acc: float
    best_acc: float
    best_epoch: int
    epochs: int
    seconds: float
    policy: Policy | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        s = (f"top-1 {self.final_acc:.2f}% (best {self.best_acc:.2f}% at epoch {self.best_epoch})"
             f" after {self.epochs} epoch(s) in {self.seconds:.0f}s")
        if self.policy is not None:
            s += f"; {self.policy.describe()}"
        return s


def resolve_policy(spec: str | None, model: nn.Module, input_size: int, model_name: str,
                   first_last: str) -> Policy:
    """A policy from a JSON path or a uniform spec like ``w4a4``, at the run's input size."""
    if not spec:
        raise ConfigError("finetune needs a policy: pass --policy policy.json or a uniform spec "
                          "such as --policy w4a4")
    if Path(spec).suffix == ".json" or Path(spec).exists():
        policy = Policy.load(spec)
        if tuple(policy.input_size) != (input_size, input_size):
            return policy.retarget(model, input_size, model_name or policy.model)
        policy.validate(model)
        return policy
    w, a = parse_uniform(spec)
    return Policy.uniform(model, w, a, input_size, first_last=first_last, model_name=model_name)


def autocast(device: torch.device, enabled: bool):  # type: ignore[no-untyped-def]
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any, device: torch.device, amp: bool = False,
                   desc: str = "eval", progress: bool = True) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over a loader; summed over ranks under DDP."""
    was = model.training
    model.eval()
    loss_sum = correct = correct5 = n = 0.0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress or None,
                     file=sys.stderr, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        n += y.numel()
    model.train(was)
    loss_sum, correct, correct5, n = all_reduce_sum([loss_sum, correct, correct5, n], device)
    if not math.isfinite(loss_sum):
        raise NonFiniteError(f"the {desc} loss is {loss_sum}: the model's outputs are not finite"
                             f"{' (' + state + ')' if (state := describe_state(model)) else ''}"
                             ": evaluate a checkpoint written before the run diverged")
    n = max(n, 1)
    return {"loss": loss_sum / n, "top1": 100 * correct / n, "top5": 100 * correct5 / n,
            "n": int(n)}


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def _kd_loss(out: Tensor, t_out: Tensor, temp: float) -> Tensor:
    return F.kl_div(F.log_softmax(out / temp, 1), F.softmax(t_out / temp, 1),
                    reduction="batchmean") * temp * temp


class _TrainTask:
    """Supervised training of a (quantized) model: the task :func:`fit` drives."""

    nonfinite_hint = "lower the learning rate (--lr)"

    def __init__(self, cfg: RunConfig, run: Run, data: DataBundle, model: nn.Module,
                 teacher: nn.Module | None, meta: dict[str, Any], steps_per_epoch: int) -> None:
        self.cfg, self.run, self.data, self.model, self.teacher = cfg, run, data, model, teacher
        self.name = cfg.model
        self._meta = meta
        self.train_model: nn.Module = model
        if run.world.enabled:
            dev = run.device
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)
        groups = param_groups(model.parameters(), cfg.optim.lr, cfg.optim.weight_decay)
        self.optimizer, self.sharp = create_optimizer(groups, cfg.optim, self.train_model)
        self.schedule = StepSchedule.from_config(self.optimizer, cfg.optim, epochs=cfg.epochs,
                                                 steps_per_epoch=steps_per_epoch)
        self.eval_name = "val" if data.val is not None else "test"
        self.eval_loader = make_loader(data.val if data.val is not None else data.test,
                                       cfg.data.eval_batch_size, train=False,
                                       workers=cfg.data.workers)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.train_model.train()
        dev = self.run.device
        for x, y in make_loader(self.data.train, self.cfg.data.batch_size, train=True,
                                seed=self.cfg.seed, epoch=epoch, start_batch=start,
                                workers=self.cfg.data.workers):
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        with autocast(self.run.device, cfg.amp):
            out = self.train_model(x).float()
            loss = F.cross_entropy(out, y, label_smoothing=cfg.optim.label_smoothing)
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(x).float()
                kd = _kd_loss(out, t_out, cfg.kd_temperature)
                loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd
        return loss, out

    def _check_gradients(self, x: Tensor, y: Tensor, loss: Tensor) -> None:
        """Stop before the optimizer step when the loss or a gradient is NaN/inf, naming where
        it started (gradients are summed over ranks: every rank stops here together)."""
        def again() -> Tensor:  # the plain model: no DDP collective in the diagnosis
            with autocast(self.run.device, self.cfg.amp):
                return F.cross_entropy(self.model(x).float(), y)

        check_gradients(self.model, self.nonfinite_hint, again,
                        None if self.run.world.enabled else loss)

    def step(self, x: Tensor, y: Tensor) -> StepOut:
        if self.sharp is None:
            loss, out = self._loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._check_gradients(x, y, loss)
            self.optimizer.step()
            return StepOut(loss, out)
        first: list[Tensor] = []

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss, out = self._loss(x, y)
            loss.backward()
            if not first:
                self._check_gradients(x, y, loss)
            first.append(out)
            return loss

        loss = self.sharp.step(closure, model=self.train_model)
        return StepOut(loss, first[0], {"rho": self.sharp.stats.get("rho", 0.0)})

    def epoch_row(self, st: EpochStats) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": st.epoch, "step": st.epoch * self.schedule.steps_per_epoch,
            "lr": self.cfg.optim.lr * st.lr_factor, "train_loss": st.loss, "train_acc": st.acc,
            "epoch_seconds": round(st.seconds, 2),
            "images_per_s": round(st.images / max(st.seconds, 1e-9))}
        if st.epoch % self.cfg.eval_every == 0 or st.epoch == self.cfg.epochs:
            ev = evaluate_model(self.model, self.eval_loader, self.run.device, self.cfg.amp,
                                desc=self.eval_name, progress=self.run.is_main)
            row.update(eval_loss=ev["loss"], eval_acc=ev["top1"], eval_top5=ev["top5"])
        return row

    def describe(self, row: Mapping[str, Any]) -> str:
        return (f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% | "
                f"{self.eval_name} " + (f"acc {row['eval_acc']:.2f}% " if "eval_acc" in row
                                        else "") + f"| {row['images_per_s']} img/s")

    def postfix(self) -> dict[str, str]:
        return {"lr": f"{self.optimizer.param_groups[0]['lr']:.4f}"}

    def meta(self) -> dict[str, Any]:
        return self._meta

    def extra_state(self) -> dict[str, Any]:
        return {"sharpness_aware": self.sharp.state_dict()["sharpness_aware"]} if self.sharp \
            else {}

    def load_extra_state(self, ex: Mapping[str, Any]) -> None:
        if self.sharp is not None and ex.get("sharpness_aware"):
            self.sharp.load_state_dict({**self.sharp.state_dict(),
                                        "sharpness_aware": ex["sharpness_aware"]})


def _build(cfg: RunConfig, data: DataBundle, quantized: bool, device: torch.device
           ) -> tuple[nn.Module, Policy | None, nn.Module | None]:
    """The model to train (FP weights loaded, quantized with the policy), policy and teacher."""
    input_size = cfg.input_size or data.input_size
    model = build_model(cfg.model, num_classes=cfg.num_classes or data.num_classes)
    if not cfg.resume:
        init = load_weights(model, cfg.weights, cfg.model, data.name,
                            weights_map=cfg.weights_map, new_head=cfg.new_head)
        if quantized and init == "random":
            raise ConfigError("finetune starts from full-precision weights: pass --weights "
                              "RUN_DIR/best.safetensors (from mpqkit train) or --weights bundled")
        if init != "random":
            log.info(f"weights: {init[3:]}")
    if not quantized:
        return model.to(device), None, None
    policy = resolve_policy(cfg.policy, model, input_size, cfg.model, cfg.first_last)
    policy.provenance.setdefault("finetune_data", data.description)
    teacher = None
    if cfg.kd_alpha > 0:
        teacher = copy.deepcopy(model).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model = quantize_model(model, policy, cfg.quant, inplace=True)
    log.info(f"policy: {policy.describe()}")
    return model.to(device), policy, teacher


def _run(cfg: RunConfig, command: str, quantized: bool) -> RunResult:
    if quantized and not cfg.policy and not cfg.resume:
        resolve_policy(None, nn.Identity(), 0, "", "")  # raises the "needs a policy" error
    cfg = sync_input_size(cfg)  # train at the resolution the BitOps are stated at
    run, cfg = Run.open(cfg, _files(command), (cfg.model, cfg.data.name))
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    data = build_data(cfg.data)
    model, policy, teacher = _build(cfg, data, quantized, run.device)
    run.write_config(cfg)
    if policy is not None and run.is_main:
        policy.save(run.dir / "policy.json")
    steps = len(make_loader(data.train, cfg.data.batch_size, train=True, seed=cfg.seed))
    steps = min(steps, cfg.max_steps_per_epoch or steps)
    meta = checkpoint_meta(cfg, data, policy)
    task = _TrainTask(cfg, run, data, model, teacher, meta, steps)
    state = LoopState()
    if cfg.resume:
        state = resume(run, task)
    elif quantized:
        calib = make_loader(data.train, cfg.data.batch_size, train=True, seed=cfg.seed, epoch=0)
        calibrate(model, ((x.to(run.device), y) for x, y in calib), max_batches=cfg.calib_batches,
                  batch_stats=True)  # the ranges of the training-mode activations QAT sees
        barrier()
    if cfg.amp and run.device.type != "cuda":
        log.info("amp: autocast runs on GPUs only; this CPU run uses float32")
    if cfg.compile:  # after calibration/resume; checkpoints keep saving the plain model
        task.train_model = torch.compile(prepare_for_compile(task.train_model))
    log.info(f"{command}: {cfg.model} on {data.description}; {cfg.epochs} epoch(s) x {steps} "
             f"steps; optimizer {cfg.optim.describe()}; device {run.device}"
             + (f" x {run.world.world_size} processes" if run.world.enabled else "")
             + f"; run folder {run.dir}")
    rows = fit(run, task, state, epochs=cfg.epochs, steps_per_epoch=steps,
               save_every_min=cfg.save_every_min)
    evals = [float(r["eval_acc"]) for r in rows if r.get("eval_acc") not in (None, "")]
    best = max(evals) if evals else float("nan")
    result = RunResult(run.dir, evals[-1] if evals else float("nan"), best,
                       next((int(r["epoch"]) for r in rows if r.get("eval_acc") not in (None, "")
                             and float(r["eval_acc"]) == best), -1),
                       cfg.epochs, time.time() - t_start, policy, rows)
    log.info(f"done: {result.summary()}")
    return result


def checkpoint_meta(cfg: RunConfig, data: DataBundle, policy: Policy | None) -> dict[str, Any]:
    """What a train/finetune checkpoint's JSON holds besides the state."""
    return {"model": cfg.model, "num_classes": cfg.num_classes or data.num_classes,
            "input_size": cfg.input_size or data.input_size,
            "dataset": data.name, "mean": list(data.mean), "std": list(data.std),
            "policy": policy.to_dict() if policy is not None else None,
            "quant": to_dict(cfg.quant) if policy is not None else None,
            "config": to_dict(cfg)}


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def train(cfg: RunConfig) -> RunResult:
    """Train a full-precision model (the baseline every policy starts from)."""
    return _run(cfg, "train", quantized=False)


def finetune(cfg: RunConfig) -> RunResult:
    """Quantize FP weights with ``cfg.policy``, calibrate, and fine-tune with QAT."""
    return _run(cfg, "finetune", quantized=True)


def evaluate(checkpoint: str | Path, data: DataConfig | Mapping[str, Any] | None = None,
             device: str = "auto") -> dict[str, Any]:
    """Top-1/top-5 and loss of a checkpoint on ``data``'s test split (and its policy's cost).

    ``data``: a :class:`DataConfig`, or a mapping of its fields whose dataset ``name`` defaults
    to the checkpoint's (the checkpoint is read, and checked, before any data).
    """
    dev = resolve_device(device)
    model, meta = load_checkpoint_model(checkpoint)
    if not isinstance(data, DataConfig):  # unset fields: the dataset and size trained on
        trained = {"name": meta.get("dataset", "cifar10"), "input_size": meta.get("input_size")}
        data = from_dict(DataConfig, {**trained, **{k: v for k, v in (data or {}).items()
                                                    if v is not None}}, "data")
    bundle = build_data(data)
    check_classes(meta, bundle.num_classes, bundle.name, str(checkpoint),
                  "evaluate on the dataset it was trained on")
    loader = make_loader(bundle.test, data.eval_batch_size, train=False, workers=data.workers)
    res: dict[str, Any] = evaluate_model(model.to(dev), loader, dev)
    res.update(checkpoint=str(checkpoint), model=meta["model"],
               data=f"{bundle.name} test split, {res['n']} images")
    if meta.get("policy"):
        c = Policy.from_dict(meta["policy"]).complexity()
        res.update(bitops=c.bitops, size_mb=c.size_mb, avg_w_bits=c.avg_w_bits,
                   avg_a_bits=c.avg_a_bits)
    else:
        infos = profile_model(model, int(meta.get("input_size", bundle.input_size)))
        res.update(macs=sum(i.macs for i in infos.values()),
                   size_mb=sum(i.params for i in infos.values()) * 4 / 1e6)
    return res

