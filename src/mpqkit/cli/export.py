"""Subcommands ``export`` (ONNX QDQ / float ONNX / packed integer file) and ``inspect``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mpqkit.cli.args import add_data_args, print_json, require, section
from mpqkit.export import DEFAULT_OPSET, INT_TYPES


def _default_out(ckpt: str, fmt: str, fp: bool) -> Path:
    stem = Path(ckpt)
    stem = stem.with_suffix("") if stem.suffix in (".safetensors", ".json") else stem
    if fmt == "packed":
        return stem.with_suffix(".mpq")
    return stem.with_name(stem.name + (".fp.onnx" if fp else ".onnx"))


def _format_export(summary: dict[str, Any]) -> str:
    if summary.get("format") == "onnx":
        layers = summary["layers"]
        types = sorted({t for r in layers for t in (r["w_type"], r["a_type"]) if t != "float"})
        kind = "float" if summary["fp"] else "QDQ"
        return (f"wrote {summary['path']}: {kind} ONNX opset {summary['opset']}, "
                f"{summary['bytes']} bytes, {len(layers)} Conv/Linear layers"
                + (f", integer types {', '.join(types)}" if types else "")
                + (f"; BatchNorm folded at export into {len(summary['folded_at_export'])} layers"
                   " trained unfolded (weight scales rescaled per channel; --verify reports the "
                   "change)" if summary.get("folded_at_export") else ""))
    return (f"wrote {summary['path']}: {summary['file_bytes']} bytes; quantized weights "
            f"{summary['weight_bytes']} bytes = x{summary['weight_vs_policy']:.4f} the policy "
            f"size ({summary['policy_size_bytes']:.0f} bytes); overhead "
            f"{summary['overhead_bytes']} bytes (header {summary['header_bytes']}, scales "
            f"{summary['scale_bytes']}, other float tensors {summary['other_float_bytes']})")


def cmd_export(args: argparse.Namespace) -> int:
    from mpqkit.export.onnx_export import export_checkpoint
    from mpqkit.export.verify import check_verification, format_verification, verify_export

    ckpt = require(args.checkpoint, "--checkpoint", "pass RUN_DIR/best.safetensors")
    out = Path(args.out) if args.out else _default_out(ckpt, args.format, args.fp)
    summary, model, meta = export_checkpoint(ckpt, out, format=args.format, opset=args.opset,
                                             fp=args.fp, int_types=args.int_types,
                                             fold_bn=args.fold_bn)
    result: dict[str, Any] = {"export": summary}
    if not args.json:
        print(_format_export(summary))
    if args.verify:
        result["verify"] = verify_export(model, meta, out, args.format, section(args, "data"),
                                         threads=args.threads)
        if not args.json:
            print(format_verification(result["verify"]))
    if args.json:
        print_json(result)
    if args.verify:
        check_verification(result["verify"], args.tolerance)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mpqkit.export.inspection import format_inspection, inspect_file

    report = inspect_file(args.file)
    if args.json:
        print_json(report)
    else:
        print(format_inspection(report))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint: ONNX with QuantizeLinear/"
                       "DequantizeLinear, float ONNX, or a packed integer file")
    p.add_argument("--checkpoint", metavar="FILE", help="RUN_DIR/best.safetensors")
    p.add_argument("--format", choices=["onnx", "packed"], default="onnx",
                   help="onnx (QDQ graph; default) or packed (.mpq, weights bit-packed at their "
                        "own widths)")
    p.add_argument("--out", metavar="FILE",
                   help="output file (default: beside the checkpoint, .onnx / .fp.onnx / .mpq)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}: INT4 needs 21, INT2 25)")
    p.add_argument("--fp", action="store_true",
                   help="export the float model (quantizers dropped), e.g. for latency "
                        "comparison or a full-precision checkpoint")
    p.add_argument("--int-types", choices=INT_TYPES, default="int8",
                   help="weights: int8 (default) = int8 containers, the form onnxruntime runs "
                        "on integer kernels (it has none for INT4 Conv weights); auto = INT4 "
                        "(opset>=21) / INT2 (opset>=25) where they fit, else int8: smaller "
                        "files, slower; native = as auto but fail instead of falling back to "
                        "int8. Activations are always uint8/int8 + Clip")
    p.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold each BatchNorm after a quantized convolution into it (default), "
                        "also for checkpoints fine-tuned without --fold-bn (their weight scales "
                        "rescaled per channel)")
    p.add_argument("--verify", action="store_true",
                   help="run the export next to the PyTorch model on the test set; fail if "
                        "top-1 differs by more than --tolerance points")
    p.add_argument("--tolerance", type=float, default=0.1, metavar="POINTS",
                   help="largest top-1 difference --verify accepts (default 0.1)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads for --verify")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_data_args(p, train=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="per-layer bits present in an exported .onnx or .mpq "
                       "file, checked against its embedded policy")
    p.add_argument("file", help="model.onnx or model.mpq")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
