"""The compiled one-pass CPU kernels: the eager kernels' values and gradients, and a clear
fallback when they cannot be built."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import mpqkit.quant.quantizers as Q
from mpqkit.errors import ConfigError
from mpqkit.quant import fused
from mpqkit.quant.quantizers import make_act_quantizer, make_weight_quantizer
from mpqkit.search.supernet import mix_quantized

CANDS = (2, 3, 4, 6)


def _require_built(name: str) -> None:
    if fused._KERNELS.failed is not None:
        pytest.skip(f"inductor cannot build kernels here: {fused._KERNELS.failed}")
    assert name in fused._KERNELS.ran, f"{name} did not run"


def _lsq(x, raw, g):
    x = x.clone().requires_grad_()
    s = torch.tensor([raw], requires_grad=True)
    y = Q._LSQTensorCPU.apply(x, s, 0, 15, 0.01)
    y.backward(g)
    return y.detach(), x.grad, s.grad


@pytest.mark.parametrize("raw", [0.137, -0.05])
def test_lsq_fused_equals_the_eager_kernel(raw, monkeypatch):
    torch.manual_seed(0)
    x = (torch.randn(8, 16, 24, 24) * 0.7).relu()  # 73,728 elements
    x[0, 0, 0, :3] = torch.tensor([0.5, 1.5, 2.5]) * abs(raw)  # exact ties
    g = torch.randn_like(x)
    out = _lsq(x, raw, g)
    _require_built("lsq_forward")
    _require_built("lsq_backward")
    monkeypatch.setenv("MPQKIT_FUSED", "off")
    ref = _lsq(x, raw, g)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])  # bit for bit
    torch.testing.assert_close(out[2], ref[2], rtol=2e-5, atol=0.0)  # another summation order


def test_fused_outputs_can_be_modified_in_place():
    """Their outputs are not views made inside the autograd function (which autograd forbids
    to modify in place: a ReLU(inplace=True) after a quantizer, say)."""
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    y = Q._LSQTensorCPU.apply(x, s, -8, 7, 0.01)
    y.relu_().sum().backward()
    q = make_act_quantizer("lsq", 4)
    q.init_from(x.detach())
    m = mix_quantized(x, [q, copy.deepcopy(q)], torch.tensor([0.5, 0.5]))
    m.relu_().sum().backward()
    _require_built("lsq_forward")
    _require_built("mix_forward")


def test_lsq_fused_passes_nonfinite_inputs_like_the_reference():
    x = torch.rand(1 << 16)
    x[5], x[9] = float("inf"), float("nan")
    y, gx, gs = _lsq(x, 0.1, torch.ones_like(x))
    assert y[5] == float("inf") and y[9].isnan() and torch.isfinite(y[:5]).all()
    assert not torch.isfinite(gs).all()  # the reference form's answer for a non-finite input


@pytest.mark.parametrize("kind", ["unsigned", "weight"])
def test_mix_fused_equals_the_eager_kernel(kind, monkeypatch):
    torch.manual_seed(1)
    if kind == "unsigned":
        x = torch.randn(4, 16, 24, 24).relu()
        qs = [make_act_quantizer("lsq", b) for b in CANDS]
    else:
        x = torch.randn(64, 64, 3, 3)
        qs = [make_weight_quantizer("lsq", b, 64) for b in CANDS]
    for q in qs:
        q.init_from(x)
    qs[1].scale.data.neg_()  # a raw negative step: |s| is used
    alpha = torch.randn(len(qs))
    out = []
    for setting in ("on", "off"):
        monkeypatch.setenv("MPQKIT_FUSED", setting)
        use = copy.deepcopy(qs)
        a, xr = alpha.clone().requires_grad_(), x.clone().requires_grad_()
        y = mix_quantized(xr, use, torch.softmax(a, 0))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        out.append([y.detach(), xr.grad, a.grad, *[q.scale.grad for q in use]])
        if setting == "on":
            _require_built("mix_forward")
            _require_built("mix_backward")
    for u, v in zip(*out):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


class _Broken(fused._Kernels):
    def get(self, name):
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return None if self.failed else fail


def test_a_kernel_that_cannot_be_built_falls_back_to_eager_once(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_KERNELS", _Broken())
    x = torch.rand(1 << 16)
    g = torch.randn_like(x)
    with caplog.at_level(logging.WARNING, logger="mpqkit"):
        out = _lsq(x, 0.1, g)
        again = _lsq(x, 0.1, g)
    msgs = [r.getMessage() for r in caplog.records if "fused CPU" in r.getMessage()]
    assert len(msgs) == 1 and "RuntimeError: no C++ compiler found" in msgs[0]
    assert not fused.enabled()
    monkeypatch.setenv("MPQKIT_FUSED", "off")
    ref = _lsq(x, 0.1, g)
    for a, b, c in zip(out, again, ref):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_setting_is_validated(monkeypatch):
    monkeypatch.setenv("MPQKIT_FUSED", "maybe")
    with pytest.raises(ConfigError, match="MPQKIT_FUSED='maybe' is not a setting"):
        fused.enabled()
