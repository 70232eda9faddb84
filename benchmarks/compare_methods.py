"""Compare search methods end to end: search on a small proxy set, then the same fine-tune.

For each method: ``search`` on ``--subset`` CIFAR-10 images under ``--budget``, then a QAT
fine-tune of the bundled full-precision ResNet-20 with the searched policy on the full CIFAR-10
train set, evaluated on the 10,000 test images. Finished stages are skipped, so an interrupted
comparison continues where it stopped. Results: ``OUT/results.json`` and ``OUT/results.md``.

    python benchmarks/compare_methods.py --out runs/compare --methods asga,edmips,hawq
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchenv import report_environment
from mpqkit.data import DataConfig
from mpqkit.engine import RunConfig, finetune
from mpqkit.policy import Policy
from mpqkit.search import SearchConfig, search

ALL = ["asga", "edmips", "gmpq", "seam", "hawq", "uniform", "random"]
NEEDS_FP = {"hawq"}  # methods that start from trained FP weights (HAWQ's Hessian)


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.out) / method
    sdir, fdir = root / "search", root / "finetune"
    if not (sdir / "policy.json").is_file():
        opts = ({"hawq_batches": args.hawq_batches, "hawq_iters": args.hawq_iters}
                if method == "hawq" else None)
        cfg = SearchConfig(model=args.model, method=method, budget=args.budget,
                           epochs=args.search_epochs, seed=args.seed, out=str(sdir),
                           overwrite=True, progress=False, options=opts)
        cfg.data = DataConfig(name="cifar10", subset=args.subset, seed=args.seed,
                              batch_size=args.search_batch_size)
        if method in NEEDS_FP:
            cfg.weights = "bundled"
        search(cfg)
    policy = Policy.load(sdir / "policy.json")
    prov = policy.provenance
    if args.stage == "search":
        return {}
    if not (fdir / "best.json").is_file():
        rc = RunConfig(model=args.model, weights="bundled", policy=str(sdir / "policy.json"),
                       epochs=args.finetune_epochs, seed=args.seed, out=str(fdir),
                       overwrite=True)
        rc.data = DataConfig(name="cifar10", batch_size=128, seed=args.seed)
        rc.optim.lr = args.finetune_lr
        rc.optim.weight_decay = 4e-5
        finetune(rc)
    best = json.loads((fdir / "best.json").read_text())
    c = policy.complexity()
    return {
        "method": method,
        "bits": {n: [lp.w_bits, lp.a_bits] for n, lp in policy.layers.items()},
        "bitops": c.bitops, "budget": (policy.budget or {}).get("value"),
        "bitops_over_budget": c.bitops / (policy.budget or {}).get("value", c.bitops),
        "size_mb": c.size_mb, "avg_w_bits": c.avg_w_bits, "avg_a_bits": c.avg_a_bits,
        "search_seconds": prov.get("wall_time_s"),
        "search_images": (prov.get("search_cost") or {}).get("images_processed"),
        "search_passes": (prov.get("search_cost") or {}).get("backward_passes"),
        "top1": best["metrics"]["eval_acc"],
        # how much of the policy the search decided: layers the final budget repair changed,
        # and the mean softmax margin of the logits (supernet methods)
        "repaired_layers": len((prov.get("repair") or {}).get("changed_layers", [])),
        "decidedness": prov.get("decidedness_mean"),
    }


def write_tables(results: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> None:
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                 indent=2, default=str))
    layers = list(results[0]["bits"]) if results else []
    lines = [f"ResNet-20, search on {args.subset} CIFAR-10 images ({args.search_epochs} epochs), "
             f"budget {args.budget}; fine-tune {args.finetune_epochs} epoch(s) on 50,000 images; "
             "top-1 on the 10,000 test images.", "",
             "| method | BitOps (G) | / budget | size (MB) | avg w/a bits | search s | "
             "layers repaired | top-1 % |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        secs = "-" if r["search_seconds"] is None else f"{r['search_seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['bitops'] / 1e9:.4f} | {r['bitops_over_budget']:.3f}"
                     f" | {r['size_mb']:.4f} | {r['avg_w_bits']:.2f}/{r['avg_a_bits']:.2f} | "
                     f"{secs} | {r['repaired_layers']} | {r['top1']:.2f} |")
    lines += ["", "Bits per layer (w/a):", "",
              "| layer | " + " | ".join(r["method"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for n in layers:
        lines.append(f"| {n} | " + " | ".join(f"{r['bits'][n][0]}/{r['bits'][n][1]}"
                                              for r in results) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--methods", default=",".join(ALL))
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budget", default="w3a3")
    ap.add_argument("--subset", type=int, default=2500)
    ap.add_argument("--search-epochs", type=int, default=10)
    ap.add_argument("--search-batch-size", type=int, default=128)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hawq-batches", type=int, default=4, help="batches for HAWQ's traces")
    ap.add_argument("--hawq-iters", type=int, default=16, help="Hutchinson samples per batch")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--stage", choices=["search", "all"], default="all",
                    help="search only, or search then fine-tune (finished stages are skipped)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.environment = report_environment(args.threads or None)  # stored with the args
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t = time.time()
        res = run_method(m, args)
        if res:
            results.append(res)
            print(f"{m}: top-1 {res['top1']:.2f}% ({time.time() - t:.0f}s)", flush=True)
    if not results:
        return
    write_tables(results, out, args)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
