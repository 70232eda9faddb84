"""Report: plots of search and fine-tune run folders, and the comparison table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mpqkit.cli import main
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.report import make_report, read_alpha
from mpqkit.search.loop import CSV_FIELDS

SEARCH_FIELDS = list(CSV_FIELDS)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def policy() -> Policy:
    p = Policy.uniform(build_model("resnet20"), 4, 4, 32, model_name="resnet20")
    p.layers["layer1.0.conv1"].w_bits = 2
    p.budget = {"kind": "bitops", "value": 7e8, "spec": "w4a4"}
    p.provenance.update(method="asga", wall_time_s=123.4, dataset="cifar10",
                        search_cost={"images_processed": 50000},
                        repair={"changed_layers": ["layer1.0.conv2", "layer2.0.conv1"]})
    return p


def _search_run(root: Path, policy: Policy) -> Path:
    d = root / "search-asga"
    d.mkdir(parents=True)
    policy.save(d / "policy.json")
    rows = [{"epoch": e, "steps": 10 * e, "lr_w": 0.1, "lr_alpha": 0.01, "loss": 2.0 / e,
             "acc": 30 + 10 * e, "task_loss": 1.9 / e, "extra_loss": "",
             "expected_bitops": 8e8 - 3e7 * e, "expected_size_mb": 0.2, "expected_ratio":
             (8e8 - 3e7 * e) / 7e8, "argmax_bitops": 7.5e8 - 2e7 * e, "argmax_size_mb": 0.19,
             "lambda": 0.01 * e, "rho": 0.05 + 0.01 * e, "h": 0.3 / e, "cos": 0.9,
             "decidedness": 0.1 * e, "epoch_seconds": 3.0, "images_per_s": 100}
            for e in range(1, 5)]
    _write_csv(d / "search.csv", SEARCH_FIELDS, rows)
    layers = {n: {"w": [0.1, 0.2, 0.6, 0.1], "a": [0.25, 0.25, 0.25, 0.25]}
              for n in policy.searchable()}
    (d / "alpha.json").write_text(json.dumps(
        {"w_candidates": [2, 3, 4, 6], "a_candidates": [2, 3, 4, 6],
         "epochs": [{"epoch": 1, "layers": layers}, {"epoch": 2, "layers": layers}]}))
    return d


def _finetune_run(root: Path, policy: Policy) -> Path:
    d = root / "ft-asga"
    d.mkdir(parents=True)
    policy.save(d / "policy.json")
    fields = ["epoch", "step", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc",
              "eval_top5", "epoch_seconds", "images_per_s"]
    _write_csv(d / "metrics.csv", fields, [
        {"epoch": e, "step": 100 * e, "lr": 0.01, "train_loss": 1.0 / e, "train_acc": 50 + e,
         "eval_loss": 1.1 / e, "eval_acc": 48 + 2 * e, "eval_top5": 90, "epoch_seconds": 5,
         "images_per_s": 200} for e in range(1, 4)])
    return d


def test_single_search_run(tmp_path, policy):
    d = _search_run(tmp_path, policy)
    res = make_report([d])
    for name in ("bits.png", "search_curves.png", "alpha.png", "comparison.md",
                 "comparison.csv"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    alpha = read_alpha(d)
    assert alpha["layer1.0.conv1"]["w_bits"] == [2, 3, 4, 6]
    assert alpha["layer1.0.conv1"]["w_prob"][2] == 0.6
    row = res["runs"][0]["summary"]
    assert row["method"] == "asga" and row["search_seconds"] == 123.4
    assert row["search_images"] == 50000 and row["search_acc"] == 70
    assert row["layers_repaired"] == 2


def test_several_runs_give_a_table(tmp_path, policy, capsys):
    s = _search_run(tmp_path, policy)
    f = _finetune_run(tmp_path, policy)
    out = tmp_path / "report"
    rc = main(["report", str(s), str(f), "--out", str(out)])
    assert rc == 0
    assert (out / "search-asga" / "search_curves.png").is_file()
    assert (out / "ft-asga" / "accuracy.png").is_file()
    assert (out / "ft-asga" / "bits.png").is_file()
    table = (out / "comparison.md").read_text()
    assert "search-asga" in table and "ft-asga" in table and "best acc" in table
    assert "| 54.0000 |" in table  # best eval accuracy of the fine-tune run
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["search-asga", "ft-asga"]
    assert float(rows[0]["bitops_g"]) == pytest.approx(policy.complexity().bitops / 1e9)
    assert "comparison.md" in capsys.readouterr().out


def test_not_a_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no policy.json" in capsys.readouterr().err


def test_several_runs_default_next_to_them_not_in_the_working_folder(tmp_path, policy,
                                                                      monkeypatch, capsys):
    runs = tmp_path / "runs"
    s = _search_run(runs, policy)
    f = _finetune_run(runs, policy)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["report", str(s), str(f)]) == 0
    assert list(cwd.iterdir()) == []  # nothing in the working folder
    out = runs / "report"
    assert (out / "comparison.md").is_file() and (out / "ft-asga" / "accuracy.png").is_file()
    assert f"wrote {out / 'comparison.md'}" in capsys.readouterr().out
