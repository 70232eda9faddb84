"""Training, fine-tuning, evaluation, checkpoints and distributed set-up."""

from mpqkit.engine.checkpoint import read_checkpoint, save_checkpoint
from mpqkit.engine.config import OptimConfig, RunConfig, from_dict, load_config, write_yaml
from mpqkit.engine.trainer import (
    RunResult,
    evaluate,
    evaluate_model,
    finetune,
    load_checkpoint_model,
    train,
)

__all__ = ["OptimConfig", "RunConfig", "RunResult", "evaluate", "evaluate_model", "finetune",
           "from_dict", "load_checkpoint_model", "load_config", "read_checkpoint",
           "save_checkpoint", "train", "write_yaml"]
