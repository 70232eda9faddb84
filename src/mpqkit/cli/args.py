"""Flag builders shared by the subcommands, and the generic flags of a config dataclass.

Every flag that feeds a config has ``default=None`` and a dotted ``dest`` (``data.batch_size``,
``optim.lr``, ``options.teacher``): :func:`overrides` keeps only the flags the user gave, so the
precedence stays defaults < ``--config FILE.yaml`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mpqkit.errors import ConfigError

Group = argparse._ActionsContainer  # a parser or an argument group


def parse_subset(text: str) -> float | int:
    """``0.05`` -> a fraction; ``2500`` -> an image count."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"subset {text!r} is not a number: give a fraction such "
                                         "as 0.05 or a count such as 2500") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"subset {text!r} must be positive")
    return int(v) if v >= 1 and v.is_integer() and "." not in text else v


def add_data_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", dest="data.name", metavar="NAME",
                   help="cifar10, cifar100, tiny-imagenet-32 or imagefolder:PATH")
    g.add_argument("--data-dir", dest="data.data_dir", metavar="DIR",
                   help="folder with the dataset archives/folders (default: $MPQKIT_DATA_DIR)")
    g.add_argument("--cache-dir", dest="data.cache_dir", metavar="DIR",
                   help="where archives are extracted (default: $MPQKIT_CACHE_DIR or "
                        "~/.cache/mpqkit)")
    g.add_argument("--test-subset", dest="data.test_subset", type=parse_subset, metavar="N|F",
                   help="class-balanced subset of the test split")
    g.add_argument("--eval-batch-size", dest="data.eval_batch_size", type=int, metavar="N")
    g.add_argument("--workers", dest="data.workers", type=int, metavar="N")
    g.add_argument("--download", dest="data.download", action=argparse.BooleanOptionalAction,
                   default=None, help="let torchvision download CIFAR when the network allows")
    if train:
        g.add_argument("--subset", dest="data.subset", type=parse_subset, metavar="N|F",
                       help="class-balanced deterministic subset of the train split, e.g. 0.05 "
                            "or 2500")
        g.add_argument("--val-split", dest="data.val_split", type=float, metavar="F",
                       help="hold out this fraction of the train subset for validation")
        g.add_argument("--batch-size", dest="data.batch_size", type=int, metavar="N")
        g.add_argument("--augment", dest="data.augment", action=argparse.BooleanOptionalAction,
                       default=None)


def add_quant_args(g: Group) -> None:
    """Quantizer flags (``quant.*`` of the config) shared by ``finetune`` and ``search``."""
    g.add_argument("--weight-quant", dest="quant.weight_method",
                   choices=["lsq", "maxabs", "dorefa"])
    g.add_argument("--act-quant", dest="quant.act_method", choices=["lsq", "pact"])
    g.add_argument("--per-channel", dest="quant.per_channel",
                   action=argparse.BooleanOptionalAction, default=None)


def add_run_dir_args(g: Group, default_out: str, resume_help: str) -> None:
    """Seed, device and run-folder flags shared by every command that writes a run folder."""
    g.add_argument("--seed", dest="seed", type=int)
    g.add_argument("--device", dest="device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--out", dest="out", metavar="RUN_DIR",
                   help=f"run folder (default: {default_out})")
    g.add_argument("--overwrite", dest="overwrite", action="store_true", default=None,
                   help="replace the run already in --out")
    g.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help=resume_help)
    g.add_argument("--save-every-min", dest="save_every_min", type=float, metavar="MIN",
                   help="mid-epoch checkpoint period (default 5; 0 = per epoch only)")


# ----------------------------------------------------------------------------------------------
# flags of a config dataclass
# ----------------------------------------------------------------------------------------------
def number_list(elem: type, length: int | None) -> Callable[[str], list[Any]]:
    """Parser of ``"0.9,0.999"`` into a list of ``elem`` (of ``length`` items if given)."""
    name = "integers" if elem is int else "numbers"

    def parse(text: str) -> list[Any]:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            values = [elem(p) for p in parts]
        except ValueError:
            values = []
        if not values or (length is not None and len(values) != length):
            count = f"{length} " if length is not None else ""
            raise argparse.ArgumentTypeError(f"{text!r} must be {count}{name} separated by "
                                             "commas, e.g. " + ",".join(["1"] * (length or 2)))
        return values

    return parse


def _sequence_kwargs(tp: Any) -> dict[str, Any] | None:
    """``type``/``metavar`` for ``list[X]`` / ``tuple[X, ...]`` of int or float, else None."""
    origin = typing.get_origin(tp)
    if origin not in (list, tuple):
        return None
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    elem = args[0] if args else str
    if elem not in (int, float) or any(a is not elem for a in args):
        return None
    length = len(args) if origin is tuple and Ellipsis not in typing.get_args(tp) else None
    metavar = ",".join(["X"] * length) if length else "X,X,.."
    return {"type": number_list(elem, length), "metavar": metavar}


def flag_kwargs(tp: Any, name: str) -> dict[str, Any]:
    """``add_argument`` keywords for a field annotated ``tp`` (an ``X | None`` is an ``X``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        seqs = [a for a in options if typing.get_origin(a) in (list, tuple)]
        tp = seqs[0] if seqs else (options[0] if len(options) == 1 else str)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is typing.Literal:
        return {"choices": list(typing.get_args(tp))}
    seq = _sequence_kwargs(tp)
    if seq is not None:
        return seq
    return {"type": tp if tp in (int, float) else str, "metavar": name.upper()}


def _default_text(f: dataclasses.Field, defaults: Any) -> str:
    if defaults is not None:
        value = getattr(defaults, f.name)
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None or dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    return f" (default {value})"


def add_dataclass_flags(group: Group, cls: type, prefix: str, *,
                        skip: Iterable[str] = (), extra: Mapping[str, Mapping[str, Any]] | None
                        = None, help_prefix: Callable[[str], str] | None = None,
                        defaults: Any = None, hide_defaults: Iterable[str] = ()) -> list[str]:
    """One flag per field of dataclass ``cls``: ``--field-name``, ``dest="PREFIX.field"``.

    The type comes from the annotation (``int``, ``float``, ``str``, ``X | None``, lists of
    numbers as ``1,2,3``); ``bool`` fields get ``--name/--no-name``; the help is the field's
    ``metadata["help"]``, prefixed by ``help_prefix(name)``, with the default of ``defaults``
    (an instance; default: the field's own) unless the help names one or the field is in
    ``hide_defaults``. Every ``argparse`` default is None, so only the flags the user
    gives override the config. ``extra[name]`` adds or replaces ``add_argument`` keywords
    (``help`` replaces the metadata's, ``flags`` the option strings). A flag name already
    taken in the parser becomes ``--PREFIX-field-name``. Nested dataclass fields (sections) and
    ``skip`` get no flag.
    Returns the names of the fields given a flag.
    """
    hints = typing.get_type_hints(cls)
    skipped, hidden = set(skip), set(hide_defaults)
    added: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name in skipped or dataclasses.is_dataclass(hints[f.name]):
            continue
        kw: dict[str, Any] = {**flag_kwargs(hints[f.name], f.name),
                              **(extra.get(f.name, {}) if extra else {})}
        text = (help_prefix(f.name) if help_prefix else "") + kw.pop(
            "help", f.metadata.get("help", ""))
        if f.name not in hidden and "default" not in text:
            text += _default_text(f, defaults)
        kw["help"] = text.strip().replace("%", "%%")
        flags = kw.pop("flags", None) or [f"--{f.name.replace('_', '-')}"]
        kw.update(dest=f"{prefix}.{f.name}", default=None)
        try:
            group.add_argument(*flags, **kw)
        except argparse.ArgumentError:  # the name is taken by another flag
            group.add_argument(f"--{prefix}-{f.name.replace('_', '-')}", **kw)
        added.append(f.name)
    return added


# ----------------------------------------------------------------------------------------------
# the optimizer section (``optim.*``) of train, finetune and search
# ----------------------------------------------------------------------------------------------
def _optim_flags() -> dict[str, dict[str, Any]]:
    from mpqkit.optim.factory import BASE_OPTIMIZERS, SCHEDULES, SHARPNESS

    return {
        "optimizer": {"choices": [*BASE_OPTIMIZERS, *SHARPNESS[1:]], "metavar": None,
                      "help": "base optimizer; sam, gsam, asga mean SGD wrapped by it"},
        "sharpness": {"choices": list(SHARPNESS), "metavar": None,
                      "help": "sharpness-aware wrapper of the base optimizer"},
        "lr": {"help": "learning rate of the weights"},
        "nesterov": {"help": "Nesterov momentum (SGD)"},
        "betas": {"metavar": "B1,B2", "help": "Adam/AdamW betas, e.g. 0.9,0.999"},
        "schedule": {"choices": list(SCHEDULES), "metavar": None},
        "warmup_epochs": {"metavar": "EPOCHS", "help": "linear learning-rate warm-up"},
        "step_size": {"metavar": "EPOCHS", "help": "x0.1 every this many epochs (schedule=step)"},
        "rho0": {"help": "radius of SAM/GSAM; first radius of ASGA"},
        "rho_max": {"help": "ASGA: upper bound of the adaptive radius"},
        "rho_min": {"help": "ASGA: lower bound of the adaptive radius"},
        "gamma": {"help": "ASGA: gradient-alignment coefficient"},
        "adaptive": {"help": "ASGA: radius of the next step from the surrogate gap"},
        "h_ema": {"help": "ASGA: EMA factor of the surrogate gap (0 = previous step only)"},
        "gsam_alpha": {"help": "GSAM: coefficient of the orthogonal gradient component"},
    }


def add_optim_args(p: argparse.ArgumentParser, aliases: Mapping[str, Sequence[str]] | None = None,
                   defaults: Any = None) -> list[str]:
    """Flags of every :class:`~mpqkit.optim.factory.OptimConfig` field (``optim.*``).

    ``aliases[field]``: further option strings of a field's flag (e.g. ``--lr-w``).
    """
    from mpqkit.optim.factory import OptimConfig

    extra = _optim_flags()
    for name, more in (aliases or {}).items():
        extra[name] = {**extra.get(name, {}), "flags": [f"--{name.replace('_', '-')}", *more]}
    g = p.add_argument_group("optimizer")
    return add_dataclass_flags(g, OptimConfig, "optim", extra=extra, defaults=defaults)


# ----------------------------------------------------------------------------------------------
# parsed arguments and output
# ----------------------------------------------------------------------------------------------
def overrides(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Flags the user gave (not None), as dotted config keys."""
    internal = {"func", "command", "config", "json", *skip}
    return {k: v for k, v in vars(args).items() if v is not None and k not in internal}


def section(args: argparse.Namespace, name: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The flags given for config section ``name`` (``data.workers`` -> ``{"workers": ...}``)."""
    head = name + "."
    return {k[len(head):]: v for k, v in overrides(args, skip).items() if k.startswith(head)}


def prints_results() -> bool:
    """Whether this process prints result lines: a single process, or rank 0 under torchrun
    (every rank runs the command; the others would repeat the same lines)."""
    from mpqkit.engine.distributed import world_info

    return world_info().is_main


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def require(value: Any, flag: str, hint: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"missing {flag}: {hint}")
    return value
