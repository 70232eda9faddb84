"""Run configuration: dataclasses, YAML files and command-line overrides.

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line flags. The resolved
configuration is written into the run folder as ``config.yaml`` so the run can be reproduced
from the folder alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mpqkit.data import DataConfig
from mpqkit.errors import ConfigError
from mpqkit.optim.factory import OptimConfig
from mpqkit.quant.layers import QuantConfig

T = TypeVar("T")


@dataclass
class RunConfig:
    """Everything a train / finetune / eval run needs (sections ``data``, ``optim``, ``quant``)."""

    model: str = "resnet20"
    num_classes: int | None = None  # default: the dataset's
    # the resolution the model trains at and its BitOps are counted at (default: the dataset's
    # native size); the data follow it (see sync_input_size)
    input_size: int | None = None
    weights: str | None = None  # FP weights: a file, "bundled", or "torchvision[:NAME]"
    weights_map: str | None = None  # key prefix renames of the weights, "OLD=NEW[,OLD=NEW]"
    new_head: bool = False  # leave the classifier at random init (another class count)
    policy: str | None = None  # policy.json path, or a uniform spec "w4a4" (finetune only)
    first_last: str = "8bit"  # for uniform specs: 8bit | fp
    epochs: int = 1
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    calib_batches: int = 1
    kd_alpha: float = 0.0  # > 0: distil from the full-precision model (finetune)
    kd_temperature: float = 1.0
    amp: bool = False  # bf16/fp16 autocast on GPU
    compile: bool = False  # torch.compile the training step's model (after calibration)
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    save_every_min: float = 5.0  # mid-epoch checkpoint period (minutes); 0 = only per epoch
    eval_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)


def sync_input_size(cfg: RunConfig) -> RunConfig:
    """One resolution for training and for the complexity: ``input_size`` sets the images' size
    (``data.input_size``) when that is unset; two different values are a one-line error."""
    size, data_size = cfg.input_size, cfg.data.input_size
    if size is None or data_size == size:
        return cfg
    if data_size is not None:
        raise ConfigError(f"input_size={size} (the model's resolution, at which BitOps are "
                          f"counted) differs from data.input_size={data_size} (the size of the "
                          "training images): give one resolution (--input-size sets both; "
                          "remove data.input_size from the config)")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, input_size=size))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of options, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], d: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and ill-typed values.

    A class may define ``migrate(d) -> d`` (a static method) to read an older layout of its keys.
    """
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:
        d = migrate(dict(d))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(map(str, unknown))}: known are "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``; dotted keys address nested sections."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in over.items():
        if "." in key:
            head, rest = key.split(".", 1)
            out[head] = merge(out.get(head) or {}, {rest: value})
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist: pass the path of a YAML file")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML ({str(exc).splitlines()[0]}): "
                          "fix its syntax") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping of options at the top level")
    return d


def load_config(cls: type[T], config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """Defaults, then the YAML file, then ``overrides`` (dotted keys allowed)."""
    d = to_dict(cls())
    if config_file:
        y = read_yaml(config_file)
        migrate = getattr(cls, "migrate", None)  # an older layout, read before flags apply
        d = merge(d, migrate(y) if migrate is not None else y)
    if overrides:
        d = merge(d, {k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, d, str(config_file) if config_file else "config")


def load_run_config(cls: type[T], config_file: str | Path | None = None,
                    overrides: Mapping[str, Any] | None = None) -> T:
    """:func:`load_config` of a run; with ``resume`` the run folder's config is the base.

    ``overrides`` with ``resume`` true need ``out`` (the folder to continue): its
    ``config.yaml`` replaces ``config_file``, and the flags given now override it.
    """
    over = dict(overrides or {})
    if over.get("resume"):
        out = over.get("out")
        if not out:
            raise ConfigError("--resume needs --out RUN_DIR: the folder of the run to continue")
        saved = Path(out) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"nothing to resume in {out}: it holds no config.yaml; drop "
                              "--resume to start a new run")
        config_file = saved
    return load_config(cls, config_file, over)


def write_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
