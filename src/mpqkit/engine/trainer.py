"""Training, quantization-aware fine-tuning and evaluation.

``train(cfg)`` trains a full-precision model; ``finetune(cfg)`` quantizes a full-precision model
with a policy, calibrates it and fine-tunes it (QAT); ``evaluate(checkpoint, data)`` scores any
checkpoint either wrote. A run folder holds ``config.yaml``, ``policy.json`` (QAT), ``metrics.csv``,
``log.txt``, ``last.*`` (resumable, refreshed every epoch and every ``save_every_min`` minutes)
and ``best.*`` checkpoints. ``resume=True`` continues a run that was killed, mid-epoch included,
and ends with the same weights as an uninterrupted run (same seed, CPU).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mpqkit import runio
from mpqkit.complexity import profile_model
from mpqkit.data import DataBundle, DataConfig, build_data, make_loader
from mpqkit.engine.checkpoint import (
    load_model_state,
    read_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from mpqkit.engine.config import RunConfig, from_dict, load_config, to_dict, write_yaml
from mpqkit.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    resolve_device,
)
from mpqkit.errors import CheckpointError, ConfigError
from mpqkit.models import build_model, bundled_weights
from mpqkit.policy import Policy, parse_uniform
from mpqkit.quant import QuantConfig, calibrate, quantize_model
from mpqkit.runio import default_run_dir

log = logging.getLogger("mpqkit")

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc",
                 "eval_top5", "epoch_seconds", "images_per_s"]


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


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    if run_dir is not None and is_main:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)


def prepare_run_dir(cfg: RunConfig, command: str, is_main: bool) -> Path:
    """Resolve and check the run folder; refuse to overwrite a run without ``overwrite``."""
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(command, cfg.model, cfg.data.name)
    runio.prepare_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                          resume_file="last.safetensors", create=is_main,
                          artifacts=("metrics.csv", "log.txt", "last.safetensors", "last.json",
                                     "best.safetensors", "best.json", "policy.json"))
    barrier()
    return run_dir


def resolve_weights(cfg: RunConfig, dataset: str) -> Path | None:
    """The FP weights to start from: a path, ``bundled``, or None."""
    if cfg.weights in (None, "", "none"):
        return None
    if cfg.weights == "bundled":
        p = bundled_weights(cfg.model, dataset)
        if p is None:
            raise ConfigError(f"no bundled weights for {cfg.model} on {dataset}: train them with "
                              "`mpqkit train` and pass --weights RUN_DIR/best.safetensors")
        return p
    return Path(cfg.weights)


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


def _lr_at(cfg: RunConfig, step: int, steps_per_epoch: int) -> float:
    o = cfg.optim
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(o.warmup_epochs * steps_per_epoch)
    if step < warm:
        return o.lr * (step + 1) / warm
    if o.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * o.lr * (1 + math.cos(math.pi * min(1.0, t)))
    if o.schedule == "step":
        return o.lr * (0.1 ** ((step // steps_per_epoch) // max(1, o.step_size)))
    if o.schedule == "constant":
        return o.lr
    raise ConfigError(f"unknown schedule {o.schedule!r}: use cosine, step or constant")


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """SGD; no weight decay on biases, BatchNorm and quantizer steps (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0)


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
    n = max(n, 1)
    return {"loss": loss_sum / n, "top1": 100 * correct / n, "top5": 100 * correct5 / n,
            "n": int(n)}


def _limited(loader: Any, limit: int | None) -> Iterator[Any]:
    for i, b in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield b


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def _run(cfg: RunConfig, command: str, quantized: bool) -> RunResult:
    if quantized and not cfg.policy and not cfg.resume:
        resolve_policy(None, nn.Identity(), 0, "", "")  # raises the "needs a policy" error
    device = resolve_device(cfg.device)
    dist_info: DistInfo = init_distributed(device)
    run_dir = prepare_run_dir(cfg, command, dist_info.is_main)
    if cfg.resume:  # the run folder's config is authoritative
        saved = load_config(RunConfig, run_dir / "config.yaml")
        saved.resume, saved.out, saved.device = True, str(run_dir), cfg.device
        cfg = saved
    setup_logging(run_dir, dist_info.is_main)
    torch.manual_seed(cfg.seed)
    t_start = time.time()

    data = build_data(cfg.data)
    input_size = cfg.input_size or data.input_size
    num_classes = cfg.num_classes or data.num_classes
    model = build_model(cfg.model, num_classes=num_classes)
    weights = resolve_weights(cfg, data.name)
    if quantized and weights is None and not cfg.resume:
        raise ConfigError("finetune starts from full-precision weights: pass --weights "
                          "RUN_DIR/best.safetensors (from mpqkit train) or --weights bundled")
    if weights is not None and not cfg.resume:
        tensors, _ = read_checkpoint(weights)
        load_model_state(model, tensors, str(weights))
        log.info(f"weights: {weights}")

    policy: Policy | None = None
    teacher: nn.Module | None = None
    if quantized:
        policy = resolve_policy(cfg.policy, model, input_size, cfg.model, cfg.first_last)
        policy.provenance.setdefault("finetune_data", data.description)
        if cfg.kd_alpha > 0:
            teacher = copy.deepcopy(model).to(device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        model = quantize_model(model, policy, cfg.quant, inplace=True)
        log.info(f"policy: {policy.describe()}")
    model.to(device)

    if dist_info.is_main:
        write_yaml(cfg, run_dir / "config.yaml")
        if policy is not None:
            policy.save(run_dir / "policy.json")

    optimizer = build_optimizer(model, cfg)
    start_epoch, start_step, carried = 0, 0, {"loss": 0.0, "correct": 0.0, "n": 0.0}
    best_acc, best_epoch = -1.0, -1
    if cfg.resume:
        tensors, meta = read_checkpoint(run_dir / "last.safetensors")
        load_model_state(model, tensors, str(run_dir / "last.safetensors"))
        restore_optimizer(optimizer, tensors, meta)
        ex = meta.get("extra_state", {})
        start_epoch, start_step = int(ex["epoch"]), int(ex["step"])
        carried = ex.get("carried", carried)
        best_acc, best_epoch = float(ex.get("best_acc", -1)), int(ex.get("best_epoch", -1))
        log.info(f"resumed {run_dir} at epoch {start_epoch + 1}, batch {start_step}")
    elif quantized:
        calib = make_loader(data.train, cfg.data.batch_size, train=True, seed=cfg.seed, epoch=0)
        calibrate(model, ((x.to(device), y) for x, y in calib), max_batches=cfg.calib_batches)
        barrier()

    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    eval_set = data.val if data.val is not None else data.test
    eval_name = "val" if data.val is not None else "test"
    eval_loader = make_loader(eval_set, cfg.data.eval_batch_size, train=False,
                              workers=cfg.data.workers)
    steps_per_epoch = len(make_loader(data.train, cfg.data.batch_size, train=True, seed=cfg.seed))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    meta_base = checkpoint_meta(cfg, data, input_size, num_classes, policy)
    if cfg.amp and device.type != "cuda":
        log.info("amp: autocast runs on GPUs only; this CPU run uses float32")
    log.info(f"{command}: {cfg.model} on {data.description}; {cfg.epochs} epoch(s) x "
             f"{steps_per_epoch} steps; device {device}"
             + (f" x {dist_info.world_size} processes" if dist_info.enabled else "")
             + f"; run folder {run_dir}")

    metrics: list[dict[str, Any]] = _read_metrics(run_dir) if cfg.resume else []
    last_save = time.time()
    last_eval: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        skip = start_step if epoch == start_epoch else 0
        loader = make_loader(data.train, cfg.data.batch_size, train=True, seed=cfg.seed,
                             epoch=epoch, start_batch=skip, workers=cfg.data.workers)
        sums = dict(carried) if epoch == start_epoch else {"loss": 0.0, "correct": 0.0, "n": 0.0}
        train_model.train()
        t0, seen = time.time(), 0
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not dist_info.is_main or None, file=sys.stderr, dynamic_ncols=True,
                   leave=False)
        step = skip
        for x, y in _limited(loader, steps_per_epoch - skip):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = _lr_at(cfg, epoch * steps_per_epoch + step, steps_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with autocast(device, cfg.amp):
                out = train_model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.optim.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x).float()
                    temp = cfg.kd_temperature
                    kd = F.kl_div(F.log_softmax(out.float() / temp, 1), F.softmax(t_out / temp, 1),
                                  reduction="batchmean") * temp * temp
                    loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not torch.isfinite(loss):
                raise ConfigError(f"the loss became {loss.item()} at epoch {epoch + 1} step "
                                  f"{step}: lower the learning rate (--lr)")
            step += 1
            seen += y.numel()
            sums["loss"] += loss.item() * y.numel()
            sums["correct"] += (out.argmax(1) == y).sum().item()
            sums["n"] += y.numel()
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}", lr=f"{lr:.4f}")
            if (cfg.save_every_min > 0 and time.time() - last_save > 60 * cfg.save_every_min
                    and step < steps_per_epoch):
                _save_last(run_dir, model, optimizer, meta_base, dist_info, epoch, step, sums,
                           best_acc, best_epoch)
                last_save = time.time()
        bar.close()
        dt = time.time() - t0
        tl, tc, tn = all_reduce_sum([sums["loss"], sums["correct"], sums["n"]], device)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                               "lr": lr if steps_per_epoch else 0.0,
                               "train_loss": tl / max(tn, 1), "train_acc": 100 * tc / max(tn, 1),
                               "epoch_seconds": round(dt, 2),
                               "images_per_s": round(seen * dist_info.world_size / max(dt, 1e-9))}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            last_eval = evaluate_model(model, eval_loader, device, cfg.amp, desc=eval_name,
                                       progress=dist_info.is_main)
            row.update(eval_loss=last_eval["loss"], eval_acc=last_eval["top1"],
                       eval_top5=last_eval["top5"])
            if last_eval["top1"] > best_acc:
                best_acc, best_epoch = last_eval["top1"], epoch + 1
                if dist_info.is_main:
                    save_checkpoint(run_dir / "best", model,
                                    {**meta_base, "epoch": epoch + 1, "metrics": row})
        metrics.append(row)
        if dist_info.is_main:
            _append_metrics(run_dir, row)
        _save_last(run_dir, model, optimizer, meta_base, dist_info, epoch + 1, 0,
                   {"loss": 0.0, "correct": 0.0, "n": 0.0}, best_acc, best_epoch, row)
        last_save = time.time()
        log.info(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc "
                 f"{row['train_acc']:.2f}% | {eval_name} "
                 + (f"acc {row['eval_acc']:.2f}% " if "eval_acc" in row else "")
                 + f"| {row['images_per_s']} img/s, {dt:.0f}s")
    barrier()
    if not last_eval:  # resumed after the last epoch had finished: report the stored result
        stored = [m for m in metrics if m.get("eval_acc") not in (None, "")]
        last_eval = {"top1": float(stored[-1]["eval_acc"])} if stored else {"top1": float("nan")}
    result = RunResult(run_dir, last_eval["top1"], best_acc, best_epoch, cfg.epochs,
                       time.time() - t_start, policy, metrics)
    log.info(f"done: {result.summary()}")
    return result


def checkpoint_meta(cfg: RunConfig, data: DataBundle, input_size: int, num_classes: int,
                    policy: Policy | None) -> dict[str, Any]:
    return {"model": cfg.model, "num_classes": num_classes, "input_size": input_size,
            "dataset": data.name, "mean": list(data.mean), "std": list(data.std),
            "policy": policy.to_dict() if policy is not None else None,
            "quant": to_dict(cfg.quant) if policy is not None else None,
            "config": to_dict(cfg)}


def _save_last(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               meta: dict[str, Any], dist_info: DistInfo, epoch: int, step: int,
               sums: dict[str, float], best_acc: float, best_epoch: int,
               row: dict[str, Any] | None = None) -> None:
    if not dist_info.is_main:
        return
    save_checkpoint(run_dir / "last", model, {**meta, "epoch": epoch,
                                              **({"metrics": row} if row else {})},
                    optimizer, {"epoch": epoch, "step": step, "carried": sums,
                                "best_acc": best_acc, "best_epoch": best_epoch})


def _append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    path = run_dir / "metrics.csv"
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def train(cfg: RunConfig) -> RunResult:
    """Train a full-precision model (the baseline every policy starts from)."""
    return _run(cfg, "train", quantized=False)


def finetune(cfg: RunConfig) -> RunResult:
    """Quantize FP weights with ``cfg.policy``, calibrate, and fine-tune with QAT."""
    return _run(cfg, "finetune", quantized=True)


def load_checkpoint_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (quantized) model a checkpoint was written from, with its weights.

    A search run's ``last.safetensors`` gives back its supernet (e.g. to measure its sharpness).
    """
    tensors, meta = read_checkpoint(path)
    if "model" not in meta:
        raise CheckpointError(f"{path} has no mpqkit metadata (.json beside it): pass a checkpoint "
                              "written by mpqkit train/finetune")
    if meta.get("kind") == "supernet":  # a search run's checkpoint: the mixed-precision supernet
        from mpqkit.search.loop import supernet_from_checkpoint

        sn = supernet_from_checkpoint(tensors, meta, str(path))
        sn.eval()
        return sn, meta
    model = build_model(meta["model"], num_classes=int(meta["num_classes"]))
    if meta.get("policy"):
        policy = Policy.from_dict(meta["policy"], f"{path} policy")
        qcfg = from_dict(QuantConfig, meta.get("quant") or {}, "quant")
        model = quantize_model(model, policy, qcfg, inplace=True)
    load_model_state(model, tensors, str(path))
    model.eval()
    return model, meta


def evaluate(checkpoint: str | Path, data: DataConfig, device: str = "auto") -> dict[str, Any]:
    """Top-1/top-5 and loss of a checkpoint on ``data``'s test split (and its policy's cost)."""
    dev = resolve_device(device)
    model, meta = load_checkpoint_model(checkpoint)
    bundle = build_data(data)
    if bundle.num_classes != int(meta["num_classes"]):
        raise CheckpointError(f"{checkpoint} predicts {meta['num_classes']} classes but "
                              f"{bundle.name} has {bundle.num_classes}: evaluate on the dataset it "
                              "was trained on")
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


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
