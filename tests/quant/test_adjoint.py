"""A convolution of the data batch gets its input step's gradient without the input's gradient
(mpqkit.quant.adjoint): the same values as the usual path, first and second order."""

import copy

import pytest
import torch
from torch import nn

from mpqkit import Policy, calibrate, quantize_model
from mpqkit.models import build_model
from mpqkit.quant import LSQQuantizer, QConv2d, QuantConfig


def _pair(conv: nn.Conv2d, x: torch.Tensor, a_bits: int = 8) -> tuple[nn.Module, nn.Module]:
    """The layer, and a copy whose input quantizer takes the usual path (a hook forces it)."""
    torch.manual_seed(0)
    q = QConv2d.from_float(conv, 4, a_bits)
    calibrate(q, x)
    usual = copy.deepcopy(q)
    usual.aq.register_forward_hook(lambda *a: None)
    return q, usual


def _grads(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    m(x).backward(g)
    return {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=2, dilation=2),
                                dict(groups=3, bias=False), dict(padding=0, stride=(2, 1))])
def test_constant_input_gives_the_usual_values_and_gradients(kw: dict) -> None:
    conv = nn.Conv2d(3, 6, 3, **kw)
    x = torch.randn(4, 3, 11, 11) * 2  # signed, some values clipped at 4 bits
    q, usual = _pair(conv, x, a_bits=4)
    y, y_ref = q(x), usual(x)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_ConstantInputConvBackward"
    assert type(y_ref.grad_fn).__name__ == "ConvolutionBackward0"  # the reference is usual
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    got, ref = _grads(q, x, g), _grads(usual, x, g)
    assert set(got) == set(ref) and all(v is not None for v in got.values())
    for n in ref:  # the step's gradient is one sum in another order: float rounding only
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    assert got["aq.scale"].abs().item() > 0


@pytest.mark.parametrize("raw", [-0.05, 1e-9, -1e-9])
def test_the_raw_step_sign_and_floor(raw: float) -> None:
    """The LSQ parameter is raw: the step is |raw| floored, its gradient through both."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    q, usual = _pair(conv, x, a_bits=4)
    with torch.no_grad():
        q.aq.scale.fill_(raw), usual.aq.scale.fill_(raw)
    g = torch.randn(2, 4, 6, 6)
    got, ref = _grads(q, x, g), _grads(usual, x, g)
    torch.testing.assert_close(got["aq.scale"], ref["aq.scale"], rtol=1e-5, atol=1e-7)
    if abs(raw) < 1e-8:
        assert got["aq.scale"].item() == 0.0  # below the floor the step does not move


def test_nonfinite_input_gives_a_nonfinite_step_gradient() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    q, _ = _pair(conv, x)
    x[0, 1, 2, 3] = float("inf")
    y = q(x)
    assert type(y.grad_fn).__name__ == "_ConstantInputConvBackward"
    torch.autograd.backward(y, torch.ones_like(y))
    assert not torch.isfinite(q.aq.scale.grad).all()


class _HalfGradLSQ(LSQQuantizer):
    """A subclass with its own quantization (half the step's gradient)."""

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale.abs()
        return torch.round(torch.clamp(x / s, *self.int_range())) * (s * 0.5 + s.detach() * 0.5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("case", ["unbatched", "backward_hook", "global_hook", "subclass"])
def test_what_the_path_cannot_serve_takes_the_usual_one(case: str) -> None:
    """Unbatched inputs, quantizer hooks of any kind and quantizers with their own form run as
    before (no error, hooks called, the subclass's gradient)."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    q, _ = _pair(conv, x)
    calls: list[int] = []
    handle = None
    if case == "unbatched":
        x = x[0]
    elif case == "backward_hook":
        q.aq.register_full_backward_hook(lambda *a: calls.append(1))
    elif case == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: calls.append(1) if m is q.aq else None)
    else:
        sub = _HalfGradLSQ(8)
        sub.load_state_dict(q.aq.state_dict())
        q.aq = sub
    try:
        y = q(x)
        assert type(y.grad_fn).__name__ != "_ConstantInputConvBackward"
        y.sum().backward()
    finally:
        if handle is not None:
            handle.remove()
    assert q.aq.scale.grad is not None
    if case in ("backward_hook", "global_hook"):
        assert calls


def test_an_input_that_needs_a_gradient_takes_the_usual_path() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    q, usual = _pair(conv, x)
    xr = x.clone().requires_grad_()
    y = q(xr)
    assert type(y.grad_fn).__name__ != "_ConstantInputConvBackward"
    y.sum().backward()
    assert xr.grad is not None


def test_autocast_takes_the_usual_path() -> None:
    """Under CPU autocast the convolution runs in bfloat16: the usual path (the constant-input
    one failed there in oneDNN with mixed dtypes)."""
    conv = nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    q, _ = _pair(conv, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert q.aq.scale.grad is not None and torch.isfinite(q.aq.scale.grad).all()


def test_double_backward_matches_the_usual_graph() -> None:
    """A Hessian-vector product over the weight and both steps, as HAWQ-style code takes it."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8) * 2
    q, usual = _pair(conv, x, a_bits=3)
    torch.manual_seed(1)
    vs = None
    out = []
    for m in (q, usual):
        params = [m.weight, m.aq.scale, m.wq.scale]
        loss = (m(x) ** 2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vs = vs or [torch.randn_like(p) for p in params]
        hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)
        out.append(hv)
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_folded_training_and_resnet_stem_take_it() -> None:
    """ResNet-20 quantized with folded BatchNorm: the stem takes the constant-input path in
    training, and every parameter's gradient equals the usual path's."""
    model = build_model("resnet20")
    qm = quantize_model(model, Policy.uniform(model, 4, 4, 32), QuantConfig(fold_bn=True))
    x = torch.randn(4, 3, 32, 32)
    calibrate(qm, x)
    usual = copy.deepcopy(qm)
    usual.conv1.aq.register_forward_hook(lambda *a: None)
    qm.train(), usual.train()
    seen = []
    qm.conv1.register_forward_hook(lambda m, i, o: seen.append(o.grad_fn))
    qm(x).sum().backward()
    usual(x).sum().backward()
    assert any("_ConstantInputConv" in type(f).__name__ for f in _chain(seen[0]))
    ref = dict(usual.named_parameters())
    for n, p in qm.named_parameters():
        torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-4, atol=1e-5, msg=n)


def _chain(fn, depth: int = 6) -> list:
    """``fn`` and the autograd nodes up to ``depth`` steps behind it."""
    out, frontier = [], [fn]
    for _ in range(depth):
        out += frontier
        frontier = [f for node in frontier for f, _ in node.next_functions if f is not None]
    return out
