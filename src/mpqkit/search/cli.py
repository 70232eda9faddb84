"""Subcommand ``mpqkit search``: a thin shell over :func:`mpqkit.search.search`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpqkit.cli import add_data_args, add_quant_args, add_run_dir_args, overrides, print_json

METHODS_HELP = ("asga (default), edmips, gmpq, seam; hawq, uniform, random where their modules "
                "are installed")


def _bits(text: str) -> str:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"bit candidates {text!r} must be integers separated by "
                                         "commas, e.g. 2,3,4,6")
    return ",".join(parts)


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML defaults; flags override them")
    p.add_argument("--method", dest="method", metavar="NAME", help=METHODS_HELP)
    p.add_argument("--model", dest="model", metavar="NAME",
                   help="resnet20, resnet18_cifar, a torchvision name, or package.module:factory")
    p.add_argument("--num-classes", dest="num_classes", type=int, metavar="N")
    p.add_argument("--input-size", dest="input_size", type=int, metavar="PX",
                   help="deployment resolution the complexity is counted at (default: the data's)")
    p.add_argument("--weights", dest="weights", metavar="FILE",
                   help="start from full-precision weights (safetensors, or 'bundled'); default: "
                        "random initialisation")
    b = p.add_argument_group("search space and budget")
    b.add_argument("--w-bits", dest="w_bits", type=_bits, metavar="B,B,..",
                   help="weight bit candidates (default 2,3,4,6)")
    b.add_argument("--a-bits", dest="a_bits", type=_bits, metavar="B,B,..",
                   help="activation bit candidates (default 2,3,4,6)")
    b.add_argument("--budget", dest="budget", metavar="wWaA",
                   help="BitOps of the uniform policy wWaA, e.g. w4a4")
    b.add_argument("--budget-bitops", dest="budget_bitops", metavar="N",
                   help="absolute BitOps, e.g. 1.2G")
    b.add_argument("--budget-size-mb", dest="budget_size_mb", type=float, metavar="MB",
                   help="weight storage in MB (10^6 bytes)")
    b.add_argument("--tol", dest="tol", type=float,
                   help="the policy lands in [(1-tol) x budget, budget] (default 0.02)")
    b.add_argument("--first-last", dest="first_last", choices=["8bit", "fp", "search"],
                   help="first conv / last linear: fixed 8/8 (default, counted in BitOps), fixed "
                        "full precision (not counted), or searched")
    s = p.add_argument_group("schedule")
    s.add_argument("--epochs", dest="epochs", type=int, metavar="N")
    s.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int, metavar="N")
    s.add_argument("--lr-w", dest="lr_w", type=float, help="weights (default 0.1)")
    s.add_argument("--lr-alpha", dest="lr_alpha", type=float, help="logits (default 0.01)")
    s.add_argument("--momentum", dest="momentum", type=float)
    s.add_argument("--weight-decay", dest="weight_decay", type=float)
    s.add_argument("--schedule", dest="schedule", choices=["step", "cosine", "constant"])
    s.add_argument("--step-size", dest="step_size", type=int, metavar="EPOCHS",
                   help="x0.1 every this many epochs (schedule=step, default 10)")
    s.add_argument("--warmup-epochs", dest="warmup_epochs", type=float)
    s.add_argument("--lambda-lr", dest="lambda_lr", type=float,
                   help="dual-ascent step of the budget multiplier lambda (default 0.5)")
    s.add_argument("--lambda-on", dest="lambda_on", choices=["argmax", "expected"],
                   help="cost that drives lambda: of the argmax policy (default) or expected")
    s.add_argument("--calib-batches", dest="calib_batches", type=int, metavar="N")
    s.add_argument("--bilevel", dest="bilevel", action=argparse.BooleanOptionalAction,
                   default=None, help="logits on a held-out part of the proxy set")
    s.add_argument("--val-fraction", dest="val_fraction", type=float,
                   help="held-out fraction for --bilevel (default 0.5)")
    a = p.add_argument_group("asga")
    a.add_argument("--rho0", dest="rho0", type=float)
    a.add_argument("--rho-max", dest="rho_max", type=float)
    a.add_argument("--rho-min", dest="rho_min", type=float)
    a.add_argument("--gamma", dest="gamma", type=float)
    a.add_argument("--adaptive", dest="adaptive", action=argparse.BooleanOptionalAction,
                   default=None)
    a.add_argument("--h-ema", dest="h_ema", type=float)
    a.add_argument("--perturb-logits", dest="perturb_logits",
                   action=argparse.BooleanOptionalAction, default=None)
    g = p.add_argument_group("gmpq / seam / hawq")
    g.add_argument("--teacher", dest="teacher", metavar="CKPT",
                   help="gmpq: FP teacher checkpoint (default: train one on the proxy set)")
    g.add_argument("--teacher-epochs", dest="teacher_epochs", type=int)
    g.add_argument("--attr-weight", dest="attr_weight", type=float)
    g.add_argument("--attr-power", dest="attr_power", type=float)
    g.add_argument("--seam-weight", dest="seam_weight", type=float)
    g.add_argument("--seam-margin", dest="seam_margin", type=float)
    g.add_argument("--hawq-batches", dest="hawq_batches", type=int)
    g.add_argument("--hawq-iters", dest="hawq_iters", type=int)
    q = p.add_argument_group("quantization")
    add_quant_args(q)
    r = p.add_argument_group("run")
    add_run_dir_args(r, "runs/search/METHOD-MODEL-DATA-TIME",
                     "continue the interrupted search in --out (more --epochs allowed)")
    r.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction,
                   default=None, help="progress bars")
    r.add_argument("--json", action="store_true", help="print the policy as JSON")
    add_data_args(p)


def cmd_search(args: argparse.Namespace) -> int:
    from mpqkit.errors import ConfigError
    from mpqkit.search.loop import load_search_config, search

    over = overrides(args)
    config = args.config
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR: the folder of the search to continue")
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"nothing to resume in {args.out}: it holds no config.yaml; drop "
                              "--resume to start a new search")
        config = saved  # flags given now override the saved run's settings
    cfg = load_search_config(config, over)
    result = search(cfg)
    if args.json:
        print_json(result.policy.to_dict())
    else:
        print(f"result: {result.summary()}")
        print(f"policy: {result.run_dir / 'policy.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search a mixed-precision policy under a budget",
                       description="Search per-layer bit-widths on a proxy set under a complexity "
                       "budget (asga, edmips, gmpq, seam, ...); writes RUN_DIR/policy.json.")
    add_search_args(p)
    p.set_defaults(func=cmd_search)
