"""Export benchmark: ONNX QDQ vs float ONNX latency in onnxruntime (CPU), packed size vs policy.

Exports a checkpoint (or, with none given, a freshly quantized ResNet-20 with a mixed 2..8-bit
policy calibrated on random data) three ways: QDQ with INT4 weights (opset 21, ``auto``), QDQ
with int8 containers only (``--int-types int8``) and the float model. For each it measures the
onnxruntime CPU latency per image at batch 1 and batch 64 (median over ``--runs`` timed runs
after ``--warmup`` runs, ``--threads`` intra-op threads, all graph optimisations; QDQ graphs
also with ``session.disable_quant_qdq=1``, which lets onnxruntime fold the constant weight
DequantizeLinear into float weights), the file size,
and the agreement with PyTorch on random inputs (or on ``--verify-subset`` CIFAR-10 test images
when ``--data-dir`` holds the archive). The packed file's size is set against the policy's size.
Run:

    python benchmarks/bench_export.py --out bench_export.json
    python benchmarks/bench_export.py --checkpoint RUN_DIR/best.safetensors --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from mpqkit import Policy, build_model, calibrate, quantize_model
from mpqkit.complexity import profile_model
from mpqkit.engine.config import to_dict
from mpqkit.export.onnx_export import export_onnx
from mpqkit.export.packed import save_packed
from mpqkit.export.verify import make_session, verify_onnx
from mpqkit.quant import QuantConfig, dequantize_model

CYCLE = [(2, 2), (3, 3), (4, 4), (6, 6), (8, 8), (4, 2), (2, 4), (3, 6)]


def fresh_model(name: str, per_channel: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A mixed-precision model calibrated on random data (BN statistics from random data)."""
    torch.manual_seed(0)
    fp = build_model(name)
    fp.train()
    with torch.no_grad():
        for _ in range(2):
            fp(torch.randn(32, 3, 32, 32))
    fp.eval()
    names = list(profile_model(fp, 32))
    bits = {n: CYCLE[i % len(CYCLE)] for i, n in enumerate(names)}
    bits[names[0]], bits[names[-1]] = (8, 8), (8, 8)
    policy = Policy.from_bits(fp, bits, 32, model_name=name,
                              provenance={"method": "bench_export mixed"})
    cfg = QuantConfig(per_channel=per_channel)
    q = quantize_model(fp, policy, cfg)
    calibrate(q, torch.randn(16, 3, 32, 32))
    meta = {"model": name, "num_classes": 10, "input_size": 32, "dataset": "cifar10",
            "policy": policy.to_dict(), "quant": to_dict(cfg)}
    return q.eval(), meta


def latency(path: Path, shape: tuple[int, ...], batch: int, threads: int, runs: int,
            warmup: int, config: dict[str, str] | None = None) -> dict[str, float]:
    """Median (and quartiles) of onnxruntime wall time per image, in milliseconds."""
    sess = make_session(path, threads, config)
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3 / batch)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return {"median_ms_per_image": statistics.median(times), "p25": q[0], "p75": q[2],
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="RUN_DIR/best.safetensors (QAT)")
    ap.add_argument("--model", default="resnet20", help="model of the fresh mixed policy")
    ap.add_argument("--per-channel", action="store_true", help="fresh model: per-channel")
    ap.add_argument("--opset", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--data-dir", default=None, help="folder with cifar10-jpeg.tar.gz")
    ap.add_argument("--verify-subset", type=int, default=200,
                    help="CIFAR-10 test images for the agreement check (with --data-dir)")
    ap.add_argument("--work-dir", default=None, help="where the exported files go (default: "
                    "a temporary folder)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        from mpqkit.engine.trainer import load_checkpoint_model

        model, meta = load_checkpoint_model(args.checkpoint)
        if not meta.get("policy"):
            raise SystemExit("bench_export: the checkpoint has no policy: pass a QAT checkpoint")
    else:
        model, meta = fresh_model(args.model, args.per_channel)
    size = meta.get("input_size") or 32
    shape = (3, size, size)
    policy = Policy.from_dict(meta["policy"])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)

    variants = {
        "qdq": dict(fp=False, int_types="auto", opset=args.opset),
        "qdq_int8": dict(fp=False, int_types="int8", opset=args.opset),
        "fp": dict(fp=True, int_types="auto", opset=args.opset),
    }
    if args.data_dir:
        from mpqkit.data import DataConfig, build_data, make_loader

        bundle = build_data(DataConfig(name="cifar10", data_dir=args.data_dir,
                                       test_subset=args.verify_subset))
        loader: Any = make_loader(bundle.test, 100, train=False)
        check_on = f"{len(bundle.test)} CIFAR-10 test images"
    else:
        torch.manual_seed(1)
        loader = [(torch.randn(100, *shape), None) for _ in range(2)]
        check_on = "200 random inputs"
    results: dict[str, Any] = {}
    for name, kw in variants.items():
        path = work / f"{name}.onnx"
        src = dequantize_model(model) if kw["fp"] else model
        t = time.perf_counter()
        summary = export_onnx(src, path, input_size=size, meta=meta, **kw)
        export_s = time.perf_counter() - t
        agree = verify_onnx(src, path, loader, threads=args.threads)
        results[name] = {
            "file_bytes": summary["bytes"], "export_seconds": round(export_s, 3),
            "latency": {f"batch{b}": latency(path, shape, b, args.threads, args.runs,
                                             args.warmup) for b in args.batch_sizes},
            "agreement_with_torch": {k: agree[k] for k in ("images", "agreement",
                                                           "max_logit_diff", "torch_top1",
                                                           "onnx_top1", "top1_diff")},
        }
        if not kw["fp"]:
            # onnxruntime keeps DequantizeLinear of constant weights (to find integer kernels);
            # with its QDQ handling off, constant folding turns them into float weights once.
            results[name]["latency_qdq_handling_off"] = {
                f"batch{b}": latency(path, shape, b, args.threads, args.runs, args.warmup,
                                     {"session.disable_quant_qdq": "1"})
                for b in args.batch_sizes}
        lat = ", ".join(f"b{b} {results[name]['latency'][f'batch{b}']['median_ms_per_image']:.3f}"
                        for b in args.batch_sizes)
        if "latency_qdq_handling_off" in results[name]:
            off = results[name]["latency_qdq_handling_off"]
            lat += " (QDQ handling off: " + ", ".join(
                f"b{b} {off[f'batch{b}']['median_ms_per_image']:.3f}"
                for b in args.batch_sizes) + ")"
        print(f"{name:9s} {summary['bytes'] / 1e3:8.1f} kB  ms/image: {lat}  agreement "
              f"{agree['agreement']:.1f}% max|dlogit| {agree['max_logit_diff']:.3g}")
    packed = save_packed(model, work / "model.mpq", meta)
    print(f"packed    {packed['file_bytes'] / 1e3:8.1f} kB  weights {packed['weight_bytes']} B vs "
          f"policy {packed['policy_size_bytes']:.0f} B (x{packed['weight_vs_policy']:.4f}); "
          f"overhead {packed['overhead_bytes']} B (header {packed['header_bytes']}, scales "
          f"{packed['scale_bytes']}, other float {packed['other_float_bytes']})")
    c = policy.complexity()
    out = {
        "model": meta["model"], "checkpoint": args.checkpoint, "policy": policy.describe(),
        "policy_size_bytes": c.size_mb * 1e6, "fp32_weight_bytes": c.params * 4,
        "opset": args.opset, "threads": args.threads, "runs": args.runs,
        "agreement_checked_on": check_on,
        "onnxruntime": ort.__version__, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "variants": results,
        "packed": packed,
        "qdq_vs_fp_latency": {f"batch{b}": results["qdq"]["latency"][f"batch{b}"]
                              ["median_ms_per_image"] / results["fp"]["latency"][f"batch{b}"]
                              ["median_ms_per_image"] for b in args.batch_sizes},
    }
    text = json.dumps(out, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
