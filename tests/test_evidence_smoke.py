"""The evidence benchmark (benchmarks/evidence.py), smoke profile, end to end on real data.

CIFAR-10 is the proxy and a target; Tiny-ImageNet-32 is a target only when its FP ResNet-20 is
bundled (otherwise the benchmark skips it and says so). A second call finds every cell finished.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mpqkit.models import bundled_weights

REPO = Path(__file__).resolve().parents[1]


def _evidence():
    spec = importlib.util.spec_from_file_location("mpqkit_bench_evidence",
                                                  REPO / "benchmarks" / "evidence.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_evidence_smoke(cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ev = _evidence()
    tin = bundled_weights("resnet20", "tiny-imagenet-32") is not None
    targets = "tin,cifar" if tin else "cifar"
    argv = ["--profile", "smoke", "--out", str(tmp_path / "runs"), "--results-dir",
            str(tmp_path / "results"), "--threads", "1", "--targets", targets]
    assert ev.main(argv) == 0
    out = capsys.readouterr().out
    stem = tmp_path / "results" / "evidence_smoke"
    for suffix in (".json", ".md", ".png"):
        assert stem.with_suffix(suffix).is_file()
    res = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    if not tin:
        assert "Tiny-ImageNet-32 skipped" in out and "Tiny-ImageNet-32 skipped" in md

    rows = [r for r in res["rows"] if r["kind"] != "ablation"]
    names = {r["policy"] for r in rows}
    assert {"asga", "edmips", "gmpq", "seam", "hawq", "random-0", "random-1", "random-2",
            "uniform-w2a3", "uniform-w3a2", "uniform-w2a2", "asga-target"} == names
    for r in rows:
        if r["kind"] == "target" and not tin:
            assert r["status"] == "pending"
            continue
        assert r["status"] == "done" and r["acc"]["cifar"]["n"] == 2, r["policy"]
        assert r["bitops_over_budget"] <= 1.0 + 1e-9
    # item 5's checks are computed (on CIFAR-10 at least; on Tiny-ImageNet-32 with its weights)
    for g in res["goal"]:
        if g["target"] == "cifar" or tin:
            vals = {c["check"].split(" (")[0]: c for c in g["checks"]}
            assert vals["asga - best uniform"]["status"] in ("PASS", "FAIL")
            assert vals["asga - random mean"]["status"] in ("PASS", "FAIL")
            if not tin:
                assert g["status"] in ("PENDING", "FAIL")
    assert "## Goal" in md and "Spearman" in md
    sp = [s for s in res["spearman"] if s["target"] == "cifar"]
    assert sp and sp[0]["n"] == 4  # the four proxy-searched supernets have a gap
    assert sorted(a["adaptive"] for a in res["rho_ablation"]) == [False, True]
    # every proxy supernet rated every fine-tuned policy (--stage rank, part of all)
    ranks = {r["supernet"]: r for r in res["supernet_rank"]}
    assert set(ranks) == {"asga", "edmips", "gmpq", "seam", "asga-rho-ablation"}
    for r in ranks.values():
        assert set(r["rated"]) == names - (set() if tin else {"asga-target"})
        assert all(0.0 <= v <= 100.0 for v in r["rated"].values())
        assert r["cifar"]["n"] == len(r["rated"])
    assert "own rating of the policies" in md

    # resumable: a second call runs nothing
    cells = sorted((tmp_path / "runs").rglob("result.json"))
    stamps = [p.stat().st_mtime_ns for p in cells]
    assert ev.main(argv) == 0
    again = capsys.readouterr().out
    assert "top-1" not in again.split("results:")[0] and ": ran," not in again
    assert "rated" not in again
    assert [p.stat().st_mtime_ns for p in cells] == stamps

    if not tin:
        return
    # the search-cost ratio measured in one process: proxy twice, target one epoch, extrapolated
    assert ev.main([*argv, "--stage", "cost"]) == 0
    cost = json.loads((tmp_path / "runs" / "search" / "2.5bits" / "cost.json").read_text())
    assert len(cost["proxy"]) == 2 and cost["target"]["epochs"] == 1
    assert len(cost["target"]["epoch_s"]) == 1 and cost["ratio_s"] > 0
    assert cost["target_s_extrapolated"] > cost["target"]["wall_s"]  # 2 epochs from 1
    res = json.loads(stem.with_suffix(".json").read_text())
    assert res["search_cost"][0]["measured_ratio_s"] == pytest.approx(cost["ratio_s"])
    goal = next(g for g in res["goal"] if g["is_goal"])
    assert any("measured in one process" in c["check"] for c in goal["checks"])
