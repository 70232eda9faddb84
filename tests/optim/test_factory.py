"""The optimizer and schedule factory shared by training, fine-tuning and search."""

import math

import pytest
import torch
from torch import nn

from mpqkit.errors import ConfigError
from mpqkit.optim import ASGA, GSAM, SAM, OptimConfig, StepSchedule, create_optimizer, param_groups


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_param_groups_decay_only_weights_of_rank_two_or_more():
    net = _net()
    net[1].weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(net.parameters(), 0.1, 5e-4, role="weights")
    decay, no_decay = groups
    assert {p.ndim for p in decay["params"]} == {2, 4} and decay["weight_decay"] == 5e-4
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 3  # conv bias, BN bias, linear bias
    assert all(g["base_lr"] == 0.1 and g["role"] == "weights" for g in groups)


@pytest.mark.parametrize(("name", "base", "wrapper"), [
    ("sgd", torch.optim.SGD, None), ("adam", torch.optim.Adam, None),
    ("adamw", torch.optim.AdamW, None), ("asga", torch.optim.SGD, ASGA),
    ("sam", torch.optim.SGD, SAM), ("gsam", torch.optim.SGD, GSAM)])
def test_create_optimizer_by_name(name, base, wrapper):
    cfg = OptimConfig(optimizer=name, lr=0.05, rho0=0.07)
    opt, sharp = create_optimizer(param_groups(_net().parameters(), cfg.lr, 0.0), cfg)
    assert type(opt) is base
    if wrapper is None:
        assert sharp is None and cfg.sharpness == "none"
    else:
        assert type(sharp) is wrapper and cfg.sharpness == name and cfg.optimizer == "sgd"
        assert sharp.rho == pytest.approx(0.07) and sharp.base_optimizer is opt


def test_sharpness_wraps_any_base_optimizer():
    cfg = OptimConfig(optimizer="adam", sharpness="asga")
    opt, sharp = create_optimizer(param_groups(_net().parameters(), cfg.lr, 0.0), cfg)
    assert isinstance(opt, torch.optim.Adam) and isinstance(sharp, ASGA)
    assert cfg.describe() == "ASGA(Adam)" and cfg.record()["sharpness"] == "ASGA"


@pytest.mark.parametrize("bad", [{"optimizer": "lion"}, {"sharpness": "x"}, {"lr": 0.0},
                                 {"schedule": "poly"}, {"betas": [0.9]}, {"step_size": 0}])
def test_bad_optimizer_settings_are_one_line_errors(bad):
    with pytest.raises(ConfigError):
        OptimConfig(**bad)


def test_step_schedule_warmup_cosine_step_constant():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.2}], lr=0.2)
    cos = StepSchedule(opt, "cosine", epochs=2, steps_per_epoch=10, warmup_epochs=0.5)
    assert cos.set_step(0) == pytest.approx(1 / 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / 5)
    assert cos.factor(4) == pytest.approx(1.0)
    assert cos.factor(5) == pytest.approx(1.0)
    assert cos.factor(5 + 15 // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert cos.factor(20) == pytest.approx(0.0, abs=1e-12)
    step = StepSchedule(opt, "step", epochs=30, steps_per_epoch=10, step_size=10)
    assert [step.factor(s) for s in (0, 99, 100, 250)] == pytest.approx([1, 1, 0.1, 0.01])
    assert StepSchedule(opt, "constant", epochs=1, steps_per_epoch=3).factor(2) == 1.0
    with pytest.raises(ConfigError, match="schedule"):
        StepSchedule(opt, "poly", epochs=1, steps_per_epoch=1)


def test_schedule_scales_each_group_by_its_base_lr():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1, "base_lr": 0.1},
                           {"params": [b], "lr": 0.01, "base_lr": 0.01}], lr=0.1)
    StepSchedule(opt, "step", epochs=20, steps_per_epoch=1, step_size=10).set_step(10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])


def test_optimizer_set_saves_and_restores_both_optimizers_as_one():
    from mpqkit.optim import OptimizerSet

    def make():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        w, a = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.zeros(4))
        sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        adam = torch.optim.Adam([a], lr=0.05, betas=(0.5, 0.999))
        return w, a, OptimizerSet(sgd, adam)

    w, a, opt = make()
    for _ in range(3):
        opt.zero_grad()
        ((w ** 2).sum() + (a - 1).pow(2).sum()).backward()
        for o in opt.optimizers:
            o.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1] and [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    w2, a2, opt2 = make()
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.optimizers[0].state[w2]["momentum_buffer"],
                       opt.optimizers[0].state[w]["momentum_buffer"])
    assert torch.equal(opt2.optimizers[1].state[a2]["exp_avg"],
                       opt.optimizers[1].state[a]["exp_avg"])
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.05]
    with pytest.raises(ValueError, match="param groups"):
        OptimizerSet(opt2.optimizers[0]).load_state_dict(sd)


def test_betas_are_checked_in_one_line():
    from mpqkit.errors import check_betas

    assert check_betas("b", "0.5,0.9") == (0.5, 0.9)
    for bad in (0.5, "x", [0.9, 1.0]):
        with pytest.raises(ConfigError, match="two numbers"):
            check_betas("b", bad)
