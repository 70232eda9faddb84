"""Under torchrun every rank runs the command; only rank 0 prints the result lines."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import mpqkit.engine
import mpqkit.search
from mpqkit.cli import main


def _fake_result(_cfg):  # type: ignore[no-untyped-def]
    return SimpleNamespace(summary=lambda: "top-1 99.0%", run_dir=Path("runs/x"),
                           policy=SimpleNamespace(to_dict=lambda: {}))


@pytest.mark.parametrize("rank,prints", [(None, True), ("0", True), ("1", False)])
@pytest.mark.parametrize("argv", [["train", "--model", "resnet20"],
                                  ["finetune", "--model", "resnet20", "--policy", "w4a4"],
                                  ["search", "--model", "resnet20", "--budget", "w4a4"]])
def test_only_rank_0_prints_results(argv, rank, prints, monkeypatch, capsys):
    for mod, name in ((mpqkit.engine, "train"), (mpqkit.engine, "finetune"),
                      (mpqkit.search, "search")):
        monkeypatch.setattr(mod, name, _fake_result)
    if rank is not None:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("result: top-1 99.0%" in out) == prints, out
    assert prints or out == ""
