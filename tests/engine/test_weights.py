"""--weights: PyTorch files (weights-only), containers and prefixes, renames, torchvision's cache,
a new classifier head; the file named is the file read."""

import logging

import pytest
import torch

from mpqkit.engine import load_weights
from mpqkit.errors import CheckpointError, ConfigError
from mpqkit.models import build_model


def _akamaster_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """mpqkit's resnet20 state dict in akamaster/pytorch_resnet_cifar10's layout.

    akamaster's ResNet-20 names its layers conv1, bn1, layer1.0.conv1/bn1/conv2/bn2, ... exactly
    as mpqkit does (both option-A shortcuts hold no tensors); only the classifier is ``linear``
    (mpqkit: ``fc``), and its checkpoints come from DataParallel (``module.`` on every key).
    """
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        k = "linear" + k[2:] if k.startswith("fc.") else k
        out[f"module.{k}"] = v.clone()
    return out


def _trained_like(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model("resnet20")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so they must load too
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


def test_akamaster_checkpoint_loads_with_a_prefix_rename(tmp_path):
    src = _trained_like()
    path = tmp_path / "resnet20-12fca82f.th.pth"
    torch.save({"state_dict": _akamaster_state(src), "best_prec1": 91.73}, path)
    dst = build_model("resnet20").eval()
    with pytest.raises(CheckpointError, match=r"missing 2 \(fc\.\* 2.*unexpected 2 \(linear\.\* 2"
                                              r".*--weights-map") as err:
        load_weights(dst, str(path), "resnet20", "cifar10")
    assert "\n" not in str(err.value)
    assert load_weights(dst, str(path), "resnet20", "cifar10",
                        weights_map="linear=fc") == f"fp:{path}"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_pth_is_read_not_its_safetensors_sibling(tmp_path, caplog):
    from safetensors.torch import save_file

    a, b = _trained_like(1), _trained_like(2)
    torch.save(a.state_dict(), tmp_path / "w.pth")
    save_file(b.state_dict(), str(tmp_path / "w.safetensors"))  # a sibling with other weights
    m = build_model("resnet20")
    assert load_weights(m, str(tmp_path / "w.pth"), "resnet20", "cifar10") == \
        f"fp:{tmp_path / 'w.pth'}"
    assert torch.equal(m.fc.weight, a.fc.weight)
    (tmp_path / "w.safetensors").unlink()
    m2 = build_model("resnet20")
    load_weights(m2, str(tmp_path / "w.pth"), "resnet20", "cifar10")  # no sibling needed
    assert torch.equal(m2.conv1.weight, a.conv1.weight)
    for suffix in (".pt", ".bin", ".ckpt"):
        torch.save({"model": a.state_dict()}, tmp_path / f"w{suffix}")
        m3 = build_model("resnet20")
        load_weights(m3, str(tmp_path / f"w{suffix}"), "resnet20", "cifar10")
        assert torch.equal(m3.conv1.weight, a.conv1.weight)


def test_finetune_logs_the_pth_it_read(tiny_folder, tmp_path):
    from mpqkit.data import DataConfig
    from mpqkit.engine import RunConfig, train

    torch.save(_trained_like().state_dict(), tmp_path / "w.pth")
    cfg = RunConfig(model="resnet20", epochs=1, out=str(tmp_path / "run"), save_every_min=0.0,
                    weights=str(tmp_path / "w.pth"), max_steps_per_epoch=1, num_classes=10)
    cfg.data = DataConfig(name=f"imagefolder:{tiny_folder}", batch_size=8, input_size=32)
    res = train(cfg)
    log = (res.run_dir / "log.txt").read_text()
    assert f"weights: {tmp_path / 'w.pth'}" in log and "w.safetensors" not in log


def test_pickled_objects_are_refused_not_executed(tmp_path):
    import argparse

    torch.save({"state_dict": build_model("resnet20").state_dict(),
                "args": argparse.Namespace(lr=0.1)}, tmp_path / "full.pth")
    with pytest.raises(CheckpointError, match="weights-only load refuses.*torch.save"):
        load_weights(build_model("resnet20"), str(tmp_path / "full.pth"), "resnet20", "cifar10")
    with pytest.raises(CheckpointError, match="unknown suffix '.npz'"):
        load_weights(build_model("resnet20"), str(tmp_path / "w.npz"), "resnet20", "cifar10")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(build_model("resnet20"), str(tmp_path / "none.pth"), "resnet20", "cifar10")


def test_weights_map_syntax_errors_are_one_line():
    m = build_model("resnet20")
    for bad in ("linear", "linear=fc,=x", "a=b c"):
        with pytest.raises(ConfigError, match="--weights-map entry"):
            load_weights(m, "x.pth", "resnet20", "cifar10", weights_map=bad)
    with pytest.raises(ConfigError, match="apply to --weights"):
        load_weights(m, None, "resnet20", "cifar10", new_head=True)


def test_torchvision_weights_absent_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    m = build_model("resnet18", num_classes=10)
    with pytest.raises(CheckpointError) as err:
        load_weights(m, "torchvision", "resnet18", "cifar10")
    msg = str(err.value)
    want = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "\n" not in msg and str(want) in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    with pytest.raises(ConfigError, match="no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_weights(m, "torchvision:IMAGENET9K", "resnet18", "cifar10")
    with pytest.raises(ConfigError, match="not a torchvision model"):
        load_weights(build_model("resnet20"), "torchvision", "resnet20", "cifar10")


def test_torchvision_weights_from_the_cache_with_a_new_head(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(0)
    imagenet = build_model("resnet18", num_classes=1000)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cached)
    m = build_model("resnet18", num_classes=10)
    head = m.fc.weight.detach().clone()
    with pytest.raises(CheckpointError, match="1000 classes in its classifier fc but the model "
                                              "has 10: pass --new-head"):
        load_weights(m, "torchvision:IMAGENET1K_V1", "resnet18", "cifar10")
    caplog.set_level(logging.INFO, logger="mpqkit")
    logger = logging.getLogger("mpqkit")
    logger.propagate = True
    try:
        init = load_weights(m, "torchvision:IMAGENET1K_V1", "resnet18", "cifar10", new_head=True)
    finally:
        logger.propagate = False
    assert init.startswith("fp:torchvision ResNet18_Weights.IMAGENET1K_V1") and str(cached) in init
    assert torch.equal(m.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(m.fc.weight, head)  # the classifier keeps its random initialisation
    assert "new head: classifier fc starts from random weights for 10 classes" in caplog.text
    assert "has 1000 classes there" in caplog.text


def test_same_class_count_with_and_without_new_head(tmp_path):
    src = _trained_like()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    m = build_model("resnet20")
    load_weights(m, str(tmp_path / "w.pt"), "resnet20", "cifar10")
    assert torch.equal(m.fc.weight, src.fc.weight)
    m2 = build_model("resnet20")
    own = m2.fc.weight.detach().clone()
    load_weights(m2, str(tmp_path / "w.pt"), "resnet20", "cifar10", new_head=True)
    assert torch.equal(m2.fc.weight, own) and torch.equal(m2.conv1.weight, src.conv1.weight)


def test_cli_flags_reach_the_run_config():
    from mpqkit.cli import build_parser

    args = build_parser().parse_args(["finetune", "--weights", "x.pth", "--weights-map",
                                      "linear=fc", "--new-head"])
    assert (args.weights, args.weights_map, args.new_head) == ("x.pth", "linear=fc", True)
