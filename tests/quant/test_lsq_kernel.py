"""The blocked CPU LSQ kernel has the values and gradients of the reference form; quantized
models compile without graph breaks or recompilations."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpqkit.quant.quantizers as Q
from mpqkit.quant import QConv2d, QLinear, QuantConfig, make_act_quantizer


class _ReferenceLSQ(torch.autograd.Function):
    """mpqkit's LSQ before the CPU kernel (commit e162316), kept verbatim as the reference."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_scale, reduce_dims):
        xs = x.float() / scale.float()
        q = Q.keep_nonfinite(xs.round().clamp_(qmin, qmax), xs)
        ctx.save_for_backward(xs, q)
        ctx.qmin, ctx.qmax, ctx.grad_scale, ctx.reduce_dims = qmin, qmax, grad_scale, reduce_dims
        ctx.scale_shape, ctx.scale_dtype, ctx.x_dtype = scale.shape, scale.dtype, x.dtype
        return (q * scale.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xs, q = ctx.saved_tensors
        grad = grad.float()
        inside = (xs >= ctx.qmin) & (xs <= ctx.qmax)
        grad_x = torch.where(inside, grad, 0.0).to(ctx.x_dtype)
        ds = torch.where(inside, q - xs, q) * grad
        grad_s = ds.sum(dim=ctx.reduce_dims, keepdim=True) if ctx.reduce_dims else ds.sum()
        grad_s = (grad_s.reshape(ctx.scale_shape) * ctx.grad_scale).to(ctx.scale_dtype)
        return grad_x, grad_s, None, None, None, None


def _run(fn, x, s, g, qmin, qmax, gs):
    x = x.clone().requires_grad_()
    s = s.clone().requires_grad_()
    y = fn(x, s.reshape([1] * x.dim()), qmin, qmax, gs)
    y.backward(g)
    return y.detach(), x.grad, s.grad, y.grad_fn


CASES = [((128, 16, 32, 32), 0, 15, True), ((64, 32, 16, 16), -8, 7, False),
         ((7, 5, 3), -1, 1, False), ((300001,), 0, 3, True), ((4, 8, 9, 9), -127, 127, False)]


@pytest.mark.parametrize("shape,qmin,qmax,relu", CASES)
def test_cpu_kernel_matches_the_reference(shape, qmin, qmax, relu):
    torch.manual_seed(0)
    x = torch.randn(shape) * 0.7
    x = x.relu() if relu else x
    s, g = torch.tensor([0.137]), torch.randn(shape)
    gs = 1 / math.sqrt(x.numel() * qmax)
    y1, gx1, gs1, fn = _run(Q.lsq_quantize, x, s, g, qmin, qmax, gs)
    y2, gx2, gs2, _ = _run(lambda *a: _ReferenceLSQ.apply(*a, ()), x, s, g, qmin, qmax, gs)
    assert type(fn).__name__ == "_LSQTensorCPUBackward"
    assert torch.equal(y1, y2)  # same values, bit for bit
    assert torch.equal(gx1, gx2)  # same input gradient, bit for bit
    torch.testing.assert_close(gs1, gs2, rtol=2e-5, atol=1e-7)  # sums in another order


def test_blocks_ties_and_boundaries(monkeypatch):
    """Several blocks (one partial), exact .5 ties and values on the range ends."""
    s = torch.tensor([0.25])
    x = torch.cat([torch.arange(-20, 21) * 0.125, torch.randn(997)])  # ties, ends, beyond
    g = torch.randn_like(x)
    ref = _run(lambda *a: _ReferenceLSQ.apply(*a, ()), x, s, g, -4, 3, 0.1)
    monkeypatch.setattr(Q, "LSQ_CPU_BLOCK", 100)
    out = _run(Q.lsq_quantize, x, s, g, -4, 3, 0.1)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-7)


def test_nonfinite_values_take_the_reference_path():
    s = torch.tensor([0.1])
    x = torch.tensor([0.05, float("inf"), -float("inf"), float("nan"), 3.0, -0.2])
    for g in (torch.ones(6), torch.tensor([float("inf"), 1, 1, 1, float("inf"), 1.0])):
        out = _run(Q.lsq_quantize, x, s, g, 0, 7, 0.5)
        ref = _run(lambda *a: _ReferenceLSQ.apply(*a, ()), x, s, g, 0, 7, 0.5)
        for a, b in zip(out[:3], ref[:3]):
            torch.testing.assert_close(a, b, equal_nan=True)


def test_double_backward_matches_the_reference():
    torch.manual_seed(1)
    x0, v = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    out = []
    for fn in (Q.lsq_quantize, lambda *a: _ReferenceLSQ.apply(*a, ())):
        x = x0.clone().requires_grad_()
        s = torch.tensor([0.3], requires_grad=True)
        y = fn(x, s.reshape(1, 1, 1, 1), -8, 7, 0.2)
        gx, gs = torch.autograd.grad((y * y).sum(), (x, s), create_graph=True)
        ((gx * v).sum() + 3 * gs.sum()).backward()
        out.append((gx.detach(), gs.detach(), x.grad, s.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("raw", [0.137, -0.137, 1e-9, 0.0])
def test_quantizer_step_gradient_through_abs_and_floor(raw, monkeypatch):
    """The kernel takes the raw LSQ parameter (|s| floored at MIN_RANGE inside): same values
    and gradients as the autograd chain ``abs -> clamp_min`` of the reference path, for a
    negative step, one below the floor and zero."""
    out = []
    for use in (True, False):
        torch.manual_seed(4)
        if not use:
            monkeypatch.setattr(Q, "_use_cpu_kernel", lambda *a: False)
        q = Q.LSQQuantizer(3, signed=False)
        q.init_from(torch.rand(2, 4, 6, 6))
        q.scale.data.fill_(raw)
        x = (torch.randn(2, 4, 6, 6) * 0.4).relu().requires_grad_()
        y = q(x)
        y.backward(torch.randn_like(y))
        out.append((y.detach(), x.grad, q.scale.grad, y.grad_fn))
    assert type(out[0][3]).__name__ == "_LSQTensorCPUBackward"
    assert type(out[1][3]).__name__ != "_LSQTensorCPUBackward"
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    torch.testing.assert_close(out[0][2], out[1][2], rtol=2e-5, atol=0.0)
    if raw < 0:
        assert out[0][2].item() != 0  # the sign flips it, it does not vanish


class _Net(nn.Module):
    def __init__(self, act: str = "lsq", per_channel: bool = False) -> None:
        super().__init__()
        cfg = QuantConfig(act_method=act, per_channel=per_channel)
        self.c1 = QConv2d(3, 8, 3, padding=1, w_bits=4, a_bits=8, config=cfg)
        self.c2 = QConv2d(8, 8, 3, padding=1, w_bits=2, a_bits=3, config=cfg)
        self.fc = QLinear(8, 10, w_bits=4, a_bits=4, config=cfg)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def test_model_gradients_match_the_reference_kernel(monkeypatch):
    """Weights', inputs' and steps' gradients of a QAT model, new kernel vs reference."""
    torch.manual_seed(2)
    net = _Net()
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 10, (6,))
    net(x)  # calibrates every quantizer on first use
    ref = copy.deepcopy(net)
    grads = []
    for model, use in ((net, True), (ref, False)):
        if not use:
            monkeypatch.setattr(Q, "_use_cpu_kernel", lambda *a: False)
        xr = x.clone().requires_grad_()
        F.cross_entropy(model(xr), y).backward()
        grads.append([xr.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("act,per_channel", [("lsq", False), ("pact", True)])
def test_quantized_model_compiles_without_graph_breaks_or_recompiles(act, per_channel):
    import torch._dynamo as dynamo

    torch.manual_seed(3)
    net = _Net(act, per_channel)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    net(x)
    Q.prepare_for_compile(net)
    dynamo.reset()
    explained = dynamo.explain(net)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):  # train steps: the step sizes change, nothing recompiles
            compiled.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.01 * p.grad
    dynamo.reset()


def test_signed_is_read_once_and_follows_calibration_and_loading():
    q = make_act_quantizer("lsq", 4)
    assert q.signed is None
    q.init_from(-torch.rand(10))
    assert q.signed is True and q.int_range() == (-8, 7)
    q2 = make_act_quantizer("lsq", 4)
    q2.init_from(torch.rand(10))
    assert q2.int_range() == (0, 15)
    q2.load_state_dict(q.state_dict())
    assert q2.signed is True and q2.int_range() == (-8, 7)
