"""Training-step time with and without mpqkit's CPU allocator setting, one model per process.

The setting (:func:`mpqkit.engine.allocator.keep_freed_memory`) is process-wide, so the two
conditions cannot be interleaved in one process: every cell is a fresh process that builds one
model (``fp``: the float ResNet-20; ``qat``: the mixed-policy QAT model of ``bench_qat.py``),
runs ``--warmup`` steps and times ``--steps`` steps, counting the minor page faults of each step.
Cells run one after another in rounds (fp/keep, fp/default, qat/keep, qat/default, then again),
so that drift in the machine's speed hits both conditions alike; the report gives per kind the
median over rounds of each condition's median step time, their ratio, and the page faults::

    python benchmarks/bench_allocator.py --rounds 3 --out benchmarks/results/bench_allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchenv import report_environment, write_json

KINDS = ("fp", "qat")
SETTINGS = ("keep", "default")


def cell(kind: str, threads: int, steps: int, warmup: int, batch_size: int) -> dict[str, Any]:
    """One process's measurement (run with ``--cell``): median step ms and faults per step."""
    import torch

    import bench_qat

    torch.set_num_threads(threads)
    args = argparse.Namespace(model="resnet20", policy="mixed", per_channel=False,
                              batch_size=batch_size, compile=False)
    step = bench_qat.build_steps(args, torch.device("cpu"))[0][kind]
    for _ in range(warmup):
        step()
    times, faults = [], []
    for _ in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times.append(step() * 1000)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"step_ms_median": statistics.median(times), "faults_per_step_median":
            statistics.median(faults), "faults_per_step_max": max(faults)}


def run_cell(kind: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, MPQKIT_MALLOC=setting)
    cmd = [sys.executable, __file__, "--cell", kind, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarize(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for kind, by_setting in cells.items():
        med = {s: statistics.median(c["step_ms_median"] for c in by_setting[s])
               for s in SETTINGS}
        res[kind] = {
            "step_ms": {s: round(v, 1) for s, v in med.items()},
            "keep_speedup": round(med["default"] / med["keep"], 3),
            "faults_per_step_median": {s: statistics.median(
                c["faults_per_step_median"] for c in by_setting[s]) for s in SETTINGS},
            "rounds": {s: [round(c["step_ms_median"], 1) for c in by_setting[s]]
                       for s in SETTINGS}}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cell", choices=KINDS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cell:
        report_environment(args.threads)  # applies MPQKIT_MALLOC, as a run does
        print(json.dumps(cell(args.cell, args.threads, args.steps, args.warmup,
                              args.batch_size)))
        return
    env = report_environment(args.threads)
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {k: {s: [] for s in SETTINGS}
                                                         for k in KINDS}
    for r in range(args.rounds):
        for kind in KINDS:
            for setting in SETTINGS:
                c = run_cell(kind, setting, args)
                cells[kind][setting].append(c)
                print(f"round {r + 1}/{args.rounds} {kind} MPQKIT_MALLOC={setting}: "
                      f"{c['step_ms_median']:.1f} ms/step, "
                      f"{c['faults_per_step_median']:.0f} page faults/step", flush=True)
    res = {"model": "resnet20", "batch_size": args.batch_size, "threads": args.threads,
           "steps": args.steps, "rounds": args.rounds, "by_kind": summarize(cells),
           "environment": env}
    print(json.dumps(res["by_kind"], indent=1))
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
