"""The supernet's CPU kernels and compile path: gradients as the reference sum, no graph break."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpqkit.quant import make_act_quantizer, make_weight_quantizer
from mpqkit.quant.quantizers import prepare_for_compile
from mpqkit.search.supernet import build_supernet, mix_quantized

CANDS = (2, 3, 4, 6)


@pytest.mark.parametrize("kind", ["unsigned", "signed", "weight", "raw_steps"])
def test_cpu_mix_backward_matches_the_reference_sum(kind, monkeypatch):
    """The float-mask CPU backward (several blocks) against autograd on sum_i p_i Q_i(x);
    ``raw_steps``: negative LSQ parameters and one below the floor (the kernel takes the raw
    parameters and applies ``|s|`` floored itself)."""
    import mpqkit.search.supernet as sup

    torch.manual_seed(5)
    x = torch.randn(4, 6, 9, 9)
    if kind in ("unsigned", "raw_steps"):
        x = torch.relu(x) - 0.01 * (torch.rand_like(x) < 0.05)  # a few small negatives
        qs = [make_act_quantizer("lsq", b) for b in CANDS]
    elif kind == "signed":
        qs = [make_act_quantizer("lsq", b) for b in CANDS]
    else:
        qs = [make_weight_quantizer("lsq", b, 4) for b in CANDS]
    for q in qs:
        q.init_from(x)
    if kind == "raw_steps":
        qs[0].scale.data.neg_()
        qs[2].scale.data.fill_(-1e-9)
    ref = copy.deepcopy(qs)
    alpha = torch.randn(4)
    monkeypatch.setattr(sup, "CPU_BLOCK", 300)
    out = []
    for mix in (True, False):
        a = alpha.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        p = torch.softmax(a, 0)
        use = qs if mix else ref
        y = mix_quantized(xr, use, p) if mix else sum(p[i] * use[i](xr) for i in range(4))
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        y.backward(g)
        out.append([y.detach(), xr.grad, a.grad, *[q.scale.grad for q in use]])
    for u, v in zip(*out):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def test_supernet_traces_in_one_graph_after_prepare():
    import torch._dynamo as dynamo

    torch.manual_seed(6)
    sn = build_supernet(_Tiny(), 8)
    x = torch.randn(4, 3, 8, 8)
    sn.calibrate(x)
    prepare_for_compile(sn)
    sn.train()
    dynamo.reset()
    explained = dynamo.explain(sn.net)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    compiled = torch.compile(sn.net, backend="aot_eager", fullgraph=True)
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            sn.zero_grad()
            F.cross_entropy(compiled(x), torch.arange(4)).backward()
    assert all(p.grad is not None for p in sn.arch_parameters())
    dynamo.reset()


def test_compile_in_place_keeps_parameter_names():
    """``--compile`` compiles the supernet in place: checkpoints keep their keys."""
    from mpqkit.quant.quantizers import compile_in_place

    sn = build_supernet(_Tiny(), 8)
    sn.calibrate(torch.randn(2, 3, 8, 8))
    keys = list(sn.state_dict())
    compile_in_place(sn.net)
    assert list(sn.state_dict()) == keys
    assert all(q._signed_value is not None for q in sn.modules()
               if hasattr(q, "_signed_value") and q.enabled)
