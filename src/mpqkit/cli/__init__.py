"""The ``mpqkit`` command. Every subcommand is a thin shell over a public function.

* :mod:`mpqkit.cli.args`: flag builders shared by the subcommands (data, quantizer, run folder,
  optimizer, the flags of a config dataclass);
* :mod:`mpqkit.cli.run`: ``info``, ``train``, ``finetune``, ``eval``;
* :mod:`mpqkit.cli.search`: ``search`` (method flags built from the method registry);
* :mod:`mpqkit.cli.export`: ``export``, ``inspect``;
* :mod:`mpqkit.cli.tools`: ``transfer``, ``sharpness``, ``report``.

Configuration precedence: defaults < ``--config FILE.yaml`` < flags. User errors print one line
(``mpqkit: error: ...``) and exit with the error's status (2 for most).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mpqkit.cli import export, run, search, tools
from mpqkit.errors import MpqkitError

SUBCOMMANDS = [run, search, export, tools]  # each has ``register(subparsers)``


def build_parser() -> argparse.ArgumentParser:
    from mpqkit import __version__

    parser = argparse.ArgumentParser(
        prog="mpqkit", description="Mixed-precision quantization: search, transfer, fine-tune, "
        "evaluate and export per-layer bit-width policies.")
    parser.add_argument("--version", action="version", version=f"mpqkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMANDS:
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


__all__ = ["build_parser", "main"]
