"""ONNX export of mixed-precision models: graph validity, agreement with PyTorch, inspection."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mpqkit.complexity import profile_model
from mpqkit.export import ExportError, VerificationError
from mpqkit.export.inspection import format_inspection, inspect_file
from mpqkit.export.onnx_export import export_onnx
from mpqkit.export.verify import check_verification, make_session, verify_onnx
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import QuantConfig, calibrate, dequantize_model, quantize_model

torch.set_num_threads(1)

# conv1 8/8 (first layer), fc full precision, the rest cycling through 2..8 bits.
CYCLE = [(2, 2), (3, 3), (4, 4), (6, 6), (8, 8), (4, 2), (2, 4), (3, 6), (6, 3), (5, 5), (7, 7)]


def mixed_model(make: Callable[[int], torch.nn.Module], weight_method: str = "lsq",
                act_method: str = "lsq", per_channel: bool = False,
                seed: int = 0) -> tuple[torch.nn.Module, Policy]:
    """resnet20 with BN statistics from random data (``make``: the ``resnet20_bn`` fixture),
    a 2..8-bit + FP policy, calibrated."""
    model = make(seed)
    names = list(profile_model(model, 32))
    bits = {n: CYCLE[i % len(CYCLE)] for i, n in enumerate(names)}
    bits[names[0]], bits[names[-1]] = (8, 8), (32, 32)
    policy = Policy.from_bits(model, bits, 32, model_name="resnet20")
    cfg = QuantConfig(weight_method=weight_method, act_method=act_method, per_channel=per_channel)
    q = quantize_model(model, policy, cfg)
    calibrate(q, torch.randn(8, 3, 32, 32))
    return q.eval(), policy


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = make_session(path, threads=1)
    return sess.run(None, {"input": x.numpy()})[0]


def assert_close_to_torch(model: torch.nn.Module, path: Path, n: int = 32) -> None:
    torch.manual_seed(1)
    x = torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_ort(path, x)
    assert out.shape == ref.shape
    # Same function up to the float summation order of the convolutions: the classes agree and
    # the logits differ by at most a few quantization steps of the last activations.
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


@pytest.fixture(scope="module")
def lsq_model(resnet20_bn) -> tuple[torch.nn.Module, Policy]:
    return mixed_model(resnet20_bn)


@pytest.mark.parametrize("wm,am,pc,opset", [
    ("lsq", "lsq", False, 21),
    ("lsq", "lsq", True, 21),
    ("maxabs", "pact", True, 21),
    ("maxabs", "lsq", False, 13),
    ("dorefa", "pact", False, 25),
])
def test_export_runs_like_pytorch(tmp_path: Path, resnet20_bn, wm: str, am: str, pc: bool,
                                  opset: int) -> None:
    model, policy = mixed_model(resnet20_bn, wm, am, pc)
    path = tmp_path / "m.onnx"
    # the graph as trained (BatchNorm nodes kept); the folded form: tests/quant/test_fold.py
    summary = export_onnx(model, path, opset=opset, fold_bn=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert summary["opset"] == opset and len(summary["layers"]) == len(policy.layers)
    assert_close_to_torch(model, path)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    # per-channel weight scales use the axis attribute
    axes = [a.i for n in proto.graph.node if n.op_type == "DequantizeLinear"
            for a in n.attribute if a.name == "axis"]
    assert (len(axes) > 0) == (pc and wm != "dorefa")


def test_inspect_reports_the_bits_in_the_file(tmp_path: Path, lsq_model) -> None:
    model, policy = lsq_model
    path = tmp_path / "m.onnx"
    export_onnx(model, path, opset=21, int_types="auto",
                meta={"model": "resnet20", "policy": policy.to_dict()})
    rep = inspect_file(path)
    assert rep["format"] == "onnx" and rep["opset"] == 21 and rep["matches_policy"]
    by_name = {r["name"]: r for r in rep["layers"]}
    assert set(by_name) == set(policy.layers)
    for name, lp in policy.layers.items():
        r = by_name[name]
        assert r["w_bits"] == lp.w_bits and r["a_bits"] == lp.a_bits, name
        if lp.w_bits == 32:
            assert r["w_container"] == "float" and r["a_container"] == "float"
            continue
        assert r["w_container"] == ("int4" if lp.w_bits <= 4 else "int8")
        if lp.a_bits == 8:
            assert r["a_container"] in ("uint8", "int8")
        else:
            assert r["a_container"].endswith("+Clip")
            assert r["a_range"][1] - r["a_range"][0] == 2**lp.a_bits - 1
    text = format_inspection(rep)
    assert "all 20 layers match the embedded policy" in text
    # the policy and the version travel in the metadata
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["mpqkit.policy"])["layers"].keys() == policy.layers.keys()
    assert props["mpqkit.version"]


def test_inspect_detects_a_file_that_disagrees_with_its_policy(tmp_path: Path, lsq_model) -> None:
    model, policy = lsq_model
    pol = policy.to_dict()
    name = "layer1.0.conv1"  # 3/3 in the model
    pol["layers"][name]["a_bits"] = 2
    path = tmp_path / "m.onnx"
    export_onnx(model, path, meta={"policy": pol})
    rep = inspect_file(path)
    assert not rep["matches_policy"]
    assert [r["name"] for r in rep["layers"] if r["status"] == "mismatch"] == [name]
    assert "MISMATCH" in format_inspection(rep)


def test_int8_containers_and_int2(tmp_path: Path, lsq_model) -> None:
    model, _ = lsq_model
    p8 = tmp_path / "int8.onnx"
    export_onnx(model, p8, opset=13, int_types="int8")
    rep = inspect_file(p8)
    conts = {r["w_container"] for r in rep["layers"]} | {r["a_container"].split("+")[0]
                                                         for r in rep["layers"]}
    assert conts <= {"int8", "uint8", "float"}
    assert all(r["w_bits"] == r["policy_w_bits"] for r in rep["layers"])
    assert_close_to_torch(model, p8, n=8)
    p2 = tmp_path / "int2.onnx"
    export_onnx(model, p2, opset=25, int_types="auto", fold_bn=False)  # see the INT2 note
    rep2 = {r["name"]: r for r in inspect_file(p2)["layers"]}
    assert rep2["layer1.2.conv2"]["w_container"] == "int2"  # w2a4
    assert rep2["layer2.2.conv1"]["a_container"] == "uint8+Clip"  # w2a2
    assert_close_to_torch(model, p2, n=8)


def test_float_export(tmp_path: Path, lsq_model) -> None:
    model, _ = lsq_model
    path = tmp_path / "fp.onnx"
    export_onnx(dequantize_model(model), path)
    proto = onnx.load(str(path))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in proto.graph.node}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = dequantize_model(model)(x).numpy()
    np.testing.assert_allclose(run_ort(path, x), ref, rtol=1e-4, atol=1e-4)
    assert not inspect_file(path)["policy_embedded"]


def test_verify_onnx_reports_and_checks(tmp_path: Path, lsq_model) -> None:
    model, _ = lsq_model
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = verify_onnx(model, path, [(x[:8], y[:8]), (x[8:], y[8:])], threads=1)
    assert res["images"] == 16 and res["torch_top1"] == 100.0
    # an untrained model's logits are near-tied: onnxruntime's requantization rounding can
    # move an argmax; the logit difference is the check
    assert res["agreement"] >= 75.0 and res["max_logit_diff"] < 2.0
    check_verification(res)
    bad = dict(res, onnx_top1=99.0, top1_diff=1.0)
    with pytest.raises(VerificationError, match="differs from PyTorch"):
        check_verification(bad)


def test_real_cifar10_images(tmp_path: Path, lsq_model, cifar_dir: Path) -> None:
    from mpqkit.data import DataConfig, build_data, make_loader

    bundle = build_data(DataConfig(name="cifar10", data_dir=str(cifar_dir), test_subset=20))
    loader = make_loader(bundle.test, 10, train=False)
    model, _ = lsq_model
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    res = verify_onnx(model, path, loader, threads=1)
    assert res["images"] == 20 and res["agreement"] == 100.0 and res["top1_diff"] == 0.0


def test_export_works_on_torchvision_style_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v2_cifar").eval()
    policy = Policy.uniform(model, 4, 4, 32)
    q = quantize_model(model, policy)
    calibrate(q, torch.randn(4, 3, 32, 32))
    path = tmp_path / "mbv2.onnx"
    export_onnx(q.eval(), path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = q(x).numpy()
    out = run_ort(path, x)
    assert out.shape == ref.shape and (out.argmax(1) == ref.argmax(1)).all()


def test_uncalibrated_model_is_refused(tmp_path: Path) -> None:
    model = build_model("resnet20").eval()
    q = quantize_model(model, Policy.uniform(model, 4, 4, 32))
    with pytest.raises(ExportError, match="uncalibrated"):
        export_onnx(q, tmp_path / "m.onnx")


class _Misc(torch.nn.Module):
    """Exercises the functional ops: cat, pooling, mean, permute, dynamic reshape, ..."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(4 * 4 * 16, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        y = self.act(self.bn(self.conv(x)))
        y = torch.cat([self.pool(y), self.avg(y)], dim=1)
        y = F.relu6(y) * 0.5 + y.mean(dim=(2, 3), keepdim=True)
        y = self.gelu(y)[:, :, 1:, :]
        y = F.pad(y, (0, 0, 1, 0))
        z = y.permute(0, 2, 3, 1).contiguous()
        z = F.silu(z.reshape(z.size(0), -1))
        return self.head(torch.sigmoid(self.fc(z)).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("opset", [13, 21])
def test_functional_ops(tmp_path: Path, opset: int) -> None:
    torch.manual_seed(0)
    model = _Misc().eval()
    bits = {"conv": (4, 8), "fc": (3, 5), "head": (32, 32)}
    policy = Policy.from_bits(model, bits, 8)
    q = quantize_model(model, policy)
    calibrate(q, torch.randn(8, 3, 8, 8))
    path = tmp_path / "misc.onnx"
    export_onnx(q.eval(), path, input_size=8, opset=opset)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        ref = q(x).numpy()
    np.testing.assert_allclose(run_ort(path, x), ref, rtol=1e-4, atol=1e-4)
    rep = {r["name"]: r for r in inspect_file(path)["layers"]}
    assert rep["fc"]["op"] == "Gemm" and (rep["fc"]["w_bits"], rep["fc"]["a_bits"]) == (3, 5)
    assert rep["head"]["op"] == "MatMul" and rep["head"]["w_bits"] == 32


class _Families(torch.nn.Module):
    """The ops torchvision's families add: chunk/split (ShuffleNet-V2), stochastic depth
    (EfficientNet, ConvNeXt), LayerNorm as a module and as a function over channels-last
    (ConvNeXt), adaptive average pooling to a size that does not divide the map (VGG, AlexNet);
    timm's static shape asserts and functional batch norm."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        nn = torch.nn
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.sd = StochasticDepth(0.2, "row")
        self.ln = nn.LayerNorm(8)
        self.ln_w = nn.Parameter(torch.rand(4) + 0.5)
        self.ln_b = nn.Parameter(torch.randn(4))
        self.pool = nn.AdaptiveAvgPool2d((5, 3))
        self.fc = nn.Linear(8 * 5 * 3, 4)
        self.register_buffer("bn_mean", torch.randn(8))
        self.register_buffer("bn_var", torch.rand(8) + 0.5)
        self.bn_b = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        y = self.conv(x)
        torch._assert(y.ndim == 4, "4D")  # timm's shape asserts, F.batch_norm (BatchNormAct2d)
        y = F.batch_norm(y, self.bn_mean, self.bn_var, None, self.bn_b, False, 0.1, 1e-3)
        a, b = y.chunk(2, dim=1)
        c, d = torch.split(b, [3, 1], dim=1)
        y = torch.cat([d, self.sd(a), c], 1)
        y = self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        e, f = y.split(4, 1)
        e = F.layer_norm(e.permute(0, 2, 3, 1), (4,), self.ln_w, self.ln_b, 1e-6)
        y = torch.cat([e.permute(0, 3, 1, 2), f], 1)
        return self.fc(self.pool(y).flatten(1))


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("size", [4, 8])
def test_torchvision_family_ops(tmp_path: Path, opset: int, size: int) -> None:
    torch.manual_seed(0)
    model = _Families().eval()
    policy = Policy.from_bits(model, {"conv": (4, 8), "fc": (8, 8)}, size)
    q = quantize_model(model, policy)
    calibrate(q, torch.randn(8, 3, size, size))
    path = tmp_path / "fam.onnx"
    export_onnx(q.eval(), path, input_size=size, opset=opset)
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        ref = q(x).numpy()
    np.testing.assert_allclose(run_ort(path, x), ref, rtol=1e-4, atol=1e-4)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Split" in ops and ("LayerNormalization" in ops) == (opset >= 17)
