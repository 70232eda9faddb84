"""Search speed: step-time ratios of the supernet methods, and search wall time per method.

Step times (ResNet-20, one CIFAR-10 batch, CPU by default, torch threads fixed) are measured
round-robin (one step of every kind per round) so that load from other processes hits all kinds
alike; the report gives the median over rounds of each kind and the median of the per-round
ratios:

* ``qat``: one step of fixed-policy QAT (``quantize_model`` with uniform w4a4, SGD);
* ``edmips``, ``asga``, ``gmpq``, ``seam``: one step of :class:`mpqkit.search.SupernetSearch`
  (the same code path as ``mpqkit search``), budget w4a4.

Targets (issue 9): edmips/qat <= 1.15 (a supernet step against a QAT step with the same layers
quantized: first conv and last linear fixed at 8 bits in both), asga/edmips <= 2.05 (ASGA runs
two forward/backward passes); gmpq/edmips and seam/edmips are measured. ``--threads 1,2``
measures each thread count in turn (``--kinds`` picks the supernet methods).

Wall time: ``mpqkit.search.search`` per method on ``--images`` CIFAR-10 training images for
``--epochs`` epochs (gmpq includes training its teacher for ``--teacher-epochs``).

    python benchmarks/bench_search.py --data-dir ../shared/data --threads 1 --rounds 7 \\
        --images 1000 --epochs 1 --out runs/bench_search
    python benchmarks/bench_search.py --threads 1,2 --rounds 9 --kinds edmips,asga --skip-wall \\
        --out benchmarks/results/bench_search
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchenv import report_environment
from mpqkit.data import DataConfig
from mpqkit.engine.checkpoint import save_checkpoint
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import calibrate, quantize_model
from mpqkit.search import SearchConfig, SupernetSearch, build_context, get_method, search

LIMITS = {"edmips/qat": 1.15, "asga/edmips": 2.05}
SUPERNET_KINDS = ("edmips", "asga", "gmpq", "seam")


def default_data_dir() -> str:
    env = os.environ.get("MPQKIT_DATA_DIR")
    if env:
        return env
    return str(Path(__file__).resolve().parents[1].parent / "shared" / "data")


def base_config(args: argparse.Namespace, method: str, out: Path, **kw: Any) -> SearchConfig:
    data = DataConfig(name="cifar10", data_dir=args.data_dir, batch_size=args.batch_size,
                      subset=args.images, seed=args.seed)
    return SearchConfig(model="resnet20", method=method, budget="w4a4", epochs=args.epochs,
                        out=str(out), overwrite=True, progress=False, seed=args.seed,
                        device=args.device, data=data, **kw)


def qat_step_fn(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model("resnet20")
    q = quantize_model(model, Policy.uniform(model, 4, 4, 32), inplace=True).to(device)
    calibrate(q, x)
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(q(x), y)
        loss.backward()
        opt.step()
        float(loss.detach())

    return step


def supernet_step_fn(args: argparse.Namespace, method: str, tmp: Path,
                     teacher: Path) -> tuple[Callable[[], None], tuple[torch.Tensor, ...]]:
    kw = {"options": {"teacher": str(teacher)}} if method == "gmpq" else {}
    cfg = base_config(args, method, tmp / method, **kw)
    (tmp / method).mkdir(parents=True, exist_ok=True)
    ctx = build_context(cfg, tmp / method)
    impl = get_method(method).impl()
    run = SupernetSearch(ctx, impl)
    impl.setup(ctx, run.supernet)
    x, y = ctx.batches(1)[0]
    run.supernet.calibrate(x)
    run.supernet.train()

    def step() -> None:
        loss, _, _, _ = run.step(x, y)
        float(loss.detach())

    return step, (x, y)


def measure_steps(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else "cpu")
    teacher = tmp / "teacher"
    fp = build_model("resnet20")
    save_checkpoint(teacher, fp, {"model": "resnet20", "num_classes": 10, "input_size": 32})
    steps: dict[str, Callable[[], None]] = {}
    batch = None
    kinds = [k for k in SUPERNET_KINDS if k in args.kinds.split(",")]
    for kind in kinds:
        steps[kind], batch = supernet_step_fn(args, kind, tmp, teacher.with_suffix(
            ".safetensors"))
    assert batch is not None
    steps["qat"] = qat_step_fn(batch[0], batch[1], device)
    order = ["qat", *kinds]
    for _ in range(args.warmup):
        for k in order:
            steps[k]()
    times: dict[str, list[float]] = {k: [] for k in order}
    for r in range(args.rounds):
        for k in order:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {1e3 * times[k][-1]:.0f} ms" for k in order), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    pairs = {"edmips/qat": ("edmips", "qat"), "asga/edmips": ("asga", "edmips"),
             "gmpq/edmips": ("gmpq", "edmips"), "seam/edmips": ("seam", "edmips")}
    pairs = {k: v for k, v in pairs.items() if v[0] in times and v[1] in times}
    ratios = {k: paired(a, b) for k, (a, b) in pairs.items()}
    ratio_of_medians = {k: med[a] / med[b] for k, (a, b) in pairs.items()}
    return {"batch_size": int(batch[0].shape[0]), "rounds": args.rounds,
            "step_ms_median": {k: round(1e3 * v, 2) for k, v in med.items()},
            "step_ms_all": {k: [round(1e3 * t, 2) for t in v] for k, v in times.items()},
            "ratios_paired_median": {k: round(v, 4) for k, v in ratios.items()},
            "ratios_of_medians": {k: round(v, 4) for k, v in ratio_of_medians.items()},
            "limits": LIMITS,
            "within_limits": {k: ratios[k] <= v for k, v in LIMITS.items() if k in ratios}}


def measure_wall(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in args.methods.split(","):
        kw = {"options": {"teacher_epochs": args.teacher_epochs}} if method == "gmpq" else {}
        cfg = base_config(args, method, tmp / f"wall-{method}", **kw)
        t0 = time.time()
        res = search(cfg)
        total = time.time() - t0
        prov = res.policy.provenance
        cost = prov.get("search_cost", {})
        out[method] = {
            "total_s": round(total, 2), "search_loop_s": round(res.seconds, 2),
            "teacher_train_s": (prov.get("gmpq") or {}).get("teacher_train_seconds"),
            "steps": cost.get("steps"), "forward_passes": cost.get("forward_passes"),
            "images_processed": cost.get("images_processed"),
            "teacher_forward_passes": cost.get("teacher_forward_passes"),
            "policy": res.policy.describe(), "repaired_layers": len(res.repaired_layers)}
        print(f"{method}: {total:.1f}s total, {res.seconds:.1f}s search loop", file=sys.stderr)
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Search speed ({report['device']}, {report['threads']} thread(s), "
             f"torch {report['torch']})", ""]
    st = report.get("steps")
    if st:
        lines += [f"Step time, ResNet-20, batch {st['batch_size']}, median of {st['rounds']} "
                  "round-robin rounds:", "", "| step | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in st["step_ms_median"].items()]
        lines += ["", "| ratio | paired median | ratio of medians | limit |", "|---|---|---|---|"]
        for k, v in st["ratios_paired_median"].items():
            lim = LIMITS.get(k)
            lines.append(f"| {k} | {v:.3f} | {st['ratios_of_medians'][k]:.3f} | "
                         f"{'<= ' + str(lim) if lim else 'measured'} |")
    for t, st_t in report.get("steps_by_threads", {}).items():
        lines += ["", f"{t} thread(s): " + ", ".join(
            f"{k} {v:.3f}" for k, v in st_t["ratios_paired_median"].items())
            + " (paired medians)"]
    wall = report.get("wall")
    if wall:
        lines += ["", f"Search wall time, {report['images']} CIFAR-10 images, "
                  f"{report['epochs']} epoch(s):", "",
                  "| method | total s | search loop s | teacher s | steps | images processed |",
                  "|---|---|---|---|---|---|"]
        for m, w in wall.items():
            lines.append(f"| {m} | {w['total_s']} | {w['search_loop_s']} | "
                         f"{w['teacher_train_s'] if w['teacher_train_s'] is not None else '-'} "
                         f"| {w['steps']} | {w['images_processed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--threads", default="1", help="torch thread counts, comma separated")
    p.add_argument("--kinds", default=",".join(SUPERNET_KINDS),
                   help="supernet methods whose steps are timed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--images", type=int, default=1000, help="CIFAR-10 training images")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--methods", default="edmips,asga,gmpq,seam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--skip-wall", action="store_true")
    p.add_argument("--out", default="runs/bench_search")
    args = p.parse_args(argv)
    thread_list = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(thread_list[0])
    env = report_environment(thread_list[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": env, "device": args.device if args.device != "cpu" else
                              f"cpu ({platform.processor() or platform.machine()})",
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "images": args.images, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if not args.skip_steps:
            report["steps_by_threads"] = {}
            for t in thread_list:
                torch.set_num_threads(t)
                report["steps_by_threads"][str(t)] = measure_steps(args, tmp)
            report["steps"] = report["steps_by_threads"][str(thread_list[0])]
            torch.set_num_threads(thread_list[0])
        if not args.skip_wall:
            report["wall"] = measure_wall(args, tmp)
    (out / "bench_search.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "bench_search.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
