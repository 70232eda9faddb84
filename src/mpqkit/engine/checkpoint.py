"""Checkpoints: a safetensors file of tensors plus a small JSON file of everything else.

``NAME.safetensors`` holds the model state (keys as in ``model.state_dict()``) and, for resumable
``last`` checkpoints, the optimizer's tensors under ``optim/...`` and the RNG state. ``NAME.json``
holds the model name, classes, input size, the policy (for quantized models), the quantizer
config, epoch/step, metrics and the run config: enough to rebuild the model with no other file.
Both are written atomically (temporary file, then rename).

:func:`load_checkpoint_model` rebuilds the model a checkpoint was written from, through a table
from the checkpoint's ``kind`` to a builder: ``model`` (full precision, or quantized with the
policy it holds) is built here; other kinds register theirs with
:func:`register_checkpoint_builder` (the search registers ``supernet``). :func:`check_classes`
is the one check that a checkpoint and a dataset agree on the number of classes.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mpqkit.engine.config import from_dict
from mpqkit.engine.numerics import nonfinite_names
from mpqkit.errors import CheckpointError
from mpqkit.models import build_model
from mpqkit.models.pretrained import TORCH_SUFFIXES, group_keys
from mpqkit.policy import Policy
from mpqkit.quant import QuantConfig, quantize_model
from mpqkit.runio import atomic_write

FORMAT = "mpqkit.checkpoint"
VERSION = 1


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        entry = {}
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous()
                entry[k] = {"__tensor__": f"optim/{pid}/{k}"}
            else:
                entry[k] = v
        rest["state"][str(pid)] = entry
    return tensors, rest


def _unflatten_optimizer(rest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict:
    state = {}
    for pid, entry in rest["state"].items():
        state[int(pid)] = {k: (tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__"
                               in v else v) for k, v in entry.items()}
    return {"state": state, "param_groups": rest["param_groups"]}


class OptimizerState(Protocol):
    """What a checkpoint stores of an optimizer (a ``torch.optim.Optimizer``, or a set)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None: ...


def _refuse_nonfinite(tensors: Mapping[str, torch.Tensor], source: str, fix: str) -> None:
    """A one-line :class:`CheckpointError` when a floating-point tensor holds a NaN or inf."""
    bad = nonfinite_names(tensors.items())
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN or inf values, first "
                              f"{bad[0]}: {fix}")


def save_checkpoint(path_stem: str | Path, model: nn.Module, meta: Mapping[str, Any],
                    optimizer: OptimizerState | None = None,
                    extra_state: Mapping[str, Any] | None = None) -> Path:
    """Write ``STEM.safetensors`` and ``STEM.json``; returns the safetensors path."""
    stem = Path(path_stem)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"format": FORMAT, "version": VERSION, **meta}
    if optimizer is not None:
        ot, orest = _flatten_optimizer(optimizer.state_dict())
        tensors.update(ot)
        info["optimizer"] = orest
        tensors["rng/torch"] = torch.get_rng_state()
    if extra_state:
        info["extra_state"] = dict(extra_state)
    st = stem.with_suffix(".safetensors")
    _refuse_nonfinite(tensors, f"checkpoint {st}", "the run diverged; nothing was written")
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(st, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    atomic_write(stem.with_suffix(".json"),
            lambda p: p.write_text(json.dumps(info, indent=2, default=str) + "\n"))
    return st


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint given as ``X.safetensors``, ``X.json`` or ``X``.

    A bare safetensors file (no JSON beside it) is accepted with empty metadata.
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder: pass a checkpoint file such as "
                              f"{p}/best.safetensors")
    if p.suffix in TORCH_SUFFIXES:
        raise CheckpointError(f"{p} is a PyTorch file, not an mpqkit checkpoint: pass it as "
                              "--weights to train/finetune, or pass RUN_DIR/best.safetensors")
    if p.suffix not in ("", ".safetensors", ".json"):
        raise CheckpointError(f"{p} is not a checkpoint (.safetensors, or its .json): pass "
                              "RUN_DIR/best.safetensors")
    st = p if p.suffix == ".safetensors" else p.with_suffix(".safetensors")
    if not st.is_file():
        raise CheckpointError(f"checkpoint {st} does not exist: pass RUN_DIR/best.safetensors or "
                              "RUN_DIR/last.safetensors of a finished run")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {st} is corrupt or not a safetensors file "
                              f"({str(exc).splitlines()[0][:120]}): re-create it or use another "
                              "checkpoint") from None
    meta: dict[str, Any] = {}
    js = st.with_suffix(".json")
    if js.is_file():
        try:
            meta = json.loads(js.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint metadata {js} is not valid JSON ({exc.msg}): "
                                  "re-create the checkpoint") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{js} is not an mpqkit checkpoint file (format "
                                  f"{meta.get('format')!r})")
    return tensors, meta


def model_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(("optim/", "rng/"))}


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str,
                     strict: bool = True, fix: str = "pass the --model/--num-classes (and "
                     "policy) it was trained with") -> None:
    """Load model weights; a one-line error groups missing/unexpected/mis-shaped keys.

    Non-finite tensors are refused. ``fix`` ends the error message.
    """
    state = model_tensors(tensors)
    _refuse_nonfinite(state, f"checkpoint {source}", "use a checkpoint written before the run "
                      "diverged, or re-create it")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if shape or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing {group_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {group_keys(unexpected)}")
        if shape:
            parts.append(f"shape mismatch {', '.join(shape[:3])}"
                         f"{f' and {len(shape) - 3} more' if len(shape) > 3 else ''}")
        raise CheckpointError(f"checkpoint {source} does not match the model ({'; '.join(parts)}):"
                              f" {fix}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def restore_optimizer(optimizer: OptimizerState, tensors: Mapping[str, torch.Tensor],
                      meta: Mapping[str, Any]) -> None:
    if "optimizer" not in meta:
        raise CheckpointError("checkpoint has no optimizer state: resume from last.safetensors")
    try:
        optimizer.load_state_dict(_unflatten_optimizer(meta["optimizer"], tensors))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"the optimizer state in the checkpoint does not match this run's "
                              f"optimizer ({str(exc).splitlines()[0][:120]}): resume with the "
                              "settings the run was started with") from None
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])


# ----------------------------------------------------------------------------------------------
# rebuilding the model of a checkpoint
# ----------------------------------------------------------------------------------------------
Builder = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any], str], nn.Module]
_BUILDERS: dict[str, Builder] = {}
# kinds whose builder lives in a module that registers it when imported
_BUILDER_MODULES = {"supernet": "mpqkit.search.loop"}


def register_checkpoint_builder(kind: str, builder: Builder) -> None:
    """Make :func:`load_checkpoint_model` rebuild checkpoints of ``kind`` with ``builder``.

    ``builder(tensors, meta, source)`` returns the model with the tensors loaded.
    """
    _BUILDERS[kind] = builder


def _build_plain(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                 source: str) -> nn.Module:
    model = build_model(meta["model"], num_classes=int(meta["num_classes"]))
    if meta.get("policy"):
        policy = Policy.from_dict(meta["policy"], f"{source} policy")
        qcfg = from_dict(QuantConfig, meta.get("quant") or {}, "quant")
        model = quantize_model(model, policy, qcfg, inplace=True)
    load_model_state(model, tensors, source)
    return model


register_checkpoint_builder("model", _build_plain)


def load_checkpoint_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (quantized) model a checkpoint was written from, with its weights, in eval.

    A search run's ``last.safetensors`` gives back its supernet (e.g. to measure its sharpness).
    """
    tensors, meta = read_checkpoint(path)
    if "model" not in meta:
        raise CheckpointError(f"{path} has no mpqkit metadata (.json beside it): pass a checkpoint "
                              "written by mpqkit train/finetune")
    kind = str(meta.get("kind", "model"))
    if kind not in _BUILDERS and kind in _BUILDER_MODULES:
        importlib.import_module(_BUILDER_MODULES[kind])
    if kind not in _BUILDERS:
        known = ", ".join(sorted({*_BUILDERS, *_BUILDER_MODULES}))
        raise CheckpointError(f"{path} is a checkpoint of kind {kind!r}, which this mpqkit cannot "
                              f"rebuild (known: {known})")
    model = _BUILDERS[kind](tensors, meta, str(path))
    model.eval()
    return model, meta


def check_classes(meta: Mapping[str, Any], num_classes: int, dataset: str, checkpoint: str,
                  fix: str) -> None:
    """One-line error when a checkpoint's class count differs from the dataset's."""
    if num_classes != int(meta["num_classes"]):
        raise CheckpointError(f"{checkpoint} predicts {meta['num_classes']} classes but "
                              f"{dataset} has {num_classes}: {fix}")
