"""The supernet: mixed layers, one convolution per layer, expected complexity, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mpqkit.complexity import policy_cost
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import QConv2d, QLinear, QuantConfig, make_act_quantizer, make_weight_quantizer
from mpqkit.search.supernet import (
    MixedConv2d,
    MixedLinear,
    Supernet,
    build_supernet,
    mix_quantized,
    parse_candidates,
)

CANDS = (2, 3, 4, 6)


class CountConv(TorchDispatchMode):
    """Counts aten convolution calls (forward only)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket is torch.ops.aten.convolution:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _mixed_and_q(cls_m, cls_q, module, x, w, a, config=None):  # type: ignore[no-untyped-def]
    config = config or QuantConfig()
    mixed = cls_m.from_float(copy.deepcopy(module), CANDS, CANDS, config)
    with torch.no_grad():
        for q in mixed.wqs:
            q.init_from(mixed.weight)
        for q in mixed.aqs:
            q.init_from(x)
    mixed.set_one_hot(w, a)
    q = cls_q.from_float(copy.deepcopy(module), w, a, config)
    q.wq.load_state_dict(mixed.wqs[CANDS.index(w)].state_dict())
    q.aq.load_state_dict(mixed.aqs[CANDS.index(a)].state_dict())
    return mixed, q


@pytest.mark.parametrize("w,a", [(4, 3), (2, 6)])
def test_one_hot_conv_equals_qconv2d_forward_and_backward(w, a):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.relu(torch.randn(4, 8, 10, 10))
    mixed, q = _mixed_and_q(MixedConv2d, QConv2d, conv, x, w, a)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = mixed(x1), q(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(mixed.weight.grad, q.weight.grad)
    torch.testing.assert_close(mixed.wqs[CANDS.index(w)].scale.grad, q.wq.scale.grad)
    torch.testing.assert_close(mixed.aqs[CANDS.index(a)].scale.grad, q.aq.scale.grad)


def test_one_hot_linear_signed_input_per_channel_equals_qlinear():
    torch.manual_seed(1)
    lin = nn.Linear(12, 5)
    x = torch.randn(6, 12)  # signed input
    mixed, q = _mixed_and_q(MixedLinear, QLinear, lin, x, 3, 4, QuantConfig(per_channel=True))
    assert torch.equal(mixed(x), q(x))


def test_fused_mix_matches_reference_gradients():
    """The fused LSQ mixing has the gradients of sum_i p_i Q_i(x) computed by autograd."""
    torch.manual_seed(2)
    cases = [(torch.relu(torch.randn(3, 4, 5, 5)), [make_act_quantizer("lsq", b) for b in CANDS]),
             (torch.randn(3, 4, 5, 5), [make_act_quantizer("lsq", b) for b in CANDS]),
             (torch.randn(6, 4, 3, 3), [make_weight_quantizer("lsq", b, 6, True) for b in CANDS])]
    for x, qs in cases:
        for q in qs:
            q.init_from(x)
        ref_qs = copy.deepcopy(qs)
        alpha = torch.randn(len(qs), requires_grad=True)
        alpha_ref = alpha.detach().clone().requires_grad_()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = mix_quantized(x1, qs, torch.softmax(alpha, 0))
        p = torch.softmax(alpha_ref, 0)
        y2 = sum(p[i] * ref_qs[i](x2) for i in range(len(qs)))
        torch.testing.assert_close(y1, y2)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(alpha.grad, alpha_ref.grad, rtol=1e-4, atol=1e-5)
        for q, r in zip(qs, ref_qs):
            torch.testing.assert_close(q.scale.grad, r.scale.grad, rtol=1e-4, atol=1e-5)


def test_fused_mix_blocks_and_double_backward(monkeypatch):
    """Several CPU blocks give the same result; the backward is itself differentiable."""
    import mpqkit.search.supernet as sup

    torch.manual_seed(4)
    x = torch.randn(5, 7, 6, 6)
    qs = [make_act_quantizer("lsq", b) for b in CANDS]
    for q in qs:
        q.init_from(x)
    alpha = torch.randn(4, requires_grad=True)

    def grads(block: int) -> list[torch.Tensor]:
        monkeypatch.setattr(sup, "CPU_BLOCK", block)
        xr = x.clone().requires_grad_()
        y = mix_quantized(xr, qs, torch.softmax(alpha, 0))
        return list(torch.autograd.grad((y * y).sum(), [xr, alpha, *[q.scale for q in qs]]))

    for a, b in zip(grads(1 << 18), grads(100)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # double backward: a loss on dy/dx reaches the logits, as autograd on the reference does
    ref = copy.deepcopy(qs)
    v = torch.randn_like(x)
    out = []
    for mix in (True, False):
        xr = x.clone().requires_grad_()
        a = alpha.detach().clone().requires_grad_()
        p = torch.softmax(a, 0)
        y = mix_quantized(xr, qs, p) if mix else sum(p[i] * ref[i](xr) for i in range(4))
        (gx,) = torch.autograd.grad((y * v).sum(), xr, create_graph=True)
        (gx * v).sum().backward()
        out.append(a.grad)
    torch.testing.assert_close(out[0], out[1])


def test_other_quantizers_mix_generically():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    cfg = QuantConfig(weight_method="dorefa", act_method="pact")
    mixed = MixedConv2d.from_float(conv, CANDS, CANDS, cfg)
    x = torch.relu(torch.randn(2, 4, 6, 6))
    y = mixed(x)
    y.sum().backward()
    assert mixed.alpha_w.grad is not None and mixed.alpha_a.grad is not None
    assert mixed.aqs[0].alpha.grad is not None


@pytest.fixture(scope="module")
def resnet_supernet() -> tuple[nn.Module, Supernet]:
    torch.manual_seed(0)
    model = build_model("resnet20")
    sn = build_supernet(model, 16, model_name="resnet20")
    sn.calibrate(torch.randn(8, 3, 16, 16))
    return model, sn


def test_structure_and_one_convolution_per_layer(resnet_supernet):
    model, sn = resnet_supernet
    assert sn.fixed_bits == {"conv1": (8, 8), "fc": (8, 8)}
    assert len(sn.searchable) == 18 and all(n not in sn.fixed_bits for n in sn.searchable)
    assert isinstance(sn.net.conv1, QConv2d) and isinstance(sn.net.fc, QLinear)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    counter = CountConv()
    with torch.no_grad(), counter:
        sn(torch.randn(2, 3, 16, 16))
    assert counter.calls == n_convs == 19  # one per layer, not one per candidate pair
    counter = CountConv()
    with torch.no_grad(), counter:
        sn.net.layer1[0].conv1(torch.randn(2, 16, 8, 8))
    assert counter.calls == 1


def test_expected_complexity_equals_policy_cost_when_one_hot(resnet_supernet):
    _, sn = resnet_supernet
    sn = copy.deepcopy(sn)
    gen = torch.Generator().manual_seed(5)
    for m in sn.mixed_layers().values():
        w = CANDS[int(torch.randint(4, (1,), generator=gen))]
        a = CANDS[int(torch.randint(4, (1,), generator=gen))]
        m.set_one_hot(w, a)
    bits = sn.argmax_bits()
    for kind in ("bitops", "size_mb"):
        expected = float(sn.expected_complexity(kind).detach())
        assert expected == pytest.approx(policy_cost(sn.infos, bits, kind), rel=1e-9)
    pol = sn.policy()
    bitops = float(sn.expected_complexity("bitops").detach())
    assert bitops == pytest.approx(pol.complexity().bitops, rel=1e-9)
    # uniform logits: E[b] is the mean candidate
    sn2 = build_supernet(build_model("resnet20"), 16)
    ew, ea = sn2.expected_bits()
    assert torch.allclose(ew, torch.full_like(ew, sum(CANDS) / 4))


def test_gradient_reaches_logits_weights_and_steps(resnet_supernet):
    _, sn = resnet_supernet
    sn = copy.deepcopy(sn)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(sn(x), y) + sn.expected_complexity("bitops").float() / 1e8
    loss.backward()
    for name, m in sn.mixed_layers().items():
        assert m.alpha_w.grad is not None and m.alpha_w.grad.abs().sum() > 0, name
        assert m.alpha_a.grad is not None and m.alpha_a.grad.abs().sum() > 0, name
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name
        assert all(q.scale.grad is not None for q in [*m.wqs, *m.aqs]), name
    arch = {id(p) for p in sn.arch_parameters()}
    assert len(arch) == 36 and not arch & {id(p) for p in sn.weight_parameters()}


def test_policy_decidedness_and_modes(resnet_supernet):
    model, sn = resnet_supernet
    pol = sn.policy(provenance={"method": "test"})
    assert isinstance(pol, Policy)
    pol.validate(model)
    assert pol.provenance["method"] == "test" and pol.layers["conv1"].fixed
    d = sn.decidedness()
    assert set(d) == set(sn.searchable) and all(0.0 <= v <= 1.0 for v in d.values())
    probs = sn.alpha_probs()
    assert len(probs["layer1.0.conv1"]["w"]) == 4
    fp = build_supernet(build_model("resnet20"), 16, first_last="fp")
    assert fp.fixed_bits["conv1"] == (32, 32)
    assert fp.fixed_cost("bitops") == 0.0 and fp.fixed_cost("size_mb") > 0
    full = build_supernet(build_model("resnet20"), 16, first_last="search", w_bits="2,4",
                          a_bits=[4, 8])
    assert not full.fixed_bits and len(full.searchable) == 20
    assert isinstance(full.net.fc, MixedLinear) and full.net.fc.a_candidates == (4, 8)


def test_calibration_initialises_every_quantizer(resnet_supernet):
    _, sn = resnet_supernet
    for m in sn.net.modules():
        if hasattr(m, "initialized") and m.enabled:
            assert int(m.initialized) == 1


def test_parse_candidates_errors():
    assert parse_candidates("6,2, 3") == (2, 3, 6)
    from mpqkit.errors import ConfigError

    with pytest.raises(ConfigError, match="2..8"):
        parse_candidates("2,9")
    with pytest.raises(ConfigError, match="full precision"):
        parse_candidates([4, 32])
    with pytest.raises(ConfigError, match="commas"):
        parse_candidates("a,b")


def test_set_policy_and_rate_policy(resnet_supernet):
    """A policy's sub-network is rated on a copy (the supernet is untouched), with its own
    BatchNorm statistics; bad policies get one-line errors."""
    from mpqkit.errors import ConfigError
    from mpqkit.search import rate_policy

    _, sn = resnet_supernet
    gen = torch.Generator().manual_seed(3)
    bits = {n: (CANDS[int(torch.randint(4, (1,), generator=gen))],
                CANDS[int(torch.randint(4, (1,), generator=gen))]) for n in sn.searchable}
    before = copy.deepcopy(sn.state_dict())
    x = torch.randn(16, 3, 16, 16)
    batches = [(x[:8], torch.randint(0, 10, (8,))), (x[8:], torch.randint(0, 10, (8,)))]
    r = rate_policy(sn, bits, batches[:1], batches)
    assert r["n"] == 16 and 0.0 <= r["top1"] <= r["top5"] <= 100.0 and r["loss"] > 0
    after = sn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # logits, BN stats kept
    assert rate_policy(sn, bits, batches[:1], batches) == r  # deterministic
    other = rate_policy(sn, {n: (2, 2) for n in sn.searchable}, batches[:1], batches)
    assert other["loss"] != r["loss"]  # the policy changes the sub-network
    one = copy.deepcopy(sn)
    one.set_policy(bits)
    assert {n: one.argmax_bits()[n] for n in sn.searchable} == bits
    with pytest.raises(ConfigError, match="no bits for searchable layer"):
        one.set_policy({n: b for n, b in bits.items() if n != "layer1.0.conv1"})
    with pytest.raises(ConfigError, match="not among the supernet's candidates"):
        one.set_policy({**bits, "layer1.0.conv1": (5, 3)})
    with pytest.raises(ConfigError, match="at least one batch"):
        rate_policy(sn, bits, [], batches)
