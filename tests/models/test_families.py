"""Every torchvision classification family (and a few timm models) goes through every step:
quantize (mixed w4a8, first/last 8/8) -> forward -> two QAT steps (finite) -> ONNX export ->
onnxruntime computes what PyTorch computes -> HAWQ sensitivities (Hessian traces with the
``joint`` estimator; an op without a second derivative falls back to ``ggn`` with one warning)
-> a one-step EdMIPS search in the budget band.

CI runs one small model per family at 32 px, batch 2 (``tiny_families``: torchvision's classes,
reduced where the smallest shipped model is heavy). ``MPQKIT_TEST_FULL_FAMILIES=1`` runs
torchvision's smallest shipped model of each family instead, VGG, AlexNet and Inception-V3
included (minutes).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mpqkit.complexity import policy_cost, profile_model
from mpqkit.data import DataConfig
from mpqkit.export.deploy import export_reference
from mpqkit.export.onnx_export import export_onnx
from mpqkit.export.verify import make_session
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import calibrate, quantize_model
from mpqkit.search import SearchConfig, search
from mpqkit.search.methods.hawq import layer_traces, sensitivities

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # tiny_families, importable by path for the search
tiny = importlib.import_module("tiny_families")
FULL = os.environ.get("MPQKIT_TEST_FULL_FAMILIES") == "1"
# models with an op PyTorch cannot differentiate twice (HAWQ falls back to ggn), by family or
# timm name
NOT_TWICE_DIFFERENTIABLE = {"MobileNet-V3": "hardsigmoid", "mobilenetv3_small_050": "hardsigmoid",
                            "ghostnet_100": "hardsigmoid"}
TIMM = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0", "convnext_atto", "regnetx_002",
        "ghostnet_100"]


def _cases() -> list[tuple[str, str, int]]:
    """(family, model name for build_model, input size)."""
    if FULL:
        return ([(f, full, s) for f, (_, full, s) in tiny.FAMILIES.items()]
                + [(f, n, s) for f, (n, s) in tiny.FULL_ONLY.items()])
    return [(f, f"tiny_families:{fac}", s) for f, (fac, _, s) in tiny.FAMILIES.items()]


def _mixed_policy(model: torch.nn.Module, size: int, name: str) -> Policy:
    names = list(profile_model(model, size))
    bits = {n: (4, 8) for n in names}
    bits[names[0]] = bits[names[-1]] = (8, 8)
    return Policy.from_bits(model, bits, size, model_name=name)


def quantize_train_export(name: str, size: int, tmp_path: Path) -> dict[str, float]:
    """The first five steps; returns what the table of the report shows."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    x, y = torch.randn(2, 3, size, size), torch.tensor([3, 7])
    q = quantize_model(model, _mixed_policy(model, size, name))
    calibrate(q, x)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
    q.train()
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    losses = []
    for _ in range(2):
        loss = F.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert not any(p.grad is not None and not torch.isfinite(p.grad).all()
                   for p in q.parameters())
    q.eval()
    path = tmp_path / "m.onnx"
    export_onnx(q, path, input_size=size)
    with torch.no_grad():  # what the export computes: the model with its residual quantizers
        ref = export_reference(q)(x).numpy()
    assert np.isfinite(ref).all()
    # the graph computes the PyTorch function: onnxruntime's float path (QDQ kept as float
    # ops) agrees up to the summation order, which flips a rounding now and then
    float_path = make_session(path, 1, {"session.disable_quant_qdq": "1"})
    fl = float_path.run(None, {"input": x.numpy()})[0]
    assert float(np.abs(fl - ref).max()) <= 0.05 * float(np.abs(ref).max()) + 1e-5
    out = make_session(path, threads=1).run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(out - ref).max())
    # its integer kernels requantize with their own rounding, which flips an activation level
    # now and then (random weights: logits of ~1e-2, so one flip shows): a few levels' worth
    assert diff <= 0.2 * float(np.abs(ref).max()) + 1e-5, (diff, np.abs(ref).max())
    assert (out.argmax(1) == ref.argmax(1)).all()
    return {"loss": losses[-1], "ort_max_diff": diff}


def hawq_sensitivities(key: str, name: str, size: int, caplog: pytest.LogCaptureFixture
                       ) -> str:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    x, y = torch.randn(2, 3, size, size), torch.tensor([3, 7])
    with caplog.at_level(logging.WARNING, logger="mpqkit"):
        tr = layer_traces(model, [(x, y)], iters=1, estimator="joint")
    layers = list(tr.weight)
    sens = sensitivities(model, tr, x, [2, 4, 8], [2, 4, 8], layers)
    assert all(math.isfinite(v) for d in sens.weight.values() for v in d.values())
    assert all(math.isfinite(v) for d in sens.act.values() for v in d.values())
    assert layers == list(profile_model(model, size)) and set(sens.act) == set(layers)
    op = NOT_TWICE_DIFFERENTIABLE.get(key)
    if op is not None:
        assert op in tr.fallback and tr.estimator == "ggn"
        assert any(op in r.getMessage() for r in caplog.records)
        return f"ggn (fallback: {op})"
    assert not tr.fallback, tr.fallback
    return "joint"


@pytest.fixture(scope="module")
def search_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x 2 JPEGs of 32x32 per split."""
    root = tmp_path_factory.mktemp("families") / "tiny"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.jpg")
    return root


def one_step_search(name: str, size: int, folder: Path, out: Path) -> None:
    res = search(SearchConfig(
        model=name, method="edmips", epochs=1, max_steps_per_epoch=1, out=str(out),
        overwrite=True, progress=False, device="cpu", budget="w4a4", input_size=size,
        data=DataConfig(name=f"imagefolder:{folder}", batch_size=2, input_size=size,
                        cache_dir=str(folder.parent / "cache"))))
    pol = res.policy
    pol.validate(build_model(name, num_classes=2))
    cost = policy_cost(pol.layer_infos(), pol.bits(), "bitops")
    assert 0.98 * res.budget.value - 1e-9 <= cost <= res.budget.value + 1e-9


@pytest.mark.parametrize("family,name,size", _cases(), ids=[c[0] for c in _cases()])
def test_family_every_step(family, name, size, tmp_path, search_folder, caplog):
    quantize_train_export(name, size, tmp_path)
    hawq_sensitivities(family, name, size, caplog)
    one_step_search(name, size, search_folder, tmp_path / "search")


@pytest.mark.parametrize("name", TIMM)
def test_timm_every_step(name, tmp_path, search_folder, caplog):
    pytest.importorskip("timm")
    quantize_train_export(f"timm:{name}", 32, tmp_path)
    hawq_sensitivities(name, f"timm:{name}", 32, caplog)
    one_step_search(f"timm:{name}", 32, search_folder, tmp_path / "search")
