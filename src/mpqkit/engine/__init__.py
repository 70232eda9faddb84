"""The run engine: one lifecycle for training, fine-tuning and search; checkpoints; DDP set-up.

* :mod:`mpqkit.engine.run`: the run folder, resume, metrics, best/last checkpoints, the epoch loop;
* :mod:`mpqkit.engine.checkpoint`: checkpoint files and :func:`load_checkpoint_model`;
* :mod:`mpqkit.engine.trainer`: ``train``, ``finetune``, ``evaluate``;
* :mod:`mpqkit.engine.weights`: the weights a run starts from (files, torchvision's cache);
* :mod:`mpqkit.engine.numerics`: non-finite losses, gradients and weights, found and named;
* :mod:`mpqkit.engine.config`: config dataclasses, YAML and flags;
* :mod:`mpqkit.engine.distributed`: rank/world from the environment (torchrun), one process
  needing no launcher;
* :mod:`mpqkit.engine.allocator`: the CPU allocator setting every run has (freed memory kept
  for reuse instead of page faults at every step).
"""

from mpqkit.engine.checkpoint import (
    check_classes,
    load_checkpoint_model,
    read_checkpoint,
    register_checkpoint_builder,
    save_checkpoint,
)
from mpqkit.engine.config import (
    RunConfig,
    from_dict,
    load_config,
    load_run_config,
    to_dict,
    write_yaml,
)
from mpqkit.engine.run import EpochStats, LoopState, Run, RunFiles, StepOut, Task, fit
from mpqkit.engine.trainer import (
    RunResult,
    evaluate,
    evaluate_model,
    finetune,
    train,
)
from mpqkit.engine.weights import load_weights, resolve_weights

__all__ = ["EpochStats", "LoopState", "Run", "RunConfig", "RunFiles", "RunResult", "StepOut",
           "Task", "check_classes", "evaluate", "evaluate_model", "finetune", "fit", "from_dict",
           "load_checkpoint_model", "load_config", "load_run_config", "load_weights",
           "read_checkpoint", "register_checkpoint_builder", "resolve_weights", "save_checkpoint",
           "to_dict", "train", "write_yaml"]
