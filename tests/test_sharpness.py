"""Sharpness: surrogate gap, filter-normalized loss landscape, plots, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpqkit.cli import main
from mpqkit.engine import save_checkpoint
from mpqkit.policy import Policy
from mpqkit.quant import calibrate, quantize_model
from mpqkit.sharpness import (
    batches_loss,
    filter_normalized_direction,
    loss_landscape,
    measure_sharpness,
    surrogate_gaps,
)


class Tiny(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Tiny()
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))) for _ in range(2)]
    # a few steps so the model is not at initialisation
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches * 5:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), batches


def test_direction_is_filter_normalized_and_skips_1d(setup):
    model, _ = setup
    d = filter_normalized_direction(model, seed=1)
    w = model.conv.weight
    assert torch.allclose(d["conv.weight"].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1),
                          rtol=1e-5)
    assert d["bn.weight"].abs().sum() == 0 and d["conv.bias"].abs().sum() == 0
    assert torch.equal(d["conv.weight"], filter_normalized_direction(model, seed=1)["conv.weight"])


def test_landscape_center_is_the_model_loss(setup):
    model, batches = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = batches_loss(model, batches)
    land = loss_landscape(model, batches, dims=1, points=5, span=0.5)
    assert land["loss"][2] == pytest.approx(loss, rel=1e-6)
    assert land["center"] == pytest.approx(loss, rel=1e-6)
    assert max(land["loss"]) > loss
    land2 = loss_landscape(model, batches, dims=2, points=3, span=0.5)
    assert land2["loss"][1][1] == pytest.approx(loss, rel=1e-6)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_sharper_model_has_a_larger_gap(setup):
    model, batches = setup
    flat = sum(surrogate_gaps(model, batches, 0.05))
    with torch.no_grad():
        model.fc.weight.mul_(5.0)
        model.fc.bias.mul_(5.0)
    sharp = sum(surrogate_gaps(model, batches, 0.05))
    assert sharp > flat > 0


def test_measure_writes_json_and_png_quantizers_active(setup, tmp_path):
    model, batches = setup
    policy = Policy.uniform(model, 2, 2, 8, first_last="search")
    q = quantize_model(model, policy)
    calibrate(q, batches[0][0])
    res = measure_sharpness(q, batches, rho=0.05, landscape="2d", points=3, span=0.5,
                            out=tmp_path)
    assert (tmp_path / "landscape_2d.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "sharpness.json").read_text())
    assert saved["surrogate_gap"] == pytest.approx(res["surrogate_gap"])
    assert res["loss"] != pytest.approx(batches_loss(model, batches))  # 2-bit != float
    assert res["landscape"]["loss"][1][1] == pytest.approx(res["loss"], rel=1e-6)


def test_cli_on_a_checkpoint(tiny_folder, tmp_path, capsys):
    from mpqkit.models import build_model

    model = build_model("resnet20", num_classes=4)
    save_checkpoint(tmp_path / "fp", model, {"model": "resnet20", "num_classes": 4,
                                             "input_size": 32, "dataset": "imagefolder"})
    rc = main(["sharpness", "--checkpoint", str(tmp_path / "fp.safetensors"), "--data",
               f"imagefolder:{tiny_folder}", "--cache-dir", str(tmp_path / "cache"),
               "--batches", "1", "--batch-size", "4", "--landscape", "1d", "--points", "3",
               "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    assert "surrogate gap" in capsys.readouterr().out
    assert (tmp_path / "out" / "landscape_1d.png").is_file()
    assert json.loads((tmp_path / "out" / "sharpness.json").read_text())["images"] == 4


def test_cli_without_out_writes_beside_the_checkpoint(tiny_folder, tmp_path, capsys):
    from mpqkit.models import build_model

    model = build_model("resnet20", num_classes=4)
    save_checkpoint(tmp_path / "run" / "best", model, {"model": "resnet20", "num_classes": 4,
                                                       "input_size": 32,
                                                       "dataset": "imagefolder"})
    rc = main(["sharpness", "--checkpoint", str(tmp_path / "run" / "best.safetensors"),
               "--data", f"imagefolder:{tiny_folder}", "--cache-dir", str(tmp_path / "cache"),
               "--batches", "1", "--batch-size", "4", "--landscape", "1d", "--points", "3"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out = tmp_path / "run" / "sharpness-best"
    assert f"results go to {out}" in cap.err  # stated before the computation
    assert (out / "landscape_1d.png").is_file() and (out / "sharpness.json").is_file()
    assert f"wrote {out / 'sharpness.json'}" in cap.out


def test_cli_missing_checkpoint_creates_no_folder(tmp_path, capsys):
    assert main(["sharpness", "--checkpoint", str(tmp_path / "nope.safetensors")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
