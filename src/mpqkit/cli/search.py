"""Subcommand ``mpqkit search``: a thin shell over :func:`mpqkit.search.search`.

The flags of the common :class:`~mpqkit.search.config.SearchConfig` fields are written here; the
``optim.*`` flags come from :class:`~mpqkit.optim.factory.OptimConfig` and the ``options.*``
flags from the config dataclass of every registered method
(:func:`mpqkit.search.registry.method_specs`), so a new method needs no edit here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from mpqkit.cli.args import (
    add_data_args,
    add_dataclass_flags,
    add_optim_args,
    add_quant_args,
    add_run_dir_args,
    number_list,
    overrides,
    print_json,
    prints_results,
)

# old flat flag names of mpqkit 0.1 kept as aliases of the ``optim.*`` flags
OPTIM_ALIASES = {"lr": ["--lr-w"]}


def methods_help(specs: Sequence[Any]) -> str:
    """``--method`` help: every registered method with its description."""
    items = "; ".join(f"{s.name}: {s.description}" if s.description else s.name for s in specs)
    return f"search method (default asga): {items}".replace("%", "%%")


def _add_model_args(p: argparse.ArgumentParser, specs: Sequence[Any]) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML defaults; flags override them")
    p.add_argument("--method", dest="method", metavar="NAME", help=methods_help(specs))
    p.add_argument("--model", dest="model", metavar="NAME",
                   help="resnet20, resnet18_cifar, a torchvision name, or package.module:factory")
    p.add_argument("--num-classes", dest="num_classes", type=int, metavar="N")
    p.add_argument("--input-size", dest="input_size", type=int, metavar="PX",
                   help="deployment resolution the complexity is counted at (default: the data's)")
    p.add_argument("--weights", dest="weights", metavar="FILE",
                   help="start from full-precision weights (safetensors, or 'bundled'); default: "
                        "random initialisation")


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("search space and budget")
    b.add_argument("--w-bits", dest="w_bits", type=number_list(int, None), metavar="B,B,..",
                   help="weight bit candidates (default 2,3,4,6)")
    b.add_argument("--a-bits", dest="a_bits", type=number_list(int, None), metavar="B,B,..",
                   help="activation bit candidates (default 2,3,4,6)")
    b.add_argument("--budget", dest="budget", metavar="wWaA",
                   help="BitOps of the uniform policy wWaA, e.g. w4a4")
    b.add_argument("--budget-bitops", dest="budget_bitops", metavar="N",
                   help="absolute BitOps, e.g. 1.2G")
    b.add_argument("--budget-size-mb", dest="budget_size_mb", type=float, metavar="MB",
                   help="weight storage in MB (10^6 bytes)")
    b.add_argument("--budget-bits", dest="budget_bits", type=float, metavar="B",
                   help="average bits, e.g. 2.5: the BitOps of every searchable layer at B x B "
                        "bits (first/last at their fixed bits)")
    b.add_argument("--tol", dest="tol", type=float,
                   help="the policy lands in [(1-tol) x budget, budget] (default 0.02)")
    b.add_argument("--first-last", dest="first_last", choices=["8bit", "fp", "search"],
                   help="first conv / last linear: fixed 8/8 (default, counted in BitOps), fixed "
                        "full precision (not counted), or searched")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("schedule")
    s.add_argument("--epochs", dest="epochs", type=int, metavar="N")
    s.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int, metavar="N")
    s.add_argument("--arch-optimizer", dest="arch_optimizer", choices=["sgd", "adam"],
                   help="optimizer of the logits: adam = their own Adam (default), sgd = a group "
                        "of the weights' optimizer (as EdMIPS/GMPQ and mpqkit 0.1)")
    s.add_argument("--lr-alpha", dest="lr_alpha", type=float,
                   help="learning rate of the logits (default 0.05; 0.01 was 0.1's SGD value)")
    s.add_argument("--arch-betas", dest="arch_betas", type=number_list(float, 2), metavar="B1,B2",
                   help="Adam betas of the logits with --arch-optimizer adam (default 0.5,0.999)")
    s.add_argument("--arch-warmup-epochs", dest="arch_warmup_epochs", type=int, metavar="N",
                   help="epochs with the logits frozen and lambda held, the weights warming up "
                        "(default 0)")
    s.add_argument("--alpha-weight-decay", dest="alpha_weight_decay", type=float,
                   help="weight decay of the logits (default 0)")
    s.add_argument("--lambda-lr", dest="lambda_lr", type=float,
                   help="dual-ascent step of the budget multiplier lambda (default 0.5)")
    s.add_argument("--lambda-init", dest="lambda_init", type=float,
                   help="first value of the budget multiplier lambda (default 0)")
    s.add_argument("--dual", dest="dual", choices=["reset", "inequality", "equality"],
                   help="budget multiplier lambda: reset (default; lambda >= 0 on the band's "
                        "lower edge, back to 0 once the argmax fits), inequality (lambda >= 0 "
                        "on the budget, no reset) or equality (lambda may turn negative and "
                        "pull a search below the budget up to the middle of the band)")
    s.add_argument("--lambda-target", dest="lambda_target", type=float, metavar="X",
                   help="argmax cost lambda aims at, x budget (default: 0.95 with --dual reset, "
                        "1 with inequality, 1 - tol/2 with equality)")
    s.add_argument("--lambda-kp", dest="lambda_kp", type=float, metavar="K",
                   help="proportional gain of lambda on the argmax's excess over the target "
                        "(a PI controller; default 0)")
    s.add_argument("--lambda-on", dest="lambda_on", choices=["argmax", "expected"],
                   help="cost that drives lambda: of the argmax policy (default) or expected")
    s.add_argument("--calib-batches", dest="calib_batches", type=int, metavar="N")
    s.add_argument("--bilevel", dest="bilevel", action=argparse.BooleanOptionalAction,
                   default=None, help="logits on a held-out part of the proxy set")
    s.add_argument("--val-fraction", dest="val_fraction", type=float,
                   help="held-out fraction for --bilevel (default 0.5)")


def add_method_flags(g: argparse._ActionsContainer, specs: Sequence[Any]) -> list[str]:
    """One ``options.<field>`` flag per option field of the methods ``specs``, in group ``g``.

    A field several methods share gets one flag, its help naming them (``gmpq, hawq: ...``)
    and showing the default only where they agree on it.
    """
    owners: dict[str, list[str]] = {}
    defaults: dict[str, set[str]] = {}  # repr of each owner's default
    for spec in specs:
        for f in dataclasses.fields(spec.config) if spec.config else ():
            owners.setdefault(f.name, []).append(spec.name)
            defaults.setdefault(f.name, set()).add(repr(getattr(spec.config(), f.name)))
    differ = [name for name, values in defaults.items() if len(values) > 1]
    added: list[str] = []
    for spec in specs:
        if spec.config is not None:
            added += add_dataclass_flags(g, spec.config, "options", skip=added,
                                         help_prefix=lambda name: f"{', '.join(owners[name])}: ",
                                         hide_defaults=differ)
    return added


def add_search_args(p: argparse.ArgumentParser) -> None:
    from mpqkit.search.config import SearchConfig
    from mpqkit.search.registry import method_specs

    specs = method_specs()
    _add_model_args(p, specs)
    _add_budget_args(p)
    _add_schedule_args(p)
    add_optim_args(p, aliases=OPTIM_ALIASES, defaults=SearchConfig().optim)
    methods = p.add_argument_group("method options", "options.* of the config; each flag "
                                   "applies to the methods its help names")
    q = p.add_argument_group("quantization")
    add_quant_args(q)
    r = p.add_argument_group("run")
    add_run_dir_args(r, "runs/search/METHOD-MODEL-DATA-TIME",
                     "continue the interrupted search in --out (more --epochs allowed)")
    r.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction,
                   default=None, help="progress bars")
    r.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction,
                   default=None, help="torch.compile the supernet (after calibration)")
    r.add_argument("--json", action="store_true", help="print the policy as JSON")
    add_data_args(p)
    add_method_flags(methods, specs)  # last: a name another flag has becomes --options-NAME


def cmd_search(args: argparse.Namespace) -> int:
    from mpqkit.engine.config import load_run_config
    from mpqkit.search import search
    from mpqkit.search.config import SearchConfig

    result = search(load_run_config(SearchConfig, args.config, overrides(args)))
    if not prints_results():
        return 0
    if args.json:
        print_json(result.policy.to_dict())
    else:
        print(f"result: {result.summary()}")
        print(f"policy: {result.run_dir / 'policy.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mpqkit.search.registry import available_methods

    p = sub.add_parser("search", help="search a mixed-precision policy under a budget",
                       description="Search per-layer bit-widths on a proxy set under a complexity "
                       f"budget ({', '.join(available_methods())}); writes RUN_DIR/policy.json.")
    add_search_args(p)
    p.set_defaults(func=cmd_search)
