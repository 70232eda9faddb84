"""Quantizers never hide or create a non-finite number, and stay finite on mobile networks."""

import pytest
import torch
import torch.nn.functional as F

from mpqkit.errors import NonFiniteError
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import LSQQuantizer, PACTQuantizer, calibrate, make_act_quantizer, quantize_model


def test_an_infinite_input_is_passed_on_not_clamped_to_qmax():
    for q in (make_act_quantizer("lsq", 4), PACTQuantizer(4)):
        q.init_from(torch.linspace(-1, 1, 100))
        out = q(torch.tensor([0.5, float("inf"), -float("inf"), float("nan")]))
        assert torch.isfinite(out[0])
        assert out[1] == float("inf") and out[2] == -float("inf") and torch.isnan(out[3])


def test_lsq_backward_gives_zero_not_nan_outside_the_range():
    q = LSQQuantizer(4, signed=True, symmetric=True)
    q.init_from(torch.linspace(-1, 1, 100))
    x = torch.tensor([0.1, 5.0, -5.0], requires_grad=True)
    q(x).backward(torch.full((3,), float("inf")))
    assert x.grad.tolist() == [float("inf"), 0.0, 0.0]


def test_calibration_on_nonfinite_values_is_an_error():
    q = make_act_quantizer("lsq", 4)
    with pytest.raises(NonFiniteError, match="calibrated on a tensor holding NaN or inf"):
        q.init_from(torch.tensor([1.0, float("inf")]))


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_w4a4_mobile_networks_train_with_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    q = quantize_model(model, Policy.uniform(model, 4, 4, 32), inplace=True)
    calibrate(q, torch.randn(4, 3, 32, 32))
    opt = torch.optim.SGD(q.parameters(), lr=0.1, momentum=0.9)
    q.train()
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        loss = F.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        bad = [n for n, p in q.named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, bad[:5]
        opt.step()
    assert all(torch.isfinite(t).all() for t in q.state_dict().values()
               if t.is_floating_point())
