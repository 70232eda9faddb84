"""Export benchmark: mpqkit's QDQ export vs onnxruntime's own ``quantize_static`` vs float.

For each model (default: ResNet-20 at 32 px and torchvision ResNet-18 at 224 px, random weights
with BatchNorm statistics from random data, or ``--checkpoint``) it writes, in one process:

* ``mpqkit``: the default export (BatchNorm folded, int8 weight containers) of the model
  quantized with ``--policy`` (default w4a4, first/last 8 bit) trained folded (``fold_bn``)
  and calibrated on random data;
* ``mpqkit_int4``: the same with ``--int-types auto`` (INT4 weight containers);
* ``mpqkit_unfolded``: the model quantized without ``fold_bn``, folded at export;
* ``mpqkit_no_clip`` (timing only): the ``mpqkit`` graph without its integer Clips to the
  b-bit activation ranges. NOT the model's function (integers above the b-bit range pass
  through): it measures what exact b-bit activations cost, since onnxruntime has no integer
  kernel that saturates to a range narrower than its 8-bit container;
* ``mpqkit_w8a8``: the default export of the same model quantized w8a8 (no b-bit Clips:
  the 8-bit container's saturation is the range): mpqkit's graph against ``quantize_static``
  at equal bits;
* ``quantize_static``: onnxruntime's ``quant_pre_process`` (BatchNorm folded) and
  ``quantize_static`` (QDQ, uint8 activations, int8 weights, per tensor) of the float graph;
* ``float``: the float graph.

Latency: onnxruntime CPU, ``--threads`` intra-op threads, all graph optimisations; the variants
are run interleaved (one run of each in turn, ``--runs`` rounds after ``--warmup``), medians per
image at each batch size, and their ratio to ``float``. The kernels that ran are the node types
of the optimized graph (``SessionOptions.optimized_model_filepath``). Agreement with PyTorch on
random inputs is reported for the mpqkit variants (against the model the export computes,
:func:`~mpqkit.export.deploy.export_reference`: with the residual quantizers). Run:

    python benchmarks/bench_export.py --out benchmarks/results/bench_export.json
    python benchmarks/bench_export.py --models resnet20 --runs 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from benchenv import report_environment, write_json
from mpqkit import Policy, build_model, calibrate, quantize_model
from mpqkit.engine.config import to_dict
from mpqkit.export.deploy import export_reference
from mpqkit.export.onnx_export import export_onnx
from mpqkit.export.verify import make_session, verify_onnx
from mpqkit.policy import parse_uniform
from mpqkit.quant import QuantConfig, dequantize_model

SIZES = {"resnet20": 32, "resnet18": 224}


def fresh_model(name: str, size: int, policy_spec: str, fold: bool
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``name`` quantized with a uniform policy (first/last 8 bit), calibrated on random data."""
    torch.manual_seed(0)
    fp = build_model(name)
    fp.train()
    with torch.no_grad():
        for _ in range(2):
            fp(torch.randn(8, 3, size, size))
    fp.eval()
    policy = Policy.uniform(fp, *parse_uniform(policy_spec), size)
    cfg = QuantConfig(fold_bn=fold)
    q = quantize_model(fp, policy, cfg)
    calibrate(q, torch.randn(8, 3, size, size))
    meta = {"model": name, "num_classes": 1000 if size == 224 else 10, "input_size": size,
            "policy": policy.to_dict(), "quant": to_dict(cfg)}
    return q.eval(), meta


def quantize_static_model(fp_path: Path, out: Path, size: int) -> None:
    """onnxruntime's pre-processing (BatchNorm folded) and static QDQ quantization."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp_path), str(pre))
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": rng.standard_normal((4, 3, size, size)).astype(np.float32)}
                            for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def without_bit_clips(src: Path, dst: Path) -> int:
    """Write ``src`` without the integer Clips of its b-bit activation quantizers (see the
    module docstring: timing only); returns how many were removed."""
    m = onnx.load(str(src))
    clips = [n for n in m.graph.node if n.op_type == "Clip" and "_clip" in n.name]
    alias = {n.output[0]: n.input[0] for n in clips}
    for n in clips:
        m.graph.node.remove(n)
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = alias.get(name, name)
    onnx.save(m, str(dst))
    return len(clips)


def kernels(path: Path, threads: int) -> dict[str, int]:
    """Node types of onnxruntime's optimized graph: the kernels that run."""
    opt = path.with_suffix(".optimized.onnx")
    make_session(path, threads, optimized_path=opt)
    return dict(Counter(n.op_type for n in onnx.load(str(opt)).graph.node).most_common())


def interleaved(paths: dict[str, Path], size: int, batch: int, threads: int, runs: int,
                warmup: int) -> dict[str, dict[str, float]]:
    """Median ms per image of each variant, the variants run one after another per round."""
    sessions = {k: make_session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(warmup + runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"input": x})
            if r >= warmup:
                times[k].append((time.perf_counter() - t) * 1e3 / batch)
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), 0.0, max(v)]
        out[k] = {"median_ms_per_image": statistics.median(v), "p25": q[0], "p75": q[2],
                  "runs": len(v)}
    return out


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = SIZES.get(name, 224)
    folded, meta = fresh_model(name, size, args.policy, fold=True)
    unfolded, _ = fresh_model(name, size, args.policy, fold=False)
    w8a8, meta8 = fresh_model(name, size, "w8a8", fold=True)
    paths = {k: work / f"{name}_{k}.onnx" for k in
             ("float", "quantize_static", "mpqkit", "mpqkit_no_clip", "mpqkit_w8a8",
              "mpqkit_int4", "mpqkit_unfolded")}
    export_onnx(dequantize_model(unfolded), paths["float"], input_size=size, fp=True)
    quantize_static_model(paths["float"], paths["quantize_static"], size)
    export_onnx(folded, paths["mpqkit"], input_size=size, meta=meta)
    clips = without_bit_clips(paths["mpqkit"], paths["mpqkit_no_clip"])
    export_onnx(w8a8, paths["mpqkit_w8a8"], input_size=size, meta=meta8)
    export_onnx(folded, paths["mpqkit_int4"], input_size=size, meta=meta, int_types="auto")
    export_onnx(unfolded, paths["mpqkit_unfolded"], input_size=size, meta=meta)
    torch.manual_seed(1)
    loader = [(torch.randn(8, 3, size, size), None) for _ in range(2)]
    agree = {k: verify_onnx(export_reference(m), paths[k], loader, threads=args.threads)
             for k, m in (("mpqkit", folded), ("mpqkit_unfolded", unfolded),
                          ("mpqkit_w8a8", w8a8))}
    res: dict[str, Any] = {"input_size": size, "policy": Policy.from_dict(meta["policy"])
                           .describe(), "bit_clips_removed_in_mpqkit_no_clip": clips,
                           "kernels": {k: kernels(p, args.threads) for k, p in paths.items()},
                           "agreement_with_torch_random_inputs": {
                               k: {f: a[f] for f in ("images", "agreement", "max_logit_diff")}
                               for k, a in agree.items()},
                           "latency": {}, "ratio_to_float": {}}
    for b in args.batch_sizes:
        runs = args.runs if b == 1 else max(3, args.runs // (4 if size > 64 else 2))
        lat = interleaved(paths, size, b, args.threads, runs, args.warmup)
        res["latency"][f"batch{b}"] = lat
        base = lat["float"]["median_ms_per_image"]
        res["ratio_to_float"][f"batch{b}"] = {k: round(v["median_ms_per_image"] / base, 3)
                                              for k, v in lat.items()}
        print(f"{name} batch {b}: float {base:.3f} ms/image; ratio to float "
              + ", ".join(f"{k} {r:.3f}" for k, r in res["ratio_to_float"][f"batch{b}"].items()),
              flush=True)
    for k in ("mpqkit", "mpqkit_w8a8", "quantize_static"):
        print(f"{name} {k} kernels: {res['kernels'][k]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    ap.add_argument("--policy", default="w4a4", help="uniform policy of the quantized model")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--runs", type=int, default=40, help="timed rounds at batch 1 (fewer at 64)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--work-dir", default=None, help="exported files (default: a temp folder)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = report_environment(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"environment": env, "args": vars(args),
           "models": {m: bench_model(m, args, work) for m in args.models}}
    if args.out:
        print(f"wrote {write_json(args.out, out)}")


if __name__ == "__main__":
    main()
