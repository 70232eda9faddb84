"""The run lifecycle, once for every command that trains (train, finetune, every supernet search).

:class:`Run` owns the run folder: the overwrite/resume rules, the resolved ``config.yaml``, the
log (``log.txt``), the metrics CSV, and the ``best``/``last`` checkpoints with their JSON state.
:func:`fit` is the epoch loop they share: deterministic per-epoch batches, a task's step, the
progress bar, running sums, mid-epoch ``last`` checkpoints every ``save_every_min`` minutes, the
metrics row, the ``best`` checkpoint on a better ``eval_acc``, and the resume of all of it after
a kill (mid-epoch included) with the same result as an uninterrupted run.

A :class:`Task` says what a run trains: its model and optimizer, its batches, one step, and the
columns of its metrics row. Rank and world size come from
:func:`mpqkit.engine.distributed.world_info`; only rank 0 writes.
"""

from __future__ import annotations

import csv
import itertools
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mpqkit import runio
from mpqkit.engine.allocator import keep_freed_memory
from mpqkit.engine.checkpoint import (
    OptimizerState,
    load_model_state,
    read_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from mpqkit.engine.config import load_config, write_yaml
from mpqkit.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    resolve_device,
    world_info,
)
from mpqkit.engine.numerics import describe_state
from mpqkit.errors import ConfigError, NonFiniteError
from mpqkit.optim.factory import StepSchedule

log = logging.getLogger("mpqkit")
C = TypeVar("C")
# config fields a resumed run takes from the resuming call: where things are and how they are
# read or saved, never what is computed
RESUME_FREE = ("save_every_min", "data.data_dir", "data.cache_dir", "data.workers")
KEPT = "nothing of this step was saved; the last checkpoint on disk is the last good one"


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is when a message comes (it may be replaced later)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Messages to stdout (rank 0 only) and, with a run folder, to ``RUN_DIR/log.txt``."""
    for old in log.handlers:
        old.close()
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    h = _StdoutHandler()
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    if run_dir is not None and is_main:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)


@dataclass(frozen=True)
class RunFiles:
    """What a command keeps in its run folder and how it may be resumed."""

    command: str  # default folder: runs/COMMAND/NAME-PARTS-TIME
    metrics: str  # the per-epoch CSV
    fields: tuple[str, ...]  # its columns
    artifacts: tuple[str, ...]  # files --overwrite clears
    subdirs: tuple[str, ...] = ()  # folders --overwrite clears
    resume_file: str = "last.safetensors"  # what --resume needs in the folder
    keep_on_resume: tuple[str, ...] = ("device",)  # config fields the resuming call may change
    distributed: bool = True  # may run under torchrun


def _same_on_all_ranks(path: Path) -> Path:
    """Rank 0's ``path`` on every rank (a timestamped default may differ between ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return path
    box = [str(path)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


class MetricsLog:
    """The per-epoch CSV of a run (``None`` written as an empty cell)."""

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self.path, self.fields = path, list(fields)

    def append(self, row: Mapping[str, Any]) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})

    def read(self, upto_epoch: int | None = None, rewrite: bool = True) -> list[dict[str, Any]]:
        """Rows of finished epochs; with ``rewrite`` rows after ``upto_epoch`` leave the file."""
        if not self.path.is_file():
            return []
        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        rows = [r for r in rows if upto_epoch is None or int(r["epoch"]) <= upto_epoch]
        if rewrite and upto_epoch is not None:
            with self.path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        return rows


class Run:
    """An open run folder: where a run writes, who writes (rank 0), and on which device."""

    def __init__(self, run_dir: Path, files: RunFiles, world: DistInfo,
                 device: torch.device) -> None:
        self.dir, self.files, self.world, self.device = run_dir, files, world, device
        self.metrics = MetricsLog(run_dir / files.metrics, files.fields)

    @classmethod
    def open(cls, cfg: C, files: RunFiles, name: Sequence[str]) -> tuple[Run, C]:
        """Check/prepare the folder (``cfg.out``, else ``runs/COMMAND/NAME-TIME``) and logging.

        On ``cfg.resume`` the folder's ``config.yaml`` is authoritative, except the fields in
        ``files.keep_on_resume``; returns the run and the config it runs with.
        """
        world = world_info()
        if world.enabled and not files.distributed:
            raise ConfigError(f"mpqkit {files.command} runs in one process: launch it without "
                              "torchrun")
        device = resolve_device(getattr(cfg, "device", "auto"))
        world = init_distributed(device)
        out = getattr(cfg, "out", None)
        run_dir = Path(out) if out else _same_on_all_ranks(
            runio.default_run_dir(files.command, *name))
        runio.prepare_run_dir(run_dir, resume=bool(getattr(cfg, "resume", False)),
                              overwrite=bool(getattr(cfg, "overwrite", False)),
                              resume_file=files.resume_file, artifacts=files.artifacts,
                              subdirs=files.subdirs, create=world.is_main)
        barrier()
        if getattr(cfg, "resume", False):
            cfg = cls._resumed_config(cfg, run_dir, files)
        setup_logging(run_dir, world.is_main)
        log.info(keep_freed_memory())
        return cls(run_dir, files, world, device), cfg

    @staticmethod
    def _resumed_config(cfg: C, run_dir: Path, files: RunFiles) -> C:
        saved = load_config(type(cfg), run_dir / "config.yaml")
        for name in files.keep_on_resume + RESUME_FREE:
            *path, leaf = name.split(".")
            src, dst = cfg, saved
            for part in path:
                src, dst = getattr(src, part), getattr(dst, part)
            setattr(dst, leaf, getattr(src, leaf))
        saved.resume, saved.out = True, str(run_dir)  # type: ignore[attr-defined]
        return saved

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def write_config(self, cfg: Any) -> None:
        if self.is_main:
            write_yaml(cfg, self.dir / "config.yaml")

    def save(self, name: str, model: nn.Module, meta: Mapping[str, Any],
             optimizer: OptimizerState | None = None,
             extra_state: Mapping[str, Any] | None = None) -> None:
        """``RUN_DIR/NAME.safetensors`` + ``.json`` (rank 0 only)."""
        if self.is_main:
            save_checkpoint(self.dir / name, model, meta, optimizer, extra_state)

    def has_last(self) -> bool:
        return (self.dir / "last.safetensors").is_file()

    def progress(self, total: int, initial: int, desc: str, enabled: bool = True) -> tqdm:
        """A progress bar on rank 0 when stderr is a terminal."""
        return tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr,
                    disable=not (enabled and self.is_main) or None, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# the shared epoch loop
# ----------------------------------------------------------------------------------------------
@dataclass
class StepOut:
    """One step's loss (of the first pass), logits (for accuracy) and scalar extras."""

    loss: Tensor
    logits: Tensor
    extras: Mapping[str, float] = field(default_factory=dict)


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "n": 0.0}


@dataclass
class LoopState:
    """Where a run stands; stored in ``last.json`` (``extra_state``) and restored on resume."""

    epoch: int = 0  # finished epochs
    step: int = 0  # finished steps of the current epoch
    sums: dict[str, float] = field(default_factory=_zero_sums)
    extras: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum, count]
    best_acc: float = -1.0
    best_epoch: int = -1

    def add(self, out: StepOut, y: Tensor) -> None:
        n = int(y.numel())
        self.sums["loss"] += float(out.loss.detach()) * n
        self.sums["correct"] += float((out.logits.detach().argmax(1) == y).sum())
        self.sums["n"] += n
        for k, v in out.extras.items():
            s = self.extras.setdefault(k, [0.0, 0.0])
            s[0] += float(v)
            s[1] += 1.0

    def extra_means(self) -> dict[str, float]:
        return {k: s / c for k, (s, c) in self.extras.items() if c}

    def next_epoch(self) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        self.sums, self.extras = _zero_sums(), {}

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "carried": dict(self.sums),
                "extras": {k: list(v) for k, v in self.extras.items()},
                "best_acc": self.best_acc, "best_epoch": self.best_epoch}

    @classmethod
    def from_dict(cls, ex: Mapping[str, Any]) -> LoopState:
        return cls(int(ex["epoch"]), int(ex.get("step", 0)),
                   {**_zero_sums(), **ex.get("carried", {})},
                   {k: list(v) for k, v in ex.get("extras", {}).items()},
                   float(ex.get("best_acc", -1)), int(ex.get("best_epoch", -1)))


@dataclass
class EpochStats:
    """What :func:`fit` measured in one epoch, for the task's metrics row."""

    epoch: int  # 1-based
    loss: float
    acc: float
    extras: dict[str, float]
    seconds: float
    images: int  # images of this process's batches, times the world size
    lr_factor: float


class Task(Protocol):
    """What a run trains; :func:`fit` drives it."""

    name: str
    model: nn.Module  # what the checkpoints hold
    optimizer: OptimizerState  # its state goes into ``last``
    schedule: StepSchedule
    nonfinite_hint: str  # the fix named when the loss, a gradient or a weight becomes non-finite

    def batches(self, epoch: int, start: int) -> Iterable[tuple[Tensor, Tensor]]: ...

    def step(self, x: Tensor, y: Tensor) -> StepOut: ...

    def epoch_row(self, stats: EpochStats) -> dict[str, Any]: ...

    def describe(self, row: Mapping[str, Any]) -> str: ...

    def postfix(self) -> dict[str, str]: ...

    def meta(self) -> dict[str, Any]: ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, ex: Mapping[str, Any]) -> None: ...


def resume(run: Run, task: Task) -> LoopState:
    """Restore the task's model, optimizer and state from ``RUN_DIR/last``."""
    path = run.dir / "last.safetensors"
    tensors, meta = read_checkpoint(path)
    load_model_state(task.model, tensors, str(path))
    bases = [g.get("base_lr", g["lr"]) for g in task.optimizer.param_groups]  # type: ignore[attr-defined]
    restore_optimizer(task.optimizer, tensors, meta)
    for g, base in zip(task.optimizer.param_groups, bases, strict=True):  # type: ignore[attr-defined]
        g["base_lr"] = base  # the run's own (checkpoints of mpqkit 0.1 have none)
    ex = meta.get("extra_state", {})
    task.load_extra_state(ex)
    state = LoopState.from_dict(ex)
    log.info(f"resumed {run.dir} at epoch {state.epoch + 1}, batch {state.step}")
    return state


def _check_step(run: Run, task: Task, loss: Tensor, where: str) -> None:
    """Stop (on every rank together, none hangs) when the loss or the model became non-finite.

    Runs after the optimizer step and before anything is saved, so the last checkpoint on disk
    is the last good one; the model's parameters and float buffers (BatchNorm statistics) are
    checked as well as the loss: a quantizer's clamp can keep the loss finite over an infinity.
    """
    bad_loss = not bool(torch.isfinite(loss))
    state = describe_state(task.model)
    flags = [float(bad_loss), float(state is not None)]
    if run.world.enabled:
        flags = all_reduce_sum(flags, run.device)
    if not any(flags):
        return
    what = (f"the {task.name} loss became {loss.item()}" if bad_loss
            else f"the {task.name} run diverged")
    detail = f" ({state})" if state else ""
    raise NonFiniteError(f"{what} {where}{detail}: {task.nonfinite_hint}; {KEPT}")


def _save_last(run: Run, task: Task, state: LoopState,
               row: Mapping[str, Any] | None = None) -> None:
    meta = {**task.meta(), "epoch": state.epoch, **({"metrics": dict(row)} if row else {})}
    run.save("last", task.model, meta, task.optimizer,
             {**task.extra_state(), **state.to_dict()})


def _epoch_stats(run: Run, state: LoopState, seconds: float, seen: int,
                 f: float) -> EpochStats:
    s, extras = state.sums, state.extra_means()
    tl, tc, tn = all_reduce_sum([s["loss"], s["correct"], s["n"]], run.device)
    if run.world.enabled and extras:  # the mean over ranks (each rank's mean of its batches)
        names = sorted(extras)
        sums = all_reduce_sum([extras[k] for k in names], run.device)
        extras = {k: v / run.world.world_size for k, v in zip(names, sums, strict=True)}
    return EpochStats(state.epoch + 1, tl / max(tn, 1), 100 * tc / max(tn, 1),
                      extras, seconds, seen * run.world.world_size, f)


def _end_epoch(run: Run, task: Task, state: LoopState, stats: EpochStats,
               epochs: int) -> dict[str, Any]:
    row = task.epoch_row(stats)
    acc = row.get("eval_acc")
    if acc is not None and acc > state.best_acc:
        state.best_acc, state.best_epoch = float(acc), stats.epoch
        run.save("best", task.model, {**task.meta(), "epoch": stats.epoch, "metrics": row})
    if run.is_main:
        run.metrics.append(row)
    state.next_epoch()
    _save_last(run, task, state, row)
    log.info(f"epoch {stats.epoch}/{epochs}: {task.describe(row)} | {stats.seconds:.0f}s")
    return row


def fit(run: Run, task: Task, state: LoopState, *, epochs: int, steps_per_epoch: int,
        save_every_min: float = 0.0, progress: bool = True) -> list[dict[str, Any]]:
    """Train ``task`` from ``state`` to ``epochs``; returns the rows of every finished epoch."""
    rows = run.metrics.read(upto_epoch=state.epoch, rewrite=run.is_main)
    barrier()
    last_save = time.time()
    f = 1.0
    while state.epoch < epochs:
        epoch, skip = state.epoch, state.step
        bar = run.progress(steps_per_epoch, skip, f"{task.name} epoch {epoch + 1}/{epochs}",
                           progress)
        t0, seen = time.time(), 0
        for x, y in itertools.islice(task.batches(epoch, skip), steps_per_epoch - skip):
            f = task.schedule.set_step(epoch * steps_per_epoch + state.step)
            where = f"at epoch {epoch + 1} step {state.step}"
            try:
                out = task.step(x, y)
            except NonFiniteError as exc:
                raise NonFiniteError(f"{task.name} {where}: {exc}; {KEPT}") from None
            _check_step(run, task, out.loss, where)
            state.add(out, y)
            state.step += 1
            seen += int(y.numel())
            bar.update(1)
            bar.set_postfix(loss=f"{state.sums['loss'] / state.sums['n']:.3f}", **task.postfix())
            if (save_every_min > 0 and time.time() - last_save > 60 * save_every_min
                    and state.step < steps_per_epoch):
                _save_last(run, task, state)
                last_save = time.time()
        bar.close()
        stats = _epoch_stats(run, state, time.time() - t0, seen, f)
        rows.append(_end_epoch(run, task, state, stats, epochs))
        last_save = time.time()
    barrier()
    return rows
