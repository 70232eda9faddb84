"""Quantizers never hide or create a non-finite number, and stay finite on mobile networks."""

import pytest
import torch
import torch.nn.functional as F

from mpqkit.errors import NonFiniteError
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import (
    LSQQuantizer,
    PACTQuantizer,
    QuantConfig,
    calibrate,
    dequantize_model,
    make_act_quantizer,
    quantize_model,
)
from mpqkit.quant.fold import VAR_FLOOR, FlooredBatchNorm2d, batch_norm_floored


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


def _structured_batch(g: torch.Generator, means: torch.Tensor, n: int = 32):
    y = torch.randint(0, 10, (n,), generator=g)
    return means[y] + torch.randn(n, 3, 32, 32, generator=g), y


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize(("name", "fp_steps", "qat_steps"),
                         [("mobilenet_v2", 5, 15), ("efficientnet_b0", 20, 5)])
def test_w4a4_mobile_networks_train_with_finite_loss_and_gradients(name, fp_steps, qat_steps,
                                                                     fold):
    """The finetune defaults (BatchNorm folded, calibration, SGD lr 0.1) on a briefly trained
    network, whose running statistics are still far from its batch statistics. Before the
    fixes, EfficientNet-B0 had gradients of 1e17 at the first step and NaN at the second, and
    MobileNet-V2 (5 float steps) gradients growing to 6e30 by the 8th step and NaN after: their
    activation ranges were calibrated on quantized activations (a step of 1 everywhere) in
    eval mode, whole stages rounded to 0 in training, and the BatchNorms of the collapsed
    channels multiplied the gradient by 1/sqrt(eps) block after block."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 3, 1, 1, generator=g)
    model = build_model(name, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(fp_steps):  # a briefly trained float model
        x, y = _structured_batch(g, means)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    q = quantize_model(model, Policy.uniform(model, 4, 4, 32), QuantConfig(fold_bn=fold),
                       inplace=True)
    calibrate(q, _structured_batch(g, means, 64)[0], batch_stats=True)  # as finetune does
    opt = torch.optim.SGD(q.parameters(), lr=0.1, momentum=0.9)
    _train_finite(q, opt, g, means, qat_steps)
    assert all(torch.isfinite(t).all() for t in q.state_dict().values()
               if t.is_floating_point())


def _train_finite(q, opt, g, means, steps):
    for _ in range(steps):
        x, y = _structured_batch(g, means)
        loss = F.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        bad = [n for n, p in q.named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, bad[:5]
        opt.step()


def test_calibration_sees_float_activations_not_quantized_ones():
    """Small activations (|x| < 0.5) reach the second layer's quantizer as they are: before,
    the first layer's input quantizer ran with its uncalibrated step of 1 during calibration
    and rounded them all to 0, and the second got the smallest step there is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4))
    q = quantize_model(model, Policy.uniform(model, 4, 4, 8), inplace=True)
    x = torch.rand(64, 8) * 0.4
    calibrate(q, x)
    amax = F.linear(x, q[0].weight).abs().max().item()  # what the layer sees
    s = q[1].aq.scale.abs().item()
    assert amax / 500 < s < amax, (s, amax)  # (first and last layers: 8 bits)


def test_batch_norm_floored_bounds_the_gain_of_a_collapsed_channel():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    ref = torch.nn.BatchNorm2d(3)
    bn.running_var.fill_(4.0)
    ref.running_var.fill_(4.0)
    y = torch.randn(8, 3, 5, 5) * 2.0
    y[:, 2] = 0.7  # channel 2 made constant by quantization
    y1, y2 = y.clone().requires_grad_(), y.clone().requires_grad_()
    out = batch_norm_floored(y1, bn)
    out_ref = ref(y2)
    torch.testing.assert_close(out[:, :2], out_ref[:, :2])  # healthy channels: exactly BN
    torch.testing.assert_close(bn.running_var, ref.running_var)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    gain = y1.grad[:, 2].abs().max() / g[:, 2].abs().max()
    gain_ref = y2.grad[:, 2].abs().max() / g[:, 2].abs().max()
    assert gain_ref > 100  # nn.BatchNorm2d: 1/sqrt(eps)
    # floored: gamma / sqrt(floor) times the centred gradient (at most twice max-abs g)
    assert gain <= 2.0 / (VAR_FLOOR * 4.0) ** 0.5


def test_a_quantized_model_floors_its_batchnorms_and_a_dequantized_one_does_not():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(144, 2))
    keys = list(model.state_dict())
    q = quantize_model(model, Policy.uniform(model, 4, 4, 8))
    assert type(q[1]) is FlooredBatchNorm2d and type(model[1]) is torch.nn.BatchNorm2d
    assert list(q.state_dict()) != keys and all(k in q.state_dict() for k in keys)
    x = torch.randn(2, 3, 8, 8)
    q.eval()
    with torch.no_grad():  # eval: the plain BatchNorm's function
        torch.testing.assert_close(q[1](x[:, :3, :4, :4].repeat(1, 2, 1, 1)[:, :4]),
                                   torch.nn.BatchNorm2d.forward(q[1], x[:, :3, :4, :4]
                                                                .repeat(1, 2, 1, 1)[:, :4]))
    assert type(dequantize_model(q)[1]) is torch.nn.BatchNorm2d


def test_calibration_with_batch_statistics_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model("resnet20")
    q = quantize_model(model, Policy.uniform(model, 4, 4, 32), QuantConfig(fold_bn=True))
    q.train()
    before = {k: v.clone() for k, v in q.state_dict().items() if "running" in k
              or "num_batches" in k}
    calibrate(q, torch.randn(8, 3, 32, 32), batch_stats=True)
    assert q.training and all(m.training for m in q.modules())
    for k, v in before.items():
        assert torch.equal(q.state_dict()[k], v), k


def test_the_floor_holds_with_frozen_statistics_and_leaves_them_alone():
    """A sharpness-aware second pass freezes the statistics (track_running_stats off): the
    collapsed channel's gain stays floored and nothing of the BatchNorm changes."""
    from mpqkit.optim.bn import frozen_bn_stats

    bn = FlooredBatchNorm2d(2).train()
    bn.running_var.fill_(4.0)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    y = torch.randn(8, 2, 5, 5)
    y[:, 1] = 0.3
    y.requires_grad_()
    with frozen_bn_stats(bn):
        out = bn(y)
    g = torch.randn_like(out)
    out.backward(g)
    assert y.grad[:, 1].abs().max() / g[:, 1].abs().max() <= 2.0 / (VAR_FLOOR * 4.0) ** 0.5
    for k, v in state.items():
        assert torch.equal(bn.state_dict()[k], v), k


def test_the_floored_form_takes_bf16_values_and_keeps_float32_statistics():
    """Under autocast a convolution hands its BatchNorm bf16 values. The floored form (what
    torch.compile runs, and eager when a channel is under the floor) computes the statistics in
    float32 and updates the float32 running statistics: `finetune --amp --compile` stopped on
    a dtype error in the running-statistics update."""
    from mpqkit.quant.fold import _floored_form

    torch.manual_seed(0)
    bn, ref = FlooredBatchNorm2d(3).train(), torch.nn.BatchNorm2d(3).train()
    y = (torch.randn(8, 3, 5, 5) * 2.0 + 1.0).to(torch.bfloat16)
    out = _floored_form(y, bn, VAR_FLOOR * bn.running_var, 0.1, update=True)
    out_ref = ref(y.float())
    assert out.dtype == torch.bfloat16
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    torch.testing.assert_close(out.float(), out_ref, atol=2e-2, rtol=2e-2)
    # a float64 model keeps float64 statistics (no detour through float32)
    bn64, ref64 = FlooredBatchNorm2d(3).double().train(), torch.nn.BatchNorm2d(3).double().train()
    y64 = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 2.0 + 1.0
    out64 = _floored_form(y64, bn64, VAR_FLOOR * bn64.running_var, 0.1, update=True)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref64(y64), rtol=1e-12, atol=1e-12)
