import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mpqkit import build_model, profile_model
from mpqkit.complexity import compute_complexity, format_count, parse_count
from mpqkit.errors import ConfigError, ModelError


def test_resnet18_224_macs():
    infos = profile_model(build_model("resnet18", num_classes=1000), 224)
    assert sum(i.macs for i in infos.values()) == 1_814_073_344
    assert len(infos) == 21 and list(infos)[0] == "conv1" and list(infos)[-1] == "fc"


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("mobilenet_v2_cifar", 32),
                                       ("resnet18", 64), ("mobilenet_v2", 96)])
def test_cross_check_with_torch_flop_counter(name, size):
    model = build_model(name, num_classes=10).eval()
    macs = sum(i.macs for i in profile_model(model, size).values())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert counter.get_total_flops() == 2 * macs


def test_profile_counts_depthwise_groups():
    infos = profile_model(build_model("mobilenet_v2_cifar"), 32)
    dw = infos["features.1.conv.0.0"]
    assert dw.groups == 32 and dw.macs == 32 * 9 * 32 * 32


def test_complexity_totals():
    infos = profile_model(build_model("resnet20"), 32)
    bits = {n: (4, 4) for n in infos}
    c = compute_complexity(infos, bits, (32, 32))
    assert c.bitops == 16 * c.macs
    assert c.size_mb == pytest.approx(sum(i.params for i in infos.values()) * 4 / 8 / 1e6)
    assert c.avg_w_bits == 4 and c.avg_a_bits == 4


def test_count_parsing():
    assert parse_count("1.2G") == 1.2e9 and parse_count("350m") == 3.5e8
    assert format_count(1_814_073_344) == "1.814G"
    with pytest.raises(ConfigError):
        parse_count("lots")


def test_wrong_input_size_is_a_clear_error():
    from torch import nn

    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    assert profile_model(fixed, 8)["2"].macs == 144 * 10
    with pytest.raises(ModelError, match="input size"):
        profile_model(fixed, 16)
