"""The full-precision weights a run starts from (``--weights``, ``--weights-map``, ``--new-head``).

``--weights`` takes:

* ``bundled``: the checkpoint shipped with mpqkit for the model and dataset;
* ``torchvision`` or ``torchvision:NAME``: torchvision's pretrained weights of a torchvision model,
  read from the torch hub cache (never downloaded);
* a file: an mpqkit checkpoint or any ``.safetensors`` file, or a PyTorch state dict (``.pth``,
  ``.pt``, ``.bin``, ``.ckpt``, read weights-only). The file named is the file read.

``--weights-map OLD=NEW[,OLD=NEW]`` renames key prefixes first. The classifier (the model's last
``nn.Linear``) loads like every other layer, so weights for another class count are an error
that names ``--new-head``; with ``--new-head`` the classifier's tensors in the file are dropped
and the classifier keeps its random initialisation (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from mpqkit.engine.checkpoint import load_model_state, model_tensors, read_checkpoint
from mpqkit.errors import CheckpointError, ConfigError
from mpqkit.models import bundled_weights
from mpqkit.models.pretrained import (
    fix_torchvision_keys,
    parse_weights_map,
    read_state_dict,
    rename_keys,
    torchvision_weights_file,
    unwrap_state_dict,
)

log = logging.getLogger("mpqkit")
FIX = ("rename key prefixes with --weights-map OLD=NEW (e.g. linear=fc), pass --new-head for "
       "another class count, or the --model the weights were made for")


def _is_torchvision(weights: str) -> bool:
    return weights == "torchvision" or weights.startswith("torchvision:")


def resolve_weights(weights: str | None, model: str, dataset: str) -> Path | None:
    """The file the FP weights come from: a path, ``bundled``, ``torchvision[:NAME]``, or None."""
    if weights in (None, "", "none"):
        return None
    if weights == "bundled":
        p = bundled_weights(model, dataset)
        if p is None:
            raise ConfigError(f"no bundled weights for {model} on {dataset}: train them with "
                              "`mpqkit train` and pass --weights RUN_DIR/best.safetensors")
        return p
    if _is_torchvision(weights):
        return torchvision_weights_file(model, weights)[0]
    return Path(weights)


def read_weights(weights: str, model_name: str, dataset: str) -> tuple[dict[str, Tensor], str]:
    """The tensors ``--weights`` names and a description of where they came from."""
    path = resolve_weights(weights, model_name, dataset)
    assert path is not None
    if _is_torchvision(weights):
        what = torchvision_weights_file(model_name, weights)[1]
        return fix_torchvision_keys(model_name, read_state_dict(path)), f"{what} ({path})"
    if path.suffix not in ("", ".safetensors", ".json"):  # a PyTorch file, or an error
        return read_state_dict(path), str(path)
    tensors, _ = read_checkpoint(path)
    return unwrap_state_dict(model_tensors(tensors), str(path)), str(path)


def classifier_name(model: nn.Module) -> str | None:
    """The model's classifier: its last ``nn.Linear`` (fully-qualified name), if any."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    return names[-1] if names else None


def _drop_head(model: nn.Module, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """``state`` with the model's own (random) classifier tensors, and a message saying so."""
    head = classifier_name(model)
    if head is None:
        raise ConfigError(f"--new-head: {type(model).__name__} has no nn.Linear classifier to "
                          "re-initialise: drop --new-head")
    ours = model.get_submodule(head)
    theirs = state.get(f"{head}.weight")
    was = f"{theirs.shape[0]} classes" if theirs is not None and theirs.dim() == 2 else "no head"
    log.info(f"new head: classifier {head} starts from random weights for "
             f"{ours.out_features} classes ({source} has {was} there)")
    kept = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    return {**{f"{head}.{k}": v for k, v in ours.state_dict().items()}, **kept}


def _check_head(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """A one-line error when the weights' classifier has another class count than the model's."""
    head = classifier_name(model)
    theirs = state.get(f"{head}.weight") if head else None
    if head is None or theirs is None or theirs.dim() != 2:
        return
    ours = model.get_submodule(head)
    if theirs.shape[0] != ours.out_features and theirs.shape[1] == ours.in_features:
        raise CheckpointError(f"{source} has {theirs.shape[0]} classes in its classifier {head} "
                              f"but the model has {ours.out_features}: pass --new-head to start "
                              f"{head} from random weights, or --num-classes {theirs.shape[0]}")


def load_weights(model: nn.Module, weights: str | None, model_name: str, dataset: str, *,
                 weights_map: str | None = None, new_head: bool = False) -> str:
    """Load the FP weights ``weights`` names into ``model``; returns ``random`` or ``fp:SOURCE``.

    ``weights_map``: prefix renames ``OLD=NEW[,OLD=NEW]`` applied to the file's keys first;
    ``new_head``: leave the classifier (last ``nn.Linear``) at its random initialisation.
    """
    pairs = parse_weights_map(weights_map)
    if weights in (None, "", "none"):
        if pairs or new_head:
            raise ConfigError("--weights-map and --new-head apply to --weights: pass the weights "
                              "file too, or drop them")
        return "random"
    state, source = read_weights(weights, model_name, dataset)
    state = rename_keys(state, pairs)
    if new_head:
        state = _drop_head(model, state, source)
    else:
        _check_head(model, state, source)
    load_model_state(model, state, source, fix=FIX)
    return f"fp:{source}"
