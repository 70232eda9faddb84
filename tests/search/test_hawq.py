"""HAWQ: Hutchinson traces, the integer program, and the whole method on a tiny model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpqkit.complexity import parse_budget, policy_cost, profile_model
from mpqkit.policy import first_last_layers
from mpqkit.search.methods.hawq import (
    CACHE_FILE,
    hawq_search,
    hutchinson_trace,
    layer_traces,
    solve_allocation,
)


def test_hutchinson_matches_exact_blocks_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    a = a @ a.T / 6 + torch.eye(6)
    b = torch.randn(4, 4, generator=g)
    b = b @ b.T / 4
    c = torch.randn(6, 4, generator=g)
    x = torch.randn(6, generator=g, requires_grad=True)
    y = torch.randn(4, generator=g, requires_grad=True)

    def fn():
        return 0.5 * x @ a @ x + 0.5 * y @ b @ y + x @ c @ y, [x, y]

    tx, ty = hutchinson_trace(fn, iters=400, seed=1)
    assert abs(tx - a.trace()) < 0.05 * a.trace()
    assert abs(ty - b.trace()) < 0.05 * b.trace()
    jx, jy = hutchinson_trace(fn, iters=400, seed=1, joint=True)  # cross terms: noisier
    assert abs(jx - a.trace()) < 0.2 * a.trace()


def test_layer_trace_matches_exact_hessian_of_a_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    w = model[0].weight
    exact_w = torch.autograd.functional.hessian(
        lambda ww: F.cross_entropy(F.linear(x, ww, model[0].bias), y), w.detach()
    ).reshape(w.numel(), w.numel()).trace()
    exact_x = torch.autograd.functional.hessian(
        lambda xx: F.cross_entropy(model(xx), y), x).reshape(x.numel(), x.numel()).trace()
    tr = layer_traces(model, [(x, y)], iters=300, seed=0)
    assert abs(tr.weight["0"] - exact_w) < 0.08 * exact_w
    assert abs(tr.act["0"] - exact_x) < 0.08 * exact_x
    assert tr.weight_numel["0"] == 15 and tr.act_numel["0"] == 5


def test_milp_picks_the_obvious_optimum():
    # layer a is very sensitive, b a little, c not at all; costs equal per bit product
    sens = {"a": 100.0, "b": 1.0, "c": 0.01}
    choices = [(2, 2), (4, 4), (6, 6)]
    scores = {n: {ch: s / (ch[0] * ch[1]) for ch in choices} for n, s in sens.items()}
    costs = {n: {ch: float(ch[0] * ch[1]) for ch in choices} for n in sens}
    # budget 36 + 16 + 4 = 56: a must get 6/6, b 4/4, c 2/2
    assert solve_allocation(scores, costs, 55, 56) == {"a": (6, 6), "b": (4, 4), "c": (2, 2)}
    assert solve_allocation(scores, costs, 200, 300) is None


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def test_hawq_search_lands_in_band_and_caches(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    infos = profile_model(model, 8)
    fixed = {n: (8, 8) for n in first_last_layers(infos)}
    searchable = [n for n in infos if n not in fixed]
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    budget = parse_budget(uniform="w3a3", infos=infos, fixed_bits=fixed, searchable=searchable)
    res = hawq_search(model, batches, budget, infos, searchable, fixed, (2, 3, 4, 6),
                      (2, 3, 4, 6), iters=2, run_dir=tmp_path)
    cost = policy_cost(infos, res.bits, "bitops")
    assert 0.98 * budget.value <= cost <= budget.value
    assert all(res.bits[n] == fixed[n] for n in fixed)
    assert all(v > 0 for v in res.traces.weight.values())
    assert (tmp_path / CACHE_FILE).is_file() and not res.cached
    prov = res.provenance()
    assert prov["hessian_vector_products"] == 2 * 2 * 2 * len(searchable)
    again = hawq_search(model, batches, budget, infos, searchable, fixed, (2, 3, 4, 6),
                        (2, 3, 4, 6), iters=2, run_dir=tmp_path)
    assert again.cached and again.bits == res.bits and again.hvps == 0
    tied = hawq_search(model, batches, budget, infos, searchable, fixed, (2, 3, 4, 6),
                       (2, 3, 4, 6), iters=2, activations=False)
    assert all(w == a for w, a in tied.bits.values())


def test_hawq_plugs_into_search(tiny_folder, tmp_path):
    from mpqkit.data import DataConfig
    from mpqkit.search import SearchConfig, search

    cfg = SearchConfig(model="resnet20", method="hawq", budget="w4a4", max_steps_per_epoch=1,
                       out=str(tmp_path / "run"), progress=False,
                       options={"hawq_batch_size": 4, "hawq_batches": 1, "hawq_iters": 1,
                                "teacher_epochs": 1},
                       data=DataConfig(name=f"imagefolder:{tiny_folder}", batch_size=8,
                                       cache_dir=str(tmp_path / "cache")))
    res = search(cfg)
    cost = res.policy.complexity().bitops
    assert 0.98 * res.budget.value <= cost <= res.budget.value
    prov = res.policy.provenance
    assert prov["method"] == "hawq" and prov["hawq_fp_model"].startswith("trained:")
    assert prov["images_processed"] == 8 and prov["hessian_vector_products"] == 36
    assert prov["repair"]["changed_layers"] == []
    for name in (CACHE_FILE, "hawq_sensitivity.json", "policy.json", "fp/best.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
