"""Subcommands ``info``, ``train``, ``finetune`` and ``eval``."""

from __future__ import annotations

import argparse
from typing import Any

from mpqkit.cli.args import (
    add_data_args,
    add_optim_args,
    add_quant_args,
    add_run_dir_args,
    overrides,
    print_json,
    prints_results,
    require,
    section,
)


def add_run_args(p: argparse.ArgumentParser, quantized: bool) -> None:
    """Flags of :class:`~mpqkit.engine.config.RunConfig` for ``train`` / ``finetune``."""
    p.add_argument("--config", metavar="FILE.yaml", help="YAML defaults; flags override them")
    p.add_argument("--model", dest="model", metavar="NAME",
                   help="resnet20, resnet18_cifar, a torchvision name, or package.module:factory")
    p.add_argument("--num-classes", dest="num_classes", type=int, metavar="N")
    p.add_argument("--input-size", dest="input_size", type=int, metavar="PX",
                   help="resolution the model trains at and its BitOps are counted at; the "
                        "images are resized to it (default: the dataset's native size)")
    p.add_argument("--weights", dest="weights", metavar="FILE",
                   help="full-precision weights: a .safetensors or PyTorch state dict (.pth, .pt,"
                        " .bin, .ckpt; read weights-only), 'bundled', or 'torchvision[:NAME]' "
                        "(torchvision's pretrained weights from the torch hub cache)")
    p.add_argument("--weights-map", dest="weights_map", metavar="OLD=NEW[,OLD=NEW]",
                   help="rename key prefixes of --weights first, e.g. linear=fc")
    p.add_argument("--new-head", dest="new_head", action=argparse.BooleanOptionalAction,
                   default=None, help="start the classifier (last Linear) from random weights, "
                                      "e.g. for another number of classes than --weights has")
    p.add_argument("--epochs", dest="epochs", type=int, metavar="N")
    p.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int, metavar="N",
                   help="cut every epoch short (quick checks)")
    p.add_argument("--eval-every", dest="eval_every", type=int, metavar="N",
                   help="evaluate every N epochs (and after the last; default 1)")
    add_run_dir_args(p, "runs/COMMAND/MODEL-DATA-TIME", "continue the interrupted run in --out")
    p.add_argument("--amp", dest="amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on GPU")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction,
                   default=None, help="torch.compile the model for training (after calibration)")
    add_data_args(p)
    add_optim_args(p)
    if quantized:
        q = p.add_argument_group("quantization")
        q.add_argument("--policy", dest="policy", metavar="FILE|wWaA",
                       help="policy.json, or a uniform policy such as w4a4")
        q.add_argument("--first-last", dest="first_last", choices=["8bit", "fp"],
                       help="first conv / last linear of a uniform policy: 8/8 (default) or FP")
        add_quant_args(q)
        q.add_argument("--fold-bn", dest="quant.fold_bn", action=argparse.BooleanOptionalAction,
                       default=None, help="train with each BatchNorm folded into the "
                       "convolution before it, the form export writes (default on for finetune;"
                       " the library's QuantConfig and older checkpoints: off)")
        q.add_argument("--calib-batches", dest="calib_batches", type=int, metavar="N")
        q.add_argument("--kd-alpha", dest="kd_alpha", type=float,
                       help="weight of distillation from the FP model (0 = off)")
        q.add_argument("--kd-temperature", dest="kd_temperature", type=float)


def _run(args: argparse.Namespace, quantized: bool) -> int:
    from mpqkit.engine import RunConfig, finetune, load_run_config, train

    over = overrides(args)
    if quantized:
        over = _fold_by_default(args.config, over)
    cfg = load_run_config(RunConfig, args.config, over)
    result = (finetune if quantized else train)(cfg)
    if not prints_results():
        return 0
    print(f"result: {result.summary()}")
    print(f"run folder: {result.run_dir}")
    return 0


def _fold_by_default(config: str | None, over: dict[str, Any]) -> dict[str, Any]:
    """``mpqkit finetune`` is export-bound: BatchNorm folded unless the flag, the YAML or the
    resumed run's config says otherwise."""
    from mpqkit.engine.config import read_yaml

    if "quant.fold_bn" in over or over.get("resume"):
        return over
    if config and "fold_bn" in (read_yaml(config).get("quant") or {}):
        return over
    return {**over, "quant.fold_bn": True}


def cmd_train(args: argparse.Namespace) -> int:
    return _run(args, quantized=False)


def cmd_finetune(args: argparse.Namespace) -> int:
    return _run(args, quantized=True)


def cmd_info(args: argparse.Namespace) -> int:
    from mpqkit.info import model_info

    res = model_info(args.model, num_classes=args.num_classes, input_size=args.input_size,
                     policy=args.policy, first_last=args.first_last)
    if args.json:
        print_json(res)
    else:
        print(format_info(res))
    return 0


def format_info(res: dict[str, Any]) -> str:
    from mpqkit.complexity import format_count

    h, w = res["input_size"]
    lines = [f"{res['model']} at {h}x{w} ({res['num_classes']} classes)", ""]
    with_bits = "w_bits" in next(iter(res["layers"]))
    head = f"{'layer':<34} {'kind':<6} {'MACs':>10} {'params':>9}"
    if with_bits:
        head += f" {'w':>3} {'a':>3} {'BitOps':>10}"
    lines += [head, "-" * len(head)]
    for r in res["layers"]:
        s = f"{r['name']:<34} {r['kind']:<6} {format_count(r['macs']):>10} {r['params']:>9}"
        if with_bits:
            s += f" {r['w_bits']:>3} {r['a_bits']:>3} {format_count(r['bitops']):>10}"
        lines.append(s)
    t = res["totals"]
    lines += ["", f"quantizable layers: {len(res['layers'])}",
              f"MACs: {format_count(t['macs'])} ({t['macs']:,})",
              f"weights: {t['params']:,} ({t['params'] * 4 / 1e6:.3f} MB at fp32)"]
    if "bitops" in t:
        lines += [f"BitOps: {format_count(t['bitops'])} ({t['bitops']:,}), size "
                  f"{t['size_mb']:.4f} MB, average bits w{t['avg_w_bits']:.2f}/a"
                  f"{t['avg_a_bits']:.2f}" + (f", full-precision MACs {format_count(t['fp_macs'])}"
                                               if t["fp_macs"] else "")]
    lines.append(res["conventions"])
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from mpqkit.engine import evaluate

    ckpt = require(args.checkpoint, "--checkpoint", "pass RUN_DIR/best.safetensors")
    res = evaluate(ckpt, section(args, "data", ["checkpoint", "device"]),
                   device=args.device or "auto")
    if args.json:
        print_json(res)
    else:
        print(format_eval(res))
    return 0


def format_eval(res: dict[str, Any]) -> str:
    line = (f"{res['model']} {res['checkpoint']}: top-1 {res['top1']:.2f}%, top-5 "
            f"{res['top5']:.2f}%, loss {res['loss']:.4f} on {res['data']}")
    if "bitops" in res:
        line += (f"; BitOps {res['bitops'] / 1e9:.4f}G, size {res['size_mb']:.4f} MB, "
                 f"avg bits w{res['avg_w_bits']:.2f}/a{res['avg_a_bits']:.2f}")
    return line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="layer table: names, MACs, params (and bits of a policy)")
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None,
                   help="resolution the complexity is computed at (default: the model's native)")
    p.add_argument("--policy", default=None, help="policy.json or wWaA to show bits and BitOps")
    p.add_argument("--first-last", choices=["8bit", "fp"], default="8bit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a full-precision baseline")
    add_run_args(p, quantized=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="quantization-aware fine-tuning with a policy")
    add_run_args(p, quantized=True)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a test split")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    add_data_args(p, train=False)
    p.set_defaults(func=cmd_eval)
