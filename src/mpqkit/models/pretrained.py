"""Published weights: PyTorch state-dict files, torchvision's cached weights, key renames.

* :func:`read_state_dict` reads ``.safetensors`` and PyTorch files (``.pth``, ``.pt``, ``.bin``,
  ``.ckpt``) with ``torch.load(weights_only=True, map_location="cpu")``: tensors only, never an
  arbitrary pickle. Training-script containers (``{"state_dict": ...}``, ``{"model": ...}``) are
  unwrapped and the ``module.`` prefix of DataParallel/DDP (and ``_orig_mod.`` of
  ``torch.compile``) is dropped.
* :func:`torchvision_weights_file` is where torchvision keeps a model's pretrained weights: the
  torch hub cache, ``torch.hub.get_dir()/checkpoints/<file name of the weights' URL>``. Nothing is
  downloaded: a missing file is a one-line error naming the URL and the path to put it at.
* :func:`parse_weights_map` / :func:`rename_keys`: prefix renames ``OLD=NEW[,OLD=NEW]`` at
  dotted-name boundaries (``linear=fc`` turns ``linear.weight`` into ``fc.weight``).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mpqkit.errors import CheckpointError, ConfigError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# keys of training-script containers that hold the model's state dict, in order of preference
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# prefixes that wrappers add to every key: DataParallel/DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (see the module docstring), unwrapped, on the CPU."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not p.is_file():
            raise CheckpointError(f"weights file {p} does not exist: pass the path of a "
                                  ".safetensors or PyTorch (.pth/.pt/.bin/.ckpt) file")
        try:
            return unwrap_state_dict(load_file(str(p)), str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"weights file {p} is corrupt or not a safetensors file "
                                  f"({_first_line(exc)}): re-create it") from None
    if p.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"weights file {p} has an unknown suffix {p.suffix!r}: use "
                              ".safetensors or a PyTorch file (.pth, .pt, .bin, .ckpt)")
    if not p.is_file():
        raise CheckpointError(f"weights file {p} does not exist: pass the path of a "
                              ".safetensors or PyTorch (.pth/.pt/.bin/.ckpt) file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{p} holds Python objects that a weights-only load refuses "
                              f"({_first_line(exc)[:100]}): save a plain state dict with "
                              "torch.save(model.state_dict(), path)") from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{p} is corrupt or not a PyTorch file ({_first_line(exc)[:100]}):"
                              " re-create it") from None
    return unwrap_state_dict(obj, str(p))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """The tensors of a state dict, out of training-script containers and wrapper prefixes."""
    for _ in range(4):  # {"checkpoint": {"state_dict": ...}} at most a few levels deep
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or any(isinstance(v, Tensor) and "." in str(k) for k, v in obj.items()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict: save "
                              "model.state_dict()")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        keys = ", ".join(map(str, list(obj)[:6]))
        raise CheckpointError(f"{source} holds no tensors (keys: {keys}): save "
                              "model.state_dict()")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def parse_weights_map(text: str | None) -> list[tuple[str, str]]:
    """``"linear=fc,features=body"`` -> ``[("linear", "fc"), ("features", "body")]``."""
    if not text:
        return []
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        old, eq, new = part.partition("=")
        old, new = old.strip().strip("."), new.strip().strip(".")
        if not part or not eq or not old or not re.fullmatch(r"[\w.]*", old + new):
            raise ConfigError(f"--weights-map entry {part!r} is not OLD=NEW: give prefix "
                              "renames such as linear=fc or module.backbone=,head=fc")
        pairs.append((old, new))
    return pairs


def rename_keys(state: Mapping[str, Tensor], pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Apply the first matching prefix rename to every key (an empty NEW drops the prefix)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in pairs:
            if key == old or key.startswith(old + "."):
                rest = key[len(old):].lstrip(".")
                key = f"{new}.{rest}" if new and rest else (new or rest)
                break
        if key in out:
            raise ConfigError(f"--weights-map gives two tensors the name {key!r}: make the "
                              "renames map different prefixes to different names")
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# torchvision's pretrained weights
# ----------------------------------------------------------------------------------------------
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def torchvision_weights_file(model_name: str, spec: str) -> tuple[Path, str]:
    """``(path, description)`` of torchvision's weights ``spec`` of ``model_name`` (hub cache).

    ``spec`` is ``torchvision`` (the model's default weights) or ``torchvision:NAME`` (e.g.
    ``torchvision:IMAGENET1K_V1``). Raises a one-line error when the model is not torchvision's,
    the name is unknown, or the file is not in the cache (with the URL and the path to put it at).
    """
    from torchvision import models as tvm

    name = spec.partition(":")[2] or "DEFAULT"
    try:
        enum = tvm.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise ConfigError(f"--weights {spec}: {model_name!r} is not a torchvision model with "
                          "pretrained weights: pass a weights file instead") from None
    members = [m for m in enum.__members__ if m != "DEFAULT"]
    if name not in enum.__members__:
        raise ConfigError(f"--weights {spec}: {model_name} has no weights {name!r}: use one of "
                          f"{', '.join(members)} (or plain 'torchvision' for the default)")
    weights = enum[name]
    url = weights.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    what = f"torchvision {enum.__name__}.{weights.name}"
    if not path.is_file():
        raise CheckpointError(f"{what} are not in the torch hub cache: download {url} and put it "
                              f"at {path} (or set TORCH_HOME), then run again")
    return path, what


def fix_torchvision_keys(model_name: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The key renames torchvision applies to its own legacy files (DenseNet's ``norm.1``)."""
    if not model_name.startswith("densenet"):
        return dict(state)
    return {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}


def group_keys(keys: list[str], limit: int = 5) -> str:
    """``"24 (layer1.* 12, fc.* 2, ...; e.g. layer1.0.conv1.weight)"``: keys by top-level prefix."""
    counts: dict[str, int] = {}
    for k in keys:
        head = k.split(".", 1)[0]
        counts[head] = counts.get(head, 0) + 1
    groups = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{h}.* {n}" for h, n in groups[:limit])
    more = f", {len(groups) - limit} more prefixes" if len(groups) > limit else ""
    return f"{len(keys)} ({text}{more}; e.g. {keys[0]})"
