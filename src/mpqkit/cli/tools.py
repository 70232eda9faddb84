"""Subcommands ``transfer``, ``sharpness`` and ``report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mpqkit.cli.args import add_data_args, print_json, section
from mpqkit.errors import ConfigError


def cmd_transfer(args: argparse.Namespace) -> int:
    from mpqkit.transfer import transfer_policy

    target, rep = transfer_policy(args.policy, args.model, args.num_classes, args.input_size,
                                  budget_check=args.budget_check, out=args.out)
    if args.json:
        print_json(rep)
        return 0
    h, w = rep["input_size"]
    print(f"transferred {rep['layers']} layers: {rep['source_model'] or 'policy'} at "
          f"{rep['source_input_size'][0]}x{rep['source_input_size'][1]} -> {rep['target_model']} "
          f"({rep['num_classes']} classes) at {h}x{w}")
    print(f"target: {target.describe()}")
    print(rep["message"])
    if args.out:
        print(f"saved {args.out}")
    return 0


def default_sharpness_dir(checkpoint: str) -> Path:
    """``sharpness-<stem>/`` beside the checkpoint (``runs/qat/sharpness-best``)."""
    ckpt = Path(checkpoint)
    return ckpt.with_name(f"sharpness-{ckpt.name.split('.')[0]}")


def sharpness_out(checkpoint: str, out: str | None) -> Path:
    """``--out``, else :func:`default_sharpness_dir`; created before measuring.

    Nothing is created for a checkpoint that does not exist (the loader names the problem).
    """
    ckpt = Path(checkpoint)
    path = Path(out) if out else default_sharpness_dir(checkpoint)
    if not (ckpt.is_file() or ckpt.with_suffix(".safetensors").is_file()):
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the sharpness results to {path} "
                          f"({exc.strerror or exc}): pass --out DIR to a writable folder") from None
    return path


def cmd_sharpness(args: argparse.Namespace) -> int:
    from mpqkit.sharpness import sharpness_from_checkpoint

    out = sharpness_out(args.checkpoint, args.out)
    if out.is_dir():  # not for a missing checkpoint
        print(f"mpqkit sharpness: results go to {out} (sharpness.json"
              + (f", landscape_{args.landscape}.png" if args.landscape else "") + ")",
              file=sys.stderr, flush=True)
    res = sharpness_from_checkpoint(args.checkpoint, section(args, "data"), rho=args.rho,
                                    batches=args.batches, batch_size=args.batch_size,
                                    split=args.split, landscape=args.landscape,
                                    points=args.points, span=args.span, seed=args.seed,
                                    out=out, device=args.device)
    if args.json:
        print_json(res)
        return 0
    print(format_sharpness(res))
    print(f"wrote {out / 'sharpness.json'}" + (f" and {res['plot']}" if "plot" in res else ""))
    return 0


def format_sharpness(res: dict[str, Any]) -> str:
    lines = [f"{res['checkpoint']} on {res['data']} ({res['split']}, {res['images']} images): "
             f"loss {res['loss']:.4f}, surrogate gap {res['surrogate_gap']:.5f} at rho "
             f"{res['rho']}"]
    if "landscape" in res:
        land = res["landscape"]
        flat = land["loss"] if land["dims"] == 1 else [v for row in land["loss"] for v in row]
        lines.append(f"landscape {land['dims']}-D, {land['points']} points per axis over "
                     f"+-{land['span']}: loss {min(flat):.4f} .. {max(flat):.4f}")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from mpqkit.report import make_report

    res = make_report(args.run_dirs, args.out)
    if args.json:
        print_json(res)
        return 0
    print(res["markdown"], end="")
    for r in res["runs"]:
        for f in r["files"]:
            print(f"wrote {f}")
    print(f"wrote {res['table']} and {res['csv']}")
    return 0


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="map a policy onto another model by layer name and "
                                        "re-check its budget")
    p.add_argument("--policy", required=True, metavar="FILE", help="the proxy policy.json")
    p.add_argument("--model", required=True, metavar="NAME", help="target model, e.g. resnet18")
    p.add_argument("--num-classes", type=int, default=None,
                   help="target classes (default: 1000 for ImageNet-size models, else 10)")
    p.add_argument("--input-size", type=int, default=None,
                   help="target resolution for the complexity (default: the model's native)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the target policy here")
    p.add_argument("--budget-check", action="store_true",
                   help="fail (exit 2) when the budget does not hold on the target")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_transfer)


def _add_sharpness(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sharpness", help="surrogate gap and loss landscape of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="RUN_DIR/best.safetensors (full precision or quantized)")
    p.add_argument("--rho", type=float, default=0.05, help="SAM radius of the surrogate gap")
    p.add_argument("--batches", type=int, default=8, help="number of batches measured")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--landscape", choices=["1d", "2d"], default=None,
                   help="also draw the loss landscape along filter-normalized directions")
    p.add_argument("--points", type=int, default=21, help="landscape points per axis")
    p.add_argument("--span", type=float, default=1.0, help="landscape half-width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write sharpness.json and the plot here (default: "
                        "sharpness-<checkpoint stem>/ beside the checkpoint, e.g. "
                        "runs/qat/sharpness-best/)")
    p.add_argument("--json", action="store_true")
    add_data_args(p, train=False)
    p.set_defaults(func=cmd_sharpness)


def register(sub: argparse._SubParsersAction) -> None:
    _add_transfer(sub)
    _add_sharpness(sub)
    p = sub.add_parser("report", help="plots and a comparison table of run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: the run folder; for several, report/ in the "
                        "folder that holds them, e.g. runs/report)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
