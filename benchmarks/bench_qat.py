"""Training-step throughput: full precision vs. fake-quantized (QAT) ResNet-20, CPU or GPU.

Kinds of step, all on the same batch, each with its own copy of the model and SGD optimizer:

* ``fp``: the float model;
* ``qat``: mpqkit's QAT model (``quantize_model``, LSQ weights and activations; on CPU its
  larger tensors run the compiled one-pass kernels of :mod:`mpqkit.quant.fused`);
* ``qat_blocked``: the same model with ``MPQKIT_FUSED=off`` (the blocked eager CPU kernels);
* ``qat_input_grad``: the same model with the stem computing its input's gradient for its
  input step, as before :mod:`mpqkit.quant.adjoint` (``qat`` gets that step's gradient from a
  weight-gradient pass instead);
* ``qat_ref``: the same model on the reference LSQ kernel (``_LSQFunction``, whole-tensor ops:
  what mpqkit ran before the blocked CPU kernel);
* ``qat_torchop``: the same model with every LSQ quantizer replaced by PyTorch's fused
  learnable fake-quant op (``torch._fake_quantize_learnable_per_tensor_affine``, per channel
  ``..._per_channel_affine``: the op of torch.ao's LSQ-style QAT), same steps, same LSQ
  gradient scale;
* with ``--compile``: ``fp_compiled`` and ``qat_compiled`` (``torch.compile`` of ``fp`` and
  ``qat``; the quantizers prepared with ``prepare_for_compile``), with dynamo's graph breaks
  and the graphs compiled during the timed steps (recompilations: 0 expected).

The kinds are interleaved (one step of each per round, A B C A B C ...) so that drift in the
machine's speed hits all alike; the report gives the median step time of each kind and, for
each ratio, the median of the per-round ratios. Every ``--threads`` value is measured in turn::

    python benchmarks/bench_qat.py --threads 1,2 --steps 30 --out benchmarks/results/bench_qat.json
    python benchmarks/bench_qat.py --threads 1,2 --steps 20 --compile \\
        --out benchmarks/results/bench_qat_compile.json
    python benchmarks/bench_qat.py --threads 1,2 --steps 30 --fold-bn \\
        --out benchmarks/results/bench_qat_fold.json

``--fold-bn`` times QAT with BatchNorm folded into the convolutions (``QuantConfig.fold_bn``,
``mpqkit finetune``'s default) as ``qat`` (and its variants), and the unfolded QAT model as
``qat_unfolded``, against the same float model.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mpqkit.quant.quantizers as Q
from benchenv import report_environment, write_json
from mpqkit import Policy, build_model, calibrate, quantize_model
from mpqkit.quant import QuantConfig


def _torchop_quantize(self: Q.LSQQuantizer, x: Tensor) -> Tensor:
    """LSQ through PyTorch's fused learnable fake-quant op (zero point 0, same grad scale)."""
    qmin, qmax = self.int_range()
    n = x.numel() // (self.channels if self.per_channel else 1)
    if not self.per_channel and self.channel_dim == 1:
        n = max(1, x[0].numel())
    grad_scale = 1.0 / math.sqrt(max(1, n) * max(1, qmax))
    scale = self.scale.abs().clamp_min(Q.MIN_RANGE)
    zp = torch.zeros_like(scale)
    if self.per_channel:
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zp, self.channel_dim, qmin, qmax, grad_scale)
    return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, qmin, qmax,
                                                            grad_scale)


def torchop_model(qat: nn.Module) -> nn.Module:
    """A copy of ``qat`` whose LSQ quantizers run the fused ATen op."""
    m = copy.deepcopy(qat)
    for q in m.modules():
        if isinstance(q, Q.LSQQuantizer):
            q._quantize = types.MethodType(_torchop_quantize, q)  # type: ignore[method-assign]
    return input_grad_model(m)  # the op has no constant-input form


def input_grad_model(qat: nn.Module) -> nn.Module:
    """A copy of ``qat`` whose quantizers have no constant-input form (the stem's input step
    gets its gradient through the input's gradient)."""
    m = copy.deepcopy(qat)
    for q in m.modules():
        if isinstance(q, Q.Quantizer):
            q.quantize_constant = lambda x: None  # type: ignore[method-assign]
    return m


def mixed_policy(fp: nn.Module, spec: str) -> Policy:
    if spec == "mixed":  # 2/3/4/6-bit layers, first and last at 8 bits
        base = Policy.uniform(fp, 4, 4, 32)
        cands = [(2, 2), (3, 3), (4, 4), (6, 6), (4, 2), (2, 4)]
        bits = {n: (lp.w_bits, lp.a_bits) if lp.fixed else cands[i % len(cands)]
                for i, (n, lp) in enumerate(base.layers.items())}
        return Policy.from_bits(fp, bits, 32)
    from mpqkit.policy import parse_uniform

    return Policy.uniform(fp, *parse_uniform(spec), 32)


def make_step(model: nn.Module, x: Tensor, y: Tensor, reference: bool = False,
              fused: str = "on") -> Callable[[], float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> float:
        saved = Q._use_cpu_kernel
        if reference:
            Q._use_cpu_kernel = lambda *a: False  # type: ignore[assignment]
        os.environ["MPQKIT_FUSED"] = fused
        try:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if x.is_cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t
        finally:
            Q._use_cpu_kernel = saved
            os.environ.pop("MPQKIT_FUSED")

    return step


def build_steps(args: argparse.Namespace, dev: torch.device) -> tuple[dict[str, Any], str]:
    torch.manual_seed(0)
    fp = build_model(args.model).to(dev)
    policy = mixed_policy(fp, args.policy)
    config = QuantConfig(per_channel=args.per_channel, fold_bn=args.fold_bn)
    qat = quantize_model(fp, policy, config).to(dev)
    x = torch.randn(args.batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    calibrate(qat, x)
    qat_ref = copy.deepcopy(qat)
    steps = {"fp": make_step(fp, x, y), "qat": make_step(qat, x, y),
             "qat_blocked": make_step(copy.deepcopy(qat), x, y, fused="off"),
             "qat_input_grad": make_step(input_grad_model(qat), x, y),
             "qat_ref": make_step(qat_ref, x, y, reference=True),
             "qat_torchop": make_step(torchop_model(qat), x, y)}
    if args.fold_bn:  # the unfolded model too: what folding costs, in the same rounds
        unfolded = quantize_model(fp, policy, QuantConfig(per_channel=args.per_channel)).to(dev)
        calibrate(unfolded, x)
        steps["qat_unfolded"] = make_step(unfolded, x, y)
    if args.compile:
        fpc = copy.deepcopy(fp)
        qc = Q.prepare_for_compile(copy.deepcopy(qat))
        fpc.compile()
        qc.compile()
        steps["fp_compiled"] = make_step(fpc, x, y)
        steps["qat_compiled"] = make_step(qc, x, y)
    return steps, policy.describe()


RATIOS = {  # name: (numerator kind, denominator kind): time ratios, read as throughput ratios
    "qat_over_fp_throughput": ("fp", "qat"),
    "qat_over_torchop_throughput": ("qat_torchop", "qat"),
    "torchop_over_fp_throughput": ("fp", "qat_torchop"),
    "qat_speedup_over_reference_kernel": ("qat_ref", "qat"),
    "qat_speedup_over_blocked_kernel": ("qat_blocked", "qat"),
    "qat_blocked_over_fp_throughput": ("fp", "qat_blocked"),
    "qat_speedup_from_constant_input": ("qat_input_grad", "qat"),
    "qat_input_grad_over_fp_throughput": ("fp", "qat_input_grad"),
    "qat_over_unfolded_throughput": ("qat_unfolded", "qat"),
    "fp_compiled_speedup": ("fp", "fp_compiled"),
    "qat_compiled_speedup": ("qat", "qat_compiled"),
    "qat_compiled_over_fp_compiled_throughput": ("fp_compiled", "qat_compiled"),
}


def measure(args: argparse.Namespace, threads: int, dev: torch.device) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    steps, policy = build_steps(args, dev)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compiles here
        for f in steps.values():
            f()
    warm_s = time.perf_counter() - t0
    stats = torch._dynamo.utils.counters["stats"]
    graphs_warm = stats.get("unique_graphs", 0)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, f in steps.items():
            times[k].append(f())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {name: round(statistics.median(a / b for a, b in zip(times[n], times[d])), 4)
              for name, (n, d) in RATIOS.items() if n in times and d in times}
    res: dict[str, Any] = {
        "threads": torch.get_num_threads(), "policy": policy,
        "step_ms_median": {k: round(1000 * v, 2) for k, v in med.items()},
        "images_per_s": {k: round(args.batch_size / v, 1) for k, v in med.items()},
        "ratios_paired_median": ratios, "warmup_s": round(warm_s, 1)}
    if args.compile:
        c = torch._dynamo.utils.counters
        res["dynamo"] = {"graph_breaks": sum(c["graph_break"].values()),
                         "graph_break_reasons": dict(c["graph_break"]),
                         "graphs_compiled_in_warmup": graphs_warm,
                         "graphs_compiled_in_timed_steps": stats.get("unique_graphs", 0)
                         - graphs_warm}
    print(res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--policy", default="mixed", help="mixed (2/3/4/6-bit layers) or wWaA")
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--fold-bn", action="store_true",
                    help="QAT with BatchNorm folded (mpqkit finetune's default)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma separated")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    thread_list = [int(t) for t in args.threads.split(",")]
    env = report_environment(thread_list[0])
    dev = torch.device(args.device)
    runs = {str(t): measure(args, t, dev) for t in thread_list}
    res = {"model": args.model, "batch_size": args.batch_size, "device": str(dev),
           "per_channel": args.per_channel, "fold_bn": args.fold_bn, "steps": args.steps,
           "warmup": args.warmup, "compile": args.compile, "by_threads": runs, "environment": env}
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
