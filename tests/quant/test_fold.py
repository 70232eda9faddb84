"""BatchNorm folding: the folded QAT module, its export and the fold at export of models
fine-tuned without it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mpqkit.engine.checkpoint import load_checkpoint_model, save_checkpoint
from mpqkit.engine.config import from_dict, to_dict
from mpqkit.export.deploy import export_reference
from mpqkit.export.onnx_export import export_checkpoint, export_onnx
from mpqkit.export.verify import make_session
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import QuantConfig, calibrate, quantize_model
from mpqkit.quant.fold import QConvBn2d, find_fold_sites

torch.set_num_threads(1)


def _fp_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20")
    model.train()
    with torch.no_grad():  # BatchNorm statistics (and affine parameters) away from 1/0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        for _ in range(2):
            model(torch.randn(32, 3, 32, 32))
    return model.eval()


def _quantized(fold: bool, w: int = 4, a: int = 4) -> tuple[nn.Module, Policy, QuantConfig]:
    model = _fp_model()
    policy = Policy.uniform(model, w, a, 32)
    cfg = QuantConfig(fold_bn=fold)
    q = quantize_model(model, policy, cfg)
    calibrate(q, torch.randn(16, 3, 32, 32))
    return q.eval(), policy, cfg


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    return make_session(path, threads=1).run(None, {"input": x.numpy()})[0]


def test_folded_module_equals_conv_then_bn_in_eval() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 3)
    ref = nn.Sequential(conv, bn).eval()
    q = QConvBn2d.from_conv_bn(conv, bn, 32, 32, QuantConfig(fold_bn=True), out_quant=False)
    q.eval()
    x = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)
    # in training: batch statistics, the running ones updated as by the BatchNorm itself
    # (running variances below the batch ones: no channel under batch_norm_floored's floor)
    with torch.no_grad():
        bn.running_var.uniform_(0.01, 0.05)
    q.train()
    ref.train()
    bn2 = nn.BatchNorm2d(16)
    bn2.load_state_dict(bn.state_dict())
    ref2 = nn.Sequential(conv, bn2).train()
    y = q(x)
    torch.testing.assert_close(y, ref2(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    y.sum().backward()
    assert bn.weight.grad is not None and conv.weight.grad is not None


def test_fold_sites_of_resnet20() -> None:
    q, policy, _ = _quantized(True)
    folded = {n: m for n, m in q.named_modules() if isinstance(m, QConvBn2d)}
    assert len(folded) == 19 and not any(isinstance(m, nn.BatchNorm2d) for m in
                                        q.modules() if not isinstance(m, nn.BatchNorm2d)
                                        or m not in [f.bn for f in folded.values()])
    # conv1 of a block feeds conv2's input quantizer only; conv2 feeds the residual add
    assert not folded["layer1.0.conv1"].oq.enabled
    assert folded["layer1.0.conv2"].oq.bits == 8 and folded["conv1"].oq.bits == 8
    assert find_fold_sites(_fp_model(), set(policy.layers))["layer2.1.conv1"].bn == \
        "layer2.1.bn1"


def test_folded_export_has_no_batchnorm_and_runs_like_pytorch(tmp_path: Path) -> None:
    q, _, _ = _quantized(True)
    path = tmp_path / "m.onnx"
    summary = export_onnx(q, path)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert "BatchNormalization" not in ops and ops["Conv"] == 19
    assert summary["folded_at_export"] == []
    assert {r["w_type"] for r in summary["layers"]} == {"int8"}  # the fast container
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():  # what export computes: the model plus its residual quantizers
        ref = export_reference(q)(x).numpy()
    # the graph computes the PyTorch function: onnxruntime's float path agrees to rounding
    float_path = make_session(path, 1, {"session.disable_quant_qdq": "1"})
    np.testing.assert_allclose(float_path.run(None, {"input": x.numpy()})[0], ref, atol=1e-4)
    # its integer kernels (QLinearConv) requantize with their own rounding: a rare class flip
    out = _ort(path, x)
    # (an untrained model: near-tied logits, so one flipped activation can move an argmax;
    # the logit bound below is the check)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.8
    assert np.abs(out - ref).max() <= 0.15 * np.abs(ref).max()
    opt = tmp_path / "opt.onnx"
    make_session(path, 1, optimized_path=opt)
    assert Counter(n.op_type for n in onnx.load(str(opt)).graph.node)["QLinearConv"] == 19


def test_export_folds_a_model_trained_unfolded(tmp_path: Path) -> None:
    q, _, _ = _quantized(False)
    path = tmp_path / "m.onnx"
    summary = export_onnx(q, path)
    assert len(summary["folded_at_export"]) == 19
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert "BatchNormalization" not in ops
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        ref = q(x).numpy()
    # the rescaled weights round differently from s * q followed by the BatchNorm, which
    # flips a 4-bit activation now and then: --verify reports the change on real data
    out = _ort(path, x)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.8  # untrained: near-tied logits
    assert np.abs(out - ref).max() <= 0.15 * np.abs(ref).max()
    # without folding the BatchNorms stay
    export_onnx(q, tmp_path / "bn.onnx", fold_bn=False)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "bn.onnx")).graph.node)
    assert ops["BatchNormalization"] == 19


def test_folded_checkpoint_loads_back_and_exports(tmp_path: Path) -> None:
    q, policy, cfg = _quantized(True)
    meta = {"model": "resnet20", "num_classes": 10, "input_size": 32, "dataset": "cifar10",
            "policy": policy.to_dict(), "quant": to_dict(cfg), "config": {}}
    save_checkpoint(tmp_path / "best", q, meta)
    back, _ = load_checkpoint_model(tmp_path / "best.safetensors")
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x))
    summary, _, _ = export_checkpoint(tmp_path / "best.safetensors", tmp_path / "m.onnx")
    assert summary["folded_at_export"] == []


def test_older_quant_config_means_unfolded() -> None:
    assert from_dict(QuantConfig, {"per_channel": True}).fold_bn is False
    assert QuantConfig().fold_bn is False


@pytest.mark.parametrize("flag,expected", [([], True), (["--no-fold-bn"], False)])
def test_finetune_folds_by_default(flag: list[str], expected: bool) -> None:
    from mpqkit.cli import build_parser
    from mpqkit.cli.args import overrides
    from mpqkit.cli.run import _fold_by_default

    args = build_parser().parse_args(["finetune", *flag])
    assert _fold_by_default(None, overrides(args))["quant.fold_bn"] is expected


def test_every_trainable_parameter_of_a_folded_model_gets_a_gradient():
    # DDP (finetune under torchrun) stops on a trainable parameter without a gradient: the
    # pass-through output quantizers of convolutions that feed a quantized layer must not train
    m = build_model("resnet20", num_classes=10)
    q = quantize_model(m, Policy.uniform(m, 4, 4, 32, first_last="8bit", model_name="resnet20"),
                       QuantConfig(fold_bn=True))
    q.train()
    q(torch.randn(4, 3, 32, 32)).sum().backward()
    missing = [n for n, p in q.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
