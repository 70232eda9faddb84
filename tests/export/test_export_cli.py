"""`mpqkit export` / `mpqkit inspect` end to end, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mpqkit.cli import main
from mpqkit.complexity import profile_model
from mpqkit.data import CIFAR10_MEAN, CIFAR10_STD
from mpqkit.engine.checkpoint import save_checkpoint
from mpqkit.engine.config import to_dict
from mpqkit.export import ExportError
from mpqkit.export.onnx_export import export_onnx
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import QConv2d, QuantConfig, calibrate, quantize_model

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `mpqkit finetune` leaves it: best.* (QAT) plus fp.* (no policy)."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model("resnet20")
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    model.eval()
    names = list(profile_model(model, 32))
    cycle = [(2, 2), (3, 3), (4, 4), (6, 6), (8, 8)]
    bits = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    bits[names[0]], bits[names[-1]] = (8, 8), (32, 32)
    policy = Policy.from_bits(model, bits, 32, model_name="resnet20")
    cfg = QuantConfig(per_channel=True)
    q = quantize_model(model, policy, cfg)
    calibrate(q, torch.randn(8, 3, 32, 32))
    meta = {"model": "resnet20", "num_classes": 10, "input_size": 32, "dataset": "cifar10",
            "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD), "policy": policy.to_dict(),
            "quant": to_dict(cfg), "config": {}}
    save_checkpoint(d / "best", q, meta)
    save_checkpoint(d / "fp", model, {**meta, "policy": None, "quant": None})
    return d


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqkit: error: ") and "\n" not in err, err
    return err


def test_export_and_inspect(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_dir / "m.onnx"
    assert main(["export", "--checkpoint", str(run_dir / "best.safetensors"),
                 "--out", str(out)]) == 0
    assert "QDQ ONNX opset 21" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["matches_policy"] and len(rep["layers"]) == 20
    assert all(r["w_per_channel"] for r in rep["layers"] if r["w_bits"] < 32)
    assert main(["inspect", str(out)]) == 0
    assert "all 20 layers match the embedded policy" in capsys.readouterr().out


def test_packed_export_default_path(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--checkpoint", str(run_dir / "best.safetensors"),
                 "--format", "packed", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["export"]
    assert res["path"] == str(run_dir / "best.mpq")
    assert abs(res["weight_vs_policy"] - 1) < 0.02
    assert main(["inspect", str(run_dir / "best.mpq")]) == 0
    assert "all 20 layers match" in capsys.readouterr().out


def test_export_verify_on_cifar10(run_dir: Path, capsys: pytest.CaptureFixture[str],
                                  cifar_dir: Path) -> None:
    args = ["export", "--checkpoint", str(run_dir / "best.safetensors"), "--verify",
            "--data", "cifar10", "--data-dir", str(cifar_dir), "--test-subset", "20",
            "--threads", "1"]
    assert main([*args, "--out", str(run_dir / "v.onnx")]) == 0
    out = capsys.readouterr().out
    assert "verified on 20 images" in out and "class agreement" in out
    assert main([*args, "--format", "packed", "--out", str(run_dir / "v.mpq")]) == 0
    assert "identical logits 100.0%" in capsys.readouterr().out
    # a failed verification exits non-zero (3) with one line
    assert main([*args, "--out", str(run_dir / "v.onnx"), "--tolerance", "-1"]) == 3
    assert "does not compute what the PyTorch model computes" in one_line_error(capsys)


def test_fp_checkpoint_needs_fp(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(run_dir / "fp.safetensors")
    assert main(["export", "--checkpoint", ckpt, "--out", str(run_dir / "x.onnx")]) == 2
    assert "no policy" in one_line_error(capsys)
    assert main(["export", "--checkpoint", ckpt, "--format", "packed"]) == 2
    assert "no policy" in one_line_error(capsys)
    assert main(["export", "--checkpoint", ckpt, "--fp", "--out", str(run_dir / "fp.onnx")]) == 0
    assert "float ONNX" in capsys.readouterr().out


def test_opset_too_old(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(run_dir / "best.safetensors")
    assert main(["export", "--checkpoint", ckpt, "--opset", "11"]) == 2
    assert "opset 11 is too old" in one_line_error(capsys)
    assert main(["export", "--checkpoint", ckpt, "--opset", "17", "--int-types", "native"]) == 2
    assert "INT4 needs opset 21" in one_line_error(capsys)
    # auto falls back to int8 containers below opset 21
    out = run_dir / "o17.onnx"
    assert main(["export", "--checkpoint", ckpt, "--opset", "17", "--out", str(out)]) == 0
    assert "int4" not in capsys.readouterr().out


def test_corrupt_and_missing_files(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = run_dir / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert main(["inspect", str(bad)]) == 2
    assert "not a readable ONNX model" in one_line_error(capsys)
    assert main(["inspect", str(run_dir / "none.onnx")]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert main(["export", "--checkpoint", str(run_dir / "none.safetensors")]) == 2
    assert "does not exist" in one_line_error(capsys)


class _Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x)).flatten(1)


class _Sort(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(self.conv(x).flatten(1), dim=1).values


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def _quantized(model: nn.Module) -> nn.Module:
    model.conv = QConv2d.from_float(model.conv, 4, 4)
    calibrate(model, torch.randn(2, 3, 8, 8))
    return model.eval()


@pytest.mark.parametrize("model,match", [
    (_Shuffle, r"layer 'shuffle' \(PixelShuffle\)"),
    (_Sort, r"function torch.sort"),
    (_Branchy, r"cannot trace"),
])
def test_unsupported_ops_name_the_layer(tmp_path: Path, model: type[nn.Module],
                                        match: str) -> None:
    with pytest.raises(ExportError, match=match) as e:
        export_onnx(_quantized(model()), tmp_path / "m.onnx", input_size=8)
    assert "\n" not in str(e.value)
