"""Sharpness-aware optimizers (SAM, GSAM, ASGA) on analytic problems with closed-form steps."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mpqkit.errors import CheckpointError, ConfigError
from mpqkit.optim import ASGA, GSAM, SAM, SharpnessAware, frozen_bn_stats, surrogate_gap

torch.set_num_threads(1)

A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
X0 = torch.tensor([1.0, -2.0], dtype=torch.float64)


class Quadratic(nn.Module):
    """f(x) = 0.5 x^T A x with gradient A x."""

    def __init__(self, x0: Tensor = X0) -> None:
        super().__init__()
        self.x = nn.Parameter(x0.clone())
        self.register_buffer("a", A.clone())

    def forward(self) -> Tensor:
        return 0.5 * self.x @ self.a @ self.x


def f(x: Tensor) -> Tensor:
    return 0.5 * x @ A @ x


def grad(x: Tensor) -> Tensor:
    return A @ x


def two_pass(
    opt: SharpnessAware,
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    before_update: Callable[[], object] | None = None,
) -> dict[str, float]:
    """One step with the explicit API."""
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.first_step(loss)
    with opt.second_pass(model):
        loss_adv = loss_fn()
        loss_adv.backward()
    return opt.second_step(loss_adv, before_update=before_update)


def mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 1)]
    return nn.Sequential(*layers).double()


def regression_data(n: int = 24) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]


# ---------------------------------------------------------------- closed forms


def test_sam_step_matches_closed_form_on_quadratic() -> None:
    model = Quadratic()
    rho, lr = 0.1, 0.05
    opt = SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
    stats = two_pass(opt, model, model)

    g = grad(X0)
    e = rho * g / g.norm()
    g_adv = grad(X0 + e)
    torch.testing.assert_close(model.x.detach(), X0 - lr * g_adv, rtol=1e-13, atol=1e-14)
    assert stats["loss"] == pytest.approx(float(f(X0)), rel=1e-12)
    assert stats["loss_adv"] == pytest.approx(float(f(X0 + e)), rel=1e-12)
    assert stats["h"] == pytest.approx(float(f(X0 + e) - f(X0)), rel=1e-10)
    assert stats["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    cos = float(g @ g_adv / (g.norm() * g_adv.norm()))
    assert stats["cos_g_gadv"] == pytest.approx(cos, rel=1e-12)
    assert stats["rho"] == rho and opt.rho == rho


def test_gamma0_fixed_rho_adv_update_is_exactly_sam() -> None:
    x, y = regression_data()
    runs = []
    for make in (
        lambda p: SAM(torch.optim.SGD(p, lr=0.1, momentum=0.9), rho=0.07),
        lambda p: SharpnessAware(
            torch.optim.SGD(p, lr=0.1, momentum=0.9),
            rho0=0.07,
            gamma=0.0,
            adaptive=False,
            update="adv",
        ),
    ):
        model = mlp()
        opt = make(model.parameters())
        for _ in range(4):
            two_pass(opt, model, lambda model=model: nn.functional.mse_loss(model(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_asga_perturbation_and_mean_update() -> None:
    model = Quadratic()
    rho, gamma, lr = 0.07, 0.01, 0.1
    opt = ASGA(torch.optim.SGD(model.parameters(), lr=lr), rho0=rho, gamma=gamma, adaptive=False)
    loss = model()
    loss.backward()
    opt.first_step(loss)
    g = grad(X0)
    e = (rho / g.norm() - gamma) * g
    torch.testing.assert_close(model.x.detach(), X0 + e, rtol=1e-12, atol=1e-13)
    assert model.x.grad is None
    with opt.second_pass(model):
        loss_adv = model()
        loss_adv.backward()
    opt.second_step(loss_adv)
    expected = X0 - lr * (g + grad(X0 + e)) / 2
    torch.testing.assert_close(model.x.detach(), expected, rtol=1e-12, atol=1e-13)


def test_gsam_update_matches_formula() -> None:
    model = Quadratic()
    rho, alpha, lr = 0.2, 0.3, 0.05
    opt = GSAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho, alpha=alpha)
    two_pass(opt, model, model)
    g = grad(X0)
    g_adv = grad(X0 + rho * g / g.norm())
    g_perp = g - (g @ g_adv) / (g_adv @ g_adv) * g_adv
    assert float(g_perp @ g_adv) == pytest.approx(0.0, abs=1e-12)
    expected = X0 - lr * (g_adv - alpha * g_perp)
    torch.testing.assert_close(model.x.detach(), expected, rtol=1e-13, atol=1e-14)


def test_step_with_closure_equals_explicit_two_pass() -> None:
    x, y = regression_data()
    results = []
    for use_closure in (True, False):
        model = mlp(bn=True)
        opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.1), model=model, h_ema=0.3)
        for _ in range(3):
            if use_closure:

                def closure(model: nn.Module = model, opt: ASGA = opt) -> Tensor:
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                two_pass(opt, model, lambda model=model: nn.functional.mse_loss(model(x), y))
        results.append(([t.clone() for t in model.state_dict().values()], opt.rho))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        assert torch.equal(a, b)
    assert results[0][1] == results[1][1]


# ---------------------------------------------------------------- adaptive radius


def _reference_radii(gaps: list[float], rho0: float, lo: float, hi: float, ema: float) -> list:
    radii, smooth = [rho0], None
    for h in gaps:
        h = max(h, 0.0)
        smooth = h if smooth is None else ema * smooth + (1 - ema) * h
        radii.append(min(max(math.log(1 + smooth), lo), hi))
    return radii


@pytest.mark.parametrize("h_ema", [0.0, 0.6])
def test_rho_follows_clamped_log_of_gap(h_ema: float) -> None:
    gaps = [0.5, 0.03, -0.2, 0.0, 2.0, 0.05, 0.02]
    lo, hi, rho0 = 0.01, 0.1, 0.05
    expected = _reference_radii(gaps, rho0, lo, hi, h_ema)
    if h_ema == 0.0:  # both clamps and the interior are exercised
        assert expected[1] == hi and expected[3] == lo and lo < expected[2] < hi
    model = Quadratic()
    opt = ASGA(
        torch.optim.SGD(model.parameters(), lr=0.0),
        rho0=rho0,
        rho_min=lo,
        rho_max=hi,
        gamma=0.0,
        h_ema=h_ema,
    )
    for step, h in enumerate(gaps):
        assert opt.rho == pytest.approx(expected[step], rel=1e-12)
        loss = model()
        loss.backward()
        opt.first_step(1.0)
        # the perturbation has the current radius (gamma = 0)
        assert float((model.x.detach() - X0).norm()) == pytest.approx(expected[step], rel=1e-10)
        with opt.second_pass(model):
            model().backward()
        stats = opt.second_step(1.0 + h)
        assert stats["rho"] == pytest.approx(expected[step], rel=1e-12)
        assert stats["h"] == pytest.approx(h, abs=1e-12)
        assert stats["rho_next"] == pytest.approx(expected[step + 1], rel=1e-12)
    assert opt.rho == pytest.approx(expected[-1], rel=1e-12)


def test_non_adaptive_radius_stays_fixed() -> None:
    model = Quadratic()
    opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.01), rho0=0.03, adaptive=False)
    for _ in range(3):
        two_pass(opt, model, model)
        assert opt.rho == 0.03 and opt.stats["rho"] == 0.03


# ---------------------------------------------------------------- BatchNorm and exact restore


def test_bn_stats_frozen_in_second_pass_and_params_exactly_restored() -> None:
    x, y = regression_data()
    model = mlp(bn=True)
    bn = model[1]
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.0), model=model, rho0=0.1)

    buffers0 = [b.clone() for b in bn.buffers()]
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    buffers1 = [b.clone() for b in bn.buffers()]
    assert all(not torch.equal(a, b) for a, b in zip(buffers0, buffers1, strict=True))
    opt.first_step(loss)
    assert not torch.equal(model[0].weight, theta0[0])  # perturbed
    with opt.second_pass():
        assert not bn.track_running_stats
        loss_adv = nn.functional.mse_loss(model(x), y)
        loss_adv.backward()
    assert bn.track_running_stats and bn.momentum == 0.1
    for a, b in zip(buffers1, bn.buffers(), strict=True):
        assert torch.equal(a, b)
    assert int(bn.num_batches_tracked) == 1
    opt.second_step(loss_adv)
    # lr = 0: theta exactly back, no drift from adding and removing e
    for a, b in zip(theta0, model.parameters(), strict=True):
        assert torch.equal(a, b)

    # lr > 0: theta_new = theta - lr * d exactly, d the direction the base optimizer saw
    opt.param_groups[0]["lr"] = 0.05
    seen: list[Tensor] = []
    two_pass(
        opt,
        model,
        lambda: nn.functional.mse_loss(model(x), y),
        before_update=lambda: seen.extend(p.grad.clone() for p in model.parameters()),
    )
    for theta, d, p in zip(theta0, seen, model.parameters(), strict=True):
        assert torch.equal(p.detach(), torch.add(theta, d, alpha=-0.05))


def test_frozen_bn_stats_restores_flags_on_error_and_instance_norm_buffers() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.InstanceNorm1d(4, track_running_stats=True))
    model.train()
    x = torch.randn(3, 4, 5)
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(RuntimeError, match="boom"), frozen_bn_stats(model):
        model(x)
        raise RuntimeError("boom")
    assert model[0].track_running_stats and model[1].track_running_stats
    for a, b in zip(before, model.buffers(), strict=True):
        assert torch.equal(a, b)
    model(x)
    assert not torch.equal(before[0], model[0].running_mean)


# ---------------------------------------------------------------- param groups and hooks


class Supernet(nn.Module):
    """f(w, a) = 0.5 w^T A w + a.w + 0.5 a.a: the 'logits' a are coupled to the weights w."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(X0.clone())
        self.a = nn.Parameter(torch.tensor([0.3, -0.4], dtype=torch.float64))

    def forward(self) -> Tensor:
        return 0.5 * self.w @ A @ self.w + self.a @ self.w + 0.5 * self.a @ self.a


def test_perturb_false_group_not_moved_but_updated_and_hook_added_once() -> None:
    model = Supernet()
    w0, a0 = model.w.detach().clone(), model.a.detach().clone()
    rho, gamma, lr_w, lr_a = 0.1, 0.002, 0.1, 0.05
    base = torch.optim.SGD(
        [{"params": [model.w]}, {"params": [model.a], "lr": lr_a, "perturb": False}], lr=lr_w
    )
    opt = ASGA(base, rho0=rho, gamma=gamma, adaptive=False)
    opt.zero_grad()
    loss = model()
    loss.backward()
    opt.first_step(loss)
    g_w, g_a = A @ w0 + a0, w0 + a0
    e = (rho / g_w.norm() - gamma) * g_w  # norm over the perturbed group only
    assert torch.equal(model.a.detach(), a0)
    torch.testing.assert_close(model.w.detach(), w0 + e, rtol=1e-12, atol=1e-13)
    with opt.second_pass(model):
        loss_adv = model()
        loss_adv.backward()

    penalty_grad = torch.tensor([0.7, -1.1], dtype=torch.float64)
    calls = []

    def before_update() -> None:
        calls.append(1)
        assert torch.equal(model.w.detach(), w0)  # theta restored before the hook
        (penalty_grad @ model.a).backward()

    opt.second_step(loss_adv, before_update=before_update)
    assert calls == [1]
    g_adv_w, g_adv_a = A @ (w0 + e) + a0, (w0 + e) + a0
    torch.testing.assert_close(
        model.w.detach(), w0 - lr_w * (g_w + g_adv_w) / 2, rtol=1e-12, atol=1e-13
    )
    torch.testing.assert_close(
        model.a.detach(), a0 - lr_a * ((g_a + g_adv_a) / 2 + penalty_grad), rtol=1e-12, atol=1e-13
    )
    assert opt.stats["grad_norm"] == pytest.approx(float(g_w.norm()), rel=1e-12)


def test_cancel_step_restores_params() -> None:
    model = Quadratic()
    opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = model()
    loss.backward()
    opt.first_step(loss)
    assert not torch.equal(model.x.detach(), X0)
    opt.cancel_step()
    assert torch.equal(model.x.detach(), X0)
    loss = model()
    loss.backward()
    opt.first_step(loss)  # a new step can begin


# ---------------------------------------------------------------- optimization


@pytest.mark.parametrize(
    "make",
    [
        lambda p: ASGA(torch.optim.SGD(p, lr=0.1, momentum=0.9), h_ema=0.5),
        lambda p: SAM(torch.optim.SGD(p, lr=0.1, momentum=0.9), rho=0.05),
        lambda p: GSAM(torch.optim.Adam(p, lr=0.02), rho=0.05, alpha=0.2),
    ],
    ids=["asga", "sam", "gsam"],
)
def test_optimizes_tiny_regression(make: Callable) -> None:
    x, y = regression_data()
    model = mlp(bn=True)
    opt = make(model.parameters())
    with torch.no_grad():
        start = float(nn.functional.mse_loss(model.eval()(x), y))
    model.train()
    for _ in range(60):
        two_pass(opt, model, lambda: nn.functional.mse_loss(model(x), y))
    with torch.no_grad():
        end = float(nn.functional.mse_loss(model.eval()(x), y))
    assert end < 0.5 * start
    for key in ("rho", "h", "loss", "loss_adv", "grad_norm", "cos_g_gadv"):
        assert math.isfinite(opt.stats[key]), key
    assert -1.0 <= opt.stats["cos_g_gadv"] <= 1.0
    assert opt.stats["step"] == 60


def test_lr_scheduler_on_wrapper_drives_base_optimizer() -> None:
    model = Quadratic()
    opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    two_pass(opt, model, model)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups is opt.base_optimizer.param_groups


# ---------------------------------------------------------------- state


def test_state_dict_round_trip_gives_identical_steps() -> None:
    x, y = regression_data()

    def make(model: nn.Module) -> ASGA:
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return ASGA(base, h_ema=0.4, rho_max=0.5, model=model)

    def run(model: nn.Module, opt: ASGA, steps: int) -> list[float]:
        return [
            two_pass(opt, model, lambda: nn.functional.mse_loss(model(x), y))["rho"]
            for _ in range(steps)
        ]

    model = mlp(bn=True)
    opt = make(model)
    run(model, opt, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert saved_opt["sharpness_aware"]["steps"] == 3
    radii = run(model, opt, 3)

    model2 = mlp(seed=5, bn=True)
    opt2 = make(model2)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.rho == saved_opt["sharpness_aware"]["rho"]
    radii2 = run(model2, opt2, 3)
    assert radii == radii2
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt.stats == opt2.stats

    with pytest.raises(CheckpointError):
        opt2.load_state_dict({"rho": 0.1})
    base_only = torch.optim.SGD(mlp(bn=True).parameters(), lr=0.3).state_dict()
    opt2.load_state_dict(base_only)  # a plain base-optimizer state loads too
    assert opt2.param_groups[0]["lr"] == 0.3


# ---------------------------------------------------------------- AMP


def test_grad_scaler_matches_unscaled_run_and_skips_inf() -> None:
    x, y = regression_data()
    results = []
    for use_scaler in (False, True):
        model = mlp()
        opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.first_step(loss, scaler=scaler)
            with opt.second_pass():
                loss_adv = nn.functional.mse_loss(model(x), y)
                (scaler.scale(loss_adv) if scaler else loss_adv).backward()
            opt.second_step(loss_adv, scaler=scaler)
            if scaler:
                scaler.update()
        results.append(([p.detach().clone() for p in model.parameters()], opt.rho))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-12)

    # an inf gradient: no perturbation, no step, params unchanged, the scale backs off
    model = mlp()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(loss, scaler=scaler)
    for a, b in zip(theta, model.parameters(), strict=True):
        assert torch.equal(a, b)
    with opt.second_pass():
        loss_adv = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss_adv).backward()
    rho = opt.rho
    stats = opt.second_step(loss_adv, scaler=scaler)
    scaler.update()
    assert stats["skipped"] == 1.0 and stats["skipped_steps"] == 1.0 and stats["step"] == 0.0
    assert scaler.get_scale() == 2.0**9
    assert opt.rho == rho
    for a, b in zip(theta, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nan_gradient_without_scaler_skips_step() -> None:
    model = Quadratic()
    opt = ASGA(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = model()
    loss.backward()
    opt.first_step(loss)
    with opt.second_pass(model):
        loss_adv = model()
        loss_adv.backward()
    model.x.grad[1] = float("nan")
    stats = opt.second_step(loss_adv)
    assert stats["skipped"] == 1.0
    assert torch.equal(model.x.detach(), X0)


# ---------------------------------------------------------------- surrogate gap


def test_surrogate_gap_closed_form_restores_params_and_grads() -> None:
    model = Quadratic()
    model.x.grad = torch.full_like(model.x, 7.0)
    rho = 0.3
    gap = surrogate_gap(model, lambda m, _batch: m(), [None, None], rho)
    g = grad(X0)
    assert gap == pytest.approx(float(f(X0 + rho * g / g.norm()) - f(X0)), rel=1e-12)
    assert torch.equal(model.x.detach(), X0)
    assert torch.equal(model.x.grad, torch.full_like(model.x, 7.0))


def test_surrogate_gap_with_loss_module_and_bn() -> None:
    x, y = regression_data()
    model = mlp(bn=True)
    state = copy.deepcopy(model.state_dict())
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    gap = surrogate_gap(model, nn.MSELoss(), batches, rho=0.05)
    assert gap > 0
    for a, b in zip(state.values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert surrogate_gap(model, nn.MSELoss(), batches, rho=0.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError):
        surrogate_gap(model, nn.MSELoss(), [], rho=0.05)


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rho0": -0.1},
        {"rho_min": 0.2, "rho_max": 0.1},
        {"gamma": -1.0},
        {"h_ema": 1.0},
        {"update": "sum"},
        {"alpha": 0.1},
        {"rho0": float("nan")},
        {"adaptive": "yes"},
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict) -> None:
    model = Quadratic()
    with pytest.raises(ConfigError):
        ASGA(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_misuse_raises_config_error() -> None:
    model = Quadratic()
    with pytest.raises(ConfigError):
        ASGA(model.parameters())  # type: ignore[arg-type]
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError):
        ASGA(ASGA(base))
    opt = ASGA(base)
    with pytest.raises(ConfigError):
        opt.second_step(model())
    with pytest.raises(ConfigError):
        opt.second_pass(model)
    with pytest.raises(ConfigError):
        opt.step()
    loss = model()
    loss.backward()
    with pytest.raises(ConfigError):
        opt.first_step(torch.ones(3))
    opt.first_step(loss)
    with pytest.raises(ConfigError):
        opt.first_step(loss)
    with pytest.raises(ConfigError):
        opt.second_pass()  # no model anywhere
    with pytest.raises(ConfigError):
        opt.state_dict()
    bad = torch.optim.SGD([{"params": [nn.Parameter(torch.ones(1))], "perturb": "no"}], lr=0.1)
    with pytest.raises(ConfigError):
        ASGA(bad)


def test_fused_statistics_match_per_parameter_ones() -> None:
    """The fused dot products and finiteness test equal their per-parameter forms."""
    from mpqkit.optim.sharpness import _all_finite, _sum_dots

    torch.manual_seed(0)
    a = [torch.randn(s, dtype=torch.float64) for s in ((3, 4), (7,), (2, 2, 2))]
    b = [torch.randn_like(t) for t in a]
    dev = torch.device("cpu")
    torch.testing.assert_close(_sum_dots(a, b, dev, torch.float64),
                               sum(torch.dot(x.flatten(), y.flatten()) for x, y in zip(a, b)),
                               rtol=1e-14, atol=0.0)
    torch.testing.assert_close(_sum_dots(a, None, dev, torch.float64),
                               sum(x.pow(2).sum() for x in a), rtol=1e-14, atol=0.0)
    assert float(_sum_dots([], None, dev, torch.float32)) == 0.0
    assert bool(_all_finite(a, dev)) and bool(_all_finite([], dev))
    for bad in (float("nan"), float("inf"), -float("inf")):
        c = [t.clone() for t in a]
        c[1][3] = bad
        assert not bool(_all_finite(c, dev))
    # mixed dtypes: a huge finite float64 grad is finite (no overflow through float32) and an
    # inf in a float16 grad is not
    huge = [torch.full((3,), 1e300, dtype=torch.float64), torch.ones(2, dtype=torch.float16)]
    assert bool(_all_finite(huge, dev))
    huge[1][0] = float("inf")
    assert not bool(_all_finite(huge, dev))
