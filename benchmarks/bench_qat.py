"""Training-step throughput: full precision vs. fake-quantized (QAT) ResNet-20, CPU or GPU.

The FP and QAT steps are interleaved (A B A B ...) so that drift in the machine's speed hits
both alike; the medians and their ratio are reported. Run:

    python benchmarks/bench_qat.py --steps 20 --batch-size 128 --out bench_qat.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from benchenv import report_environment
from mpqkit import Policy, build_model, calibrate, quantize_model
from mpqkit.quant import QuantConfig


def _step(model, opt, x, y) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--policy", default="mixed", help="mixed (2/3/4/6-bit layers) or wWaA")
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = report_environment(args.threads or None)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    fp = build_model(args.model).to(dev)
    if args.policy == "mixed":
        base = Policy.uniform(fp, 4, 4, 32)
        cands = [(2, 2), (3, 3), (4, 4), (6, 6), (4, 2), (2, 4)]
        bits = {n: (lp.w_bits, lp.a_bits) if lp.fixed else cands[i % len(cands)]
                for i, (n, lp) in enumerate(base.layers.items())}
        policy = Policy.from_bits(fp, bits, 32)
    else:
        from mpqkit.policy import parse_uniform

        policy = Policy.uniform(fp, *parse_uniform(args.policy), 32)
    qat = quantize_model(fp, policy, QuantConfig(per_channel=args.per_channel)).to(dev)
    x = torch.randn(args.batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    calibrate(qat, x)
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for n, m in
            (("fp", fp), ("qat", qat))}
    models = {"fp": fp.train(), "qat": qat.train()}
    times: dict[str, list[float]] = {"fp": [], "qat": []}
    for i in range(args.warmup + args.steps):
        for name in ("fp", "qat"):
            dt = _step(models[name], opts[name], x, y)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": args.model, "batch_size": args.batch_size, "device": str(dev),
           "threads": torch.get_num_threads(), "policy": policy.describe(),
           "fp_step_ms": 1000 * med["fp"], "qat_step_ms": 1000 * med["qat"],
           "fp_images_per_s": args.batch_size / med["fp"],
           "qat_images_per_s": args.batch_size / med["qat"],
           "qat_over_fp_throughput": med["fp"] / med["qat"], "steps": args.steps}
    res["environment"] = env
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
