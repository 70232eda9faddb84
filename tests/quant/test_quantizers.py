import pytest
import torch

from mpqkit.errors import ConfigError
from mpqkit.quant import (
    LSQQuantizer,
    MaxAbsQuantizer,
    PACTQuantizer,
    check_bits,
    make_act_quantizer,
    make_weight_quantizer,
)
from mpqkit.quant.quantizers import DoReFaQuantizer, int_range


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_weight_levels_and_range(bits):
    q = make_weight_quantizer("lsq", bits, out_channels=4)
    w = torch.linspace(-3, 3, 20000).reshape(4, -1)
    q.init_from(w)
    ints = q.to_int(w)
    qmax = 2 ** (bits - 1) - 1
    assert ints.min().item() == -qmax and ints.max().item() == qmax
    assert torch.unique(ints).numel() == 2**bits - 1  # symmetric: zero is a level
    out = q(w)
    scale = q.qparams(w)[0]
    assert torch.allclose(out.abs().max(), qmax * scale.max())
    assert torch.allclose(out / scale, torch.round(out / scale), atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_levels_unsigned_and_signed(bits):
    q = make_act_quantizer("lsq", bits)
    x = torch.linspace(0, 10, 10001)
    q.init_from(x)
    assert q.signed is False
    assert int_range(bits, False, False) == (0, 2**bits - 1)
    assert torch.unique(q.to_int(x)).numel() == 2**bits
    qs = make_act_quantizer("lsq", bits)
    xs = torch.linspace(-5, 5, 10001)
    qs.init_from(xs)
    assert qs.signed is True
    ints = qs.to_int(xs)
    assert ints.min() == -(2 ** (bits - 1)) and ints.max() == 2 ** (bits - 1) - 1


def test_lsq_gradients_match_formula():
    q = LSQQuantizer(3, signed=True, symmetric=True)
    q.init_from(torch.randn(1000))
    s = q.scale.detach().clone()
    x = (torch.randn(200) * 2).requires_grad_(True)
    out = q(x)
    out.sum().backward()
    xs = x.detach() / s
    qmin, qmax = -3, 3
    inside = (xs >= qmin) & (xs <= qmax)
    # straight-through inside the range, zero outside
    assert torch.equal(x.grad, inside.float())
    expected = torch.where(inside, xs.round() - xs, xs.round().clamp(qmin, qmax)).sum()
    expected = expected / (x.numel() * qmax) ** 0.5
    assert torch.allclose(q.scale.grad, expected.reshape(1), atol=1e-5)


def test_per_channel_scales_and_grad_shape():
    q = make_weight_quantizer("lsq", 4, out_channels=8, per_channel=True)
    w = torch.randn(8, 3, 3, 3) * torch.arange(1, 9).view(8, 1, 1, 1)
    q.init_from(w)
    scale = q.qparams(w)[0]
    assert scale.shape == (8, 1, 1, 1)
    flat = scale.flatten()
    assert flat[-1] > 3 * flat[0]  # follows the channel magnitudes (8x apart)
    q(w.requires_grad_(True)).sum().backward()
    assert q.scale.grad.shape == (8,)


def test_pact_clip_gradient():
    q = PACTQuantizer(4, signed=False)
    q.init_from(torch.rand(1000))
    x = torch.tensor([0.1, 0.5, 5.0, 7.0], requires_grad=True)
    q(x).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(2.0, abs=0.3)  # two inputs above the clip
    assert x.grad[2].item() == 0 and x.grad[0].item() == 1


@pytest.mark.parametrize("cls", [MaxAbsQuantizer, DoReFaQuantizer])
def test_maxabs_and_dorefa_levels(cls):
    q = cls(3, signed=True, symmetric=True)
    w = torch.randn(500)
    out = q(w)
    scale, qmin, qmax = q.qparams(w)
    ints = out / scale
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert ints.min() >= qmin and ints.max() <= qmax
    assert torch.unique(ints.round()).numel() <= 7


def test_full_precision_is_identity():
    q = make_act_quantizer("lsq", 32)
    x = torch.randn(10)
    assert torch.equal(q(x), x)


@pytest.mark.parametrize("bad", [1, 9, 16, 33, 4.5, "4", True])
def test_bits_outside_range_refused(bad):
    with pytest.raises(ConfigError, match="bits"):
        check_bits(bad)


def test_lazy_init_from_first_batch():
    q = make_act_quantizer("lsq", 4)
    assert not bool(q.initialized)
    q(torch.rand(100) * 3)
    assert bool(q.initialized) and q.signed is False
