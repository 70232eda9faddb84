import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpqkit import Policy, QConv2d, QLinear, calibrate, model_bits, quantize_model
from mpqkit.errors import PolicyError
from mpqkit.models import build_model
from mpqkit.quant import QuantConfig, dequantize_model


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_qconv_matches_conv_on_quantized_tensors(groups):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    q = QConv2d.from_float(conv, 4, 3)
    x = torch.rand(2, 8, 6, 6)
    calibrate(q, x)
    ref = F.conv2d(q.aq(x), q.wq(conv.weight), conv.bias, padding=1, groups=groups)
    assert torch.allclose(q(x), ref)
    assert q.w_bits == 4 and q.a_bits == 3
    assert q.weight is conv.weight  # parameters shared with the float layer


def test_qlinear_state_dict_loads_float_weights():
    lin = nn.Linear(5, 3)
    q = QLinear(5, 3, w_bits=8, a_bits=8)
    missing, unexpected = q.load_state_dict(lin.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith(("wq.", "aq.")) for k in missing)


def test_quantize_model_by_name_and_bits():
    model = build_model("resnet20")
    bits = {n: (8, 8) for n in Policy.uniform(model, 4, 4, 32).layers}
    bits["layer2.1.conv2"] = (2, 6)
    bits["layer3.0.conv1"] = (6, 3)
    pol = Policy.from_bits(model, bits, 32)
    q = quantize_model(model, pol, QuantConfig(per_channel=True))
    assert model_bits(q) == bits
    assert not any(isinstance(m, QConv2d) for m in model.modules())  # original untouched
    q2 = quantize_model(q, Policy.uniform(model, 3, 3, 32))  # re-quantize with new bits
    assert model_bits(q2)["layer2.1.conv2"] == (3, 3)
    fl = dequantize_model(q2)
    assert not any(isinstance(m, QConv2d | QLinear) for m in fl.modules())


def test_policy_that_does_not_fit_is_refused_with_names():
    model = build_model("resnet20")
    pol = Policy.uniform(build_model("resnet32"), 4, 4, 32)
    with pytest.raises(PolicyError) as exc:
        quantize_model(model, pol)
    msg = str(exc.value)
    assert "layer1.3.conv1" in msg and "not in the model" in msg and "\n" not in msg


def test_calibration_decides_activation_sign():
    model = build_model("resnet20")
    q = quantize_model(model, Policy.uniform(model, 4, 4, 32))
    calibrate(q, torch.randn(8, 3, 32, 32))
    assert q.conv1.aq.signed is True  # normalized image
    assert q.layer1[0].conv1.aq.signed is False  # after ReLU
    assert q.fc.aq.signed is False  # pooled ReLU features
    assert q.conv1.w_bits == 8 and q.layer1[0].conv1.w_bits == 4


def test_first_last_full_precision_option():
    model = build_model("resnet20")
    pol = Policy.uniform(model, 4, 4, 32, first_last="fp")
    q = quantize_model(model, pol)
    assert q.conv1.w_bits == 32 and q.fc.a_bits == 32
    x = torch.randn(2, 3, 32, 32)
    calibrate(q, x)
    assert torch.isfinite(q(x)).all()
