import sys

import pytest
import torch

from mpqkit import build_model, profile_model
from mpqkit.errors import ModelError
from mpqkit.models import bundled_info, bundled_weights


@pytest.mark.parametrize("name,params", [("resnet20", 0.27e6), ("resnet32", 0.46e6),
                                         ("resnet56", 0.85e6)])
def test_cifar_resnets(name, params):
    m = build_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - params) / params < 0.03
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("cifar,tv", [("resnet18_cifar", "resnet18"),
                                      ("mobilenet_v2_cifar", "mobilenet_v2")])
def test_cifar_variants_share_torchvision_layer_names(cifar, tv):
    a = profile_model(build_model(cifar, num_classes=10), 32)
    b = profile_model(build_model(tv, num_classes=200), 64)
    assert list(a) == list(b)


def test_user_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model("mymodels:tiny", num_classes=7)
    assert m(torch.zeros(1, 3, 8, 8)).shape == (1, 7)
    sys.modules.pop("mymodels", None)


@pytest.mark.parametrize("name,match", [("resnet21", "unknown model"),
                                        ("no_such_pkg:f", "cannot import"),
                                        ("torch:no_such_factory", "no callable")])
def test_unknown_models(name, match):
    with pytest.raises(ModelError, match=match):
        build_model(name)


@pytest.mark.parametrize(("dataset", "classes", "floor"), [("cifar10", 10, 80),
                                                          ("tiny-imagenet-32", 200, 35)])
def test_bundled_resnet20_checkpoints_load(dataset, classes, floor):
    path = bundled_weights("resnet20", dataset)
    assert path is not None, f"the bundled {dataset} checkpoint is missing"
    from mpqkit.engine.checkpoint import load_model_state, read_checkpoint

    tensors, _ = read_checkpoint(path)
    load_model_state(build_model("resnet20", num_classes=classes), tensors, str(path))
    info = bundled_info("resnet20", dataset)
    assert info is not None and info["test_top1"] > floor and info["dataset"] == dataset


@pytest.mark.parametrize("name,size", [("googlenet", 32), ("inception_v3", 75)])
def test_auxiliary_classifiers_are_off(name, size):
    """GoogLeNet and Inception-V3 return one logits tensor in training too (no auxiliary
    heads), the form every mpqkit step takes; torchvision's default stays reachable."""
    m = build_model(name, num_classes=5).train()
    out = m(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    assert build_model("googlenet", num_classes=5, aux_logits=True).aux1 is not None


def test_timm_models_by_name():
    pytest.importorskip("timm")
    m = build_model("timm:resnet18", num_classes=7)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ModelError, match="timm has no model 'resnet_nope'.*close: .*resnet"):
        build_model("timm:resnet_nope")


def test_timm_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ModelError, match=r"needs the timm package: pip install 'mpqkit\[timm\]'"):
        build_model("timm:resnet18")
