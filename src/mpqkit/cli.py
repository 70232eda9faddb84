"""The ``mpqkit`` command. Every subcommand is a thin shell over a public function.

Configuration precedence: defaults < ``--config FILE.yaml`` < flags. User errors print one line
(``mpqkit: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mpqkit.errors import ConfigError, MpqkitError

Handler = Callable[[argparse.Namespace], int]

# Subcommand modules: each defines ``register(subparsers) -> None`` and sets
# ``func`` on its parser via ``set_defaults``. Optional modules may be absent.
SUBCOMMAND_MODULES = [
    "mpqkit.cli_core",
    "mpqkit.search.cli",
    "mpqkit.export.cli",
    "mpqkit.cli_tools",
]


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


def add_quant_args(g: argparse._ActionsContainer) -> None:
    """Quantizer flags (``quant.*`` of the config) shared by ``finetune`` and ``search``."""
    g.add_argument("--weight-quant", dest="quant.weight_method",
                   choices=["lsq", "maxabs", "dorefa"])
    g.add_argument("--act-quant", dest="quant.act_method", choices=["lsq", "pact"])
    g.add_argument("--per-channel", dest="quant.per_channel",
                   action=argparse.BooleanOptionalAction, default=None)


def add_run_dir_args(g: argparse._ActionsContainer, default_out: str, resume_help: str) -> None:
    """Seed, device and run-folder flags shared by every command that writes a run folder."""
    g.add_argument("--seed", dest="seed", type=int)
    g.add_argument("--device", dest="device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--out", dest="out", metavar="RUN_DIR",
                   help=f"run folder (default: {default_out})")
    g.add_argument("--overwrite", dest="overwrite", action="store_true", default=None,
                   help="replace the run already in --out")
    g.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help=resume_help)


def overrides(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Flags the user gave (not None), as dotted config keys."""
    internal = {"func", "command", "config", "json", *skip}
    return {k: v for k, v in vars(args).items() if v is not None and k not in internal}


def build_parser() -> argparse.ArgumentParser:
    from mpqkit import __version__

    parser = argparse.ArgumentParser(
        prog="mpqkit", description="Mixed-precision quantization: search, transfer, fine-tune, "
        "evaluate and export per-layer bit-width policies.")
    parser.add_argument("--version", action="version", version=f"mpqkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):
                continue  # optional subcommand module not present
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MpqkitError as exc:
        print(f"mpqkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mpqkit: interrupted; finished epochs are saved: continue with --resume",
              file=sys.stderr)
        return 130


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def require(value: Any, flag: str, hint: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"missing {flag}: {hint}")
    return value


if __name__ == "__main__":
    sys.exit(main())
