"""Residual quantizers and the exact QDQ rewrites: the residual adds of an exported ResNet run
as onnxruntime's integer QLinearAdd, and the file still computes its PyTorch reference."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mpqkit.engine.checkpoint import save_checkpoint
from mpqkit.engine.config import to_dict
from mpqkit.export.deploy import export_reference
from mpqkit.export.onnx_export import export_checkpoint, export_onnx
from mpqkit.export.verify import make_session
from mpqkit.policy import Policy
from mpqkit.quant import QuantConfig, calibrate, quantize_model
from mpqkit.quant.quantizers import Quantizer

torch.set_num_threads(1)


def _folded_resnet20(model: nn.Module, w: int = 4, a: int = 4
                     ) -> tuple[nn.Module, Policy, QuantConfig]:
    """``model`` (a resnet20 with BatchNorm statistics) quantized to be trained folded
    (fold_bn): 8-bit output quantizers on the convs feeding adds."""
    policy = Policy.uniform(model, w, a, 32)
    cfg = QuantConfig(fold_bn=True)
    q = quantize_model(model, policy, cfg)
    calibrate(q, torch.randn(16, 3, 32, 32))
    return q.eval(), policy, cfg


@pytest.fixture(scope="module")
def folded(resnet20_bn) -> tuple[nn.Module, Policy, QuantConfig]:
    return _folded_resnet20(resnet20_bn(0))


def _optimized_ops(path: Path, tmp_path: Path) -> Counter[str]:
    opt = tmp_path / f"{path.stem}.optimized.onnx"
    make_session(path, 1, optimized_path=opt)
    return Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def _x(n: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, 32, 32)


def test_residual_adds_run_as_integer_kernels(tmp_path: Path, folded) -> None:
    q, _, _ = folded
    path = tmp_path / "m.onnx"
    summary = export_onnx(q, path)
    assert len(summary["residual_quant"]) == 9  # one per basic block
    assert all(r["bits"] == 8 and r["range"] == [0, 255] for r in summary["residual_quant"])
    ops = _optimized_ops(path, tmp_path)
    # every residual add (and the ReLU after it) is a QLinearAdd, every conv a QLinearConv;
    # no float Add, Relu or Conv is left between the quantized convolutions
    assert ops["QLinearConv"] == 19 and ops["QLinearAdd"] >= 9
    assert ops["Add"] == ops["Relu"] == ops["Conv"] == 0
    assert ops["QuantizeLinear"] + ops["DequantizeLinear"] <= 8


def test_export_computes_its_reference_exactly(tmp_path: Path, folded) -> None:
    q, _, _ = folded
    path = tmp_path / "m.onnx"
    export_onnx(q, path)
    ref_model = export_reference(q)
    x = _x()
    with torch.no_grad():
        ref = ref_model(x).numpy()
        plain = q(x).numpy()
    # onnxruntime's float path of the QDQ graph is the reference (rewrites are exact) ...
    float_path = make_session(path, 1, {"session.disable_quant_qdq": "1"})
    np.testing.assert_allclose(float_path.run(None, {"input": x.numpy()})[0], ref, atol=1e-4)
    # ... and the residual quantizers are what differs from the model without them
    assert np.abs(plain - ref).max() > 1e-3
    out = make_session(path, 1).run(None, {"input": x.numpy()})[0]  # integer kernels
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def test_residual_quantizers_never_clip(folded) -> None:
    q, _, _ = folded
    ref_model = export_reference(q)
    quantizers = {n: m for n, m in ref_model.named_children() if isinstance(m, Quantizer)}
    assert len(quantizers) == 9
    seen: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp, n=n: seen.__setitem__(n, float(inp[0].max())))
        for n, m in quantizers.items()]
    with torch.no_grad():
        ref_model(_x(64) * 3)
    for h in hooks:
        h.remove()
    for n, m in quantizers.items():
        scale, _, qmax = m.qparams()
        assert 0 < seen[n] <= float(scale) * qmax * (1 + 1e-6), n


def test_without_residual_quant_the_adds_stay_float(tmp_path: Path, folded) -> None:
    q, _, _ = folded
    path = tmp_path / "m.onnx"
    summary = export_onnx(q, path, residual_quant=False)
    assert summary["residual_quant"] == []
    ops = _optimized_ops(path, tmp_path)
    assert ops["Add"] == 9 and ops["QLinearConv"] == 19
    x = _x()
    float_path = make_session(path, 1, {"session.disable_quant_qdq": "1"})
    with torch.no_grad():
        np.testing.assert_allclose(float_path.run(None, {"input": x.numpy()})[0], q(x).numpy(),
                                   atol=1e-4)


def test_export_checkpoint_returns_the_reference(tmp_path: Path, folded) -> None:
    q, policy, cfg = folded
    meta = {"model": "resnet20", "num_classes": 10, "input_size": 32, "dataset": "cifar10",
            "policy": policy.to_dict(), "quant": to_dict(cfg), "config": {}}
    save_checkpoint(tmp_path / "best", q, meta)
    summary, model, _ = export_checkpoint(tmp_path / "best.safetensors", tmp_path / "m.onnx")
    assert len(summary["residual_quant"]) == 9
    x = _x(8)
    float_path = make_session(tmp_path / "m.onnx", 1, {"session.disable_quant_qdq": "1"})
    with torch.no_grad():
        np.testing.assert_allclose(float_path.run(None, {"input": x.numpy()})[0],
                                   model(x).numpy(), atol=1e-4)
