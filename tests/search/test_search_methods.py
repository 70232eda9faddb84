"""The search methods end to end on a tiny synthetic image folder (CPU, a few steps each)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mpqkit.complexity import policy_cost
from mpqkit.data import DataConfig
from mpqkit.engine.checkpoint import save_checkpoint
from mpqkit.errors import BudgetError, ConfigError
from mpqkit.models import build_model
from mpqkit.optim import OptimConfig
from mpqkit.policy import Policy
from mpqkit.search import (
    DualLambda,
    MethodResult,
    SearchConfig,
    load_search_config,
    register_method,
    search,
)
from mpqkit.search.loop import dual_lambda
from mpqkit.search.methods.gmpq import attribution_loss, gradcam
from mpqkit.search.methods.seam import margin_loss
from mpqkit.search.registry import _REGISTRY

METHODS = ("asga", "edmips", "gmpq", "seam")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 JPEGs of 16x16 per split, classes differing in colour."""
    root = tmp_path_factory.mktemp("search") / "tiny"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(4):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            base = np.zeros(3)
            base[c % 3] = 200 if c < 3 else 100
            for i in range(8):
                img = np.clip(base + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def teacher_box() -> dict[str, str]:
    return {}


def tiny(folder: Path, out: Path, **kw) -> SearchConfig:  # type: ignore[no-untyped-def]
    base = dict(model="resnet20", epochs=1, max_steps_per_epoch=2, out=str(out), overwrite=True,
                progress=False, device="cpu",
                data=DataConfig(name=f"imagefolder:{folder}", batch_size=16,
                                cache_dir=str(folder.parent / "cache")))
    base.update(kw)
    if base.get("method") == "gmpq":
        base["options"] = {"teacher_epochs": 1, **base.get("options", {})}
    return SearchConfig(**base)  # type: ignore[arg-type]


def _check_band(result, kind: str) -> float:  # type: ignore[no-untyped-def]
    """The policy is in the band, and the record of the search and the repair is true.

    The band alone holds whatever the search did (the repair moves any policy there); the
    provenance must say what the search chose (``argmax_bits``) and exactly which layers the
    repair changed, with the costs before and after.
    """
    pol = result.policy
    pol.validate(build_model("resnet20"))
    cost = policy_cost(pol.layer_infos(), pol.bits(), kind)
    assert 0.98 * result.budget.value - 1e-9 <= cost <= result.budget.value + 1e-9
    assert result.budget.kind == kind
    prov = pol.provenance
    searched = {n: tuple(b) for n, b in prov["argmax_bits"].items()}
    assert searched == {n: tuple(b) for n, b in result.argmax_bits.items()}
    changed = sorted(n for n in searched if searched[n] != pol.bits()[n])
    assert changed == sorted(prov["repair"]["changed_layers"]) == sorted(result.repaired_layers)
    assert prov["repair"]["cost_before"] == pytest.approx(
        policy_cost(pol.layer_infos(), searched, kind))
    assert prov["repair"]["cost_after"] == pytest.approx(cost)
    return cost


@pytest.mark.parametrize("method", METHODS)
def test_methods_land_in_the_budget_band(method, folder, tmp_path, teacher_box):
    # bitops budget (same BitOps as uniform w3a3)
    kw = {"options": {"teacher": teacher_box.get("path")}} if method == "gmpq" else {}
    res = search(tiny(folder, tmp_path / "bitops", method=method, budget="w3a3", **kw))
    _check_band(res, "bitops")
    run = res.run_dir
    for name in ("config.yaml", "policy.json", "search.csv", "alpha.json", "log.txt",
                 "last.safetensors", "last.json"):
        assert (run / name).is_file(), name
    prov = Policy.load(run / "policy.json").provenance
    assert prov["method"] == method and prov["weights_init"] == "random"
    assert prov["budget"]["spec"] == "w3a3" and "tiny train" in prov["proxy_data"]
    cost = prov["search_cost"]
    passes = 2 if method == "asga" else 1
    assert cost["steps"] == 2 and cost["forward_passes"] == 2 * passes
    assert cost["images_processed"] == 32 * passes and prov["wall_time_s"] > 0
    rows = list(csv.DictReader((run / "search.csv").open()))
    # the CSV and the policy record the same multiplier (its update rule is tested on
    # DualLambda below) and the same decidedness
    assert len(rows) == 1
    assert float(rows[0]["lambda"]) == pytest.approx(prov["dual"]["lambda_final"])
    assert float(rows[0]["decidedness"]) == pytest.approx(prov["decidedness_mean"])
    if method == "asga":
        assert rows[0]["rho"] and rows[0]["h"] and rows[0]["cos"]
        assert prov["optimizer"]["sharpness"] == "ASGA"
    if method == "gmpq":
        assert cost["teacher_forward_passes"] == 2 and cost["double_backward_passes"] == 2
        if "path" not in teacher_box:  # first run trained the teacher; the second reuses it
            assert prov["gmpq"]["teacher"].startswith("trained:")
            teacher_box["path"] = str(run / "teacher" / "best.safetensors")
    if method == "seam":
        assert rows[0]["extra_loss"]
    # size budget
    kw = {"options": {"teacher": teacher_box.get("path")}} if method == "gmpq" else {}
    res = search(tiny(folder, tmp_path / "size", method=method, budget_size_mb=0.08, **kw))
    _check_band(res, "size_mb")
    if method == "gmpq":
        assert res.policy.provenance["gmpq"]["teacher"].startswith("checkpoint:")


def test_infeasible_budget_is_refused_up_front(folder, tmp_path):
    with pytest.raises(BudgetError, match="achievable"):
        search(tiny(folder, tmp_path / "low", method="edmips", budget_bitops="1K"))
    with pytest.raises(BudgetError, match="achievable"):
        search(tiny(folder, tmp_path / "high", method="edmips", budget="w8a8"))
    assert not (tmp_path / "low" / "last.safetensors").exists()
    with pytest.raises(ConfigError, match="exactly one budget"):
        search(tiny(folder, tmp_path / "none", method="edmips"))


def test_lambda_on_expected_cost_rises_at_uniform_logits(folder, tmp_path):
    res = search(tiny(folder, tmp_path / "exp", method="edmips", budget="w3a3",
                      lambda_on="expected"))
    _check_band(res, "bitops")
    rows = list(csv.DictReader((res.run_dir / "search.csv").open()))
    assert float(rows[0]["lambda"]) > 0  # expected cost of uniform logits is 1.5 x w3a3
    assert res.policy.provenance["dual"]["on"] == "expected"


def test_dual_lambda_rises_above_budget_and_stays_nonnegative():
    dual = DualLambda(0.1)
    seq = [dual.update(1.5, 1.0) for _ in range(3)]
    assert seq[0] > 0 and seq[0] < seq[1] < seq[2]
    assert dual.update(0.0, 1.0) < seq[2]
    for _ in range(10):
        dual.update(0.5, 1.0)
    assert dual.value == 0.0


def test_equality_dual_turns_negative_below_its_target():
    dual = DualLambda(0.5, lower=None, target=0.99)
    assert dual.update(0.99, 1.0) == pytest.approx(0.0)  # at the target: no change
    low = dual.update(0.8, 1.0)
    assert low == pytest.approx(0.5 * (0.8 / 0.99 - 1)) and low < 0  # pulls the cost up
    assert dual.update(1.2, 1.0) == pytest.approx(low + 0.5 * (1.2 / 0.99 - 1))
    assert DualLambda(0.5, -1.0, lower=None).value == -1.0
    assert DualLambda(0.5, -1.0).value == 0.0


def test_reset_dual_drops_to_zero_once_the_cost_fits_its_target():
    dual = DualLambda(0.5, target=0.98, reset=True)
    wound = [dual.update(1.2, 1.0) for _ in range(4)]  # an overshoot winds lambda up
    assert wound[-1] == pytest.approx(4 * 0.5 * (1.2 / 0.98 - 1))
    # inequality without the reset keeps pushing after the cost fits; reset stops at once
    plain = DualLambda(0.5, wound[-1], target=0.98)
    assert plain.update(0.97, 1.0) > 0.3
    assert dual.update(0.97, 1.0) == 0.0
    assert dual.update(0.99, 1.0) > 0  # above the target (the band's lower edge): rises again
    with pytest.raises(ValueError):
        DualLambda(0.5, lower=None, reset=True)


def test_proportional_term_answers_an_excess_at_once_and_resumes():
    gap = 1.0 / 0.95 - 1
    pi = DualLambda(0.5, target=0.95, reset=True, kp=5.0)
    first = pi.update(1.0, 1.0)
    assert first == pytest.approx(0.5 * gap + 5.0 * gap)  # integral + proportional
    assert first > 10 * DualLambda(0.5, target=0.95, reset=True).update(1.0, 1.0)
    again = DualLambda(0.5, target=0.95, reset=True, kp=5.0)
    again.load_state(pi.state())  # a resumed search continues the integral, not lambda
    assert again.update(1.0, 1.0) == pytest.approx(pi.update(1.0, 1.0))
    assert pi.update(0.9, 1.0) == 0.0


@pytest.mark.parametrize(("mode", "target", "lower"), [
    ("reset", 0.95, 0.0), ("inequality", 1.0, 0.0), ("equality", 0.99, None)])
def test_dual_modes_aim_at_their_stated_targets(mode, target, lower):
    cfg = SearchConfig(budget_bits=2.5, dual=mode, tol=0.02)
    dual = dual_lambda(cfg)
    assert dual.target == pytest.approx(target) and dual.lower == lower
    assert dual.reset == (mode == "reset")
    assert dual.kp == (0.0 if mode == "equality" else cfg.lambda_kp)
    assert dual_lambda(SearchConfig(budget_bits=2.5, dual=mode, lambda_target=0.9)).target == 0.9
    with pytest.raises(ConfigError, match="lambda_target"):
        SearchConfig(budget_bits=2.5, lambda_target=1.2)


def test_resume_continues_from_the_last_finished_epoch(folder, tmp_path):
    # more epochs on resume: a schedule that does not depend on the number of epochs (a
    # cosine one would anneal differently over 2 epochs than over 1)
    step = {"optim": OptimConfig(lr=0.1, weight_decay=1e-4, schedule="step", step_size=10)}
    first = search(tiny(folder, tmp_path / "r", method="asga", budget="w3a3", epochs=1, **step))
    assert len(first.history) == 1
    resumed = search(tiny(folder, tmp_path / "r", method="asga", budget="w3a3", epochs=2,
                          resume=True, overwrite=False))
    rows = list(csv.DictReader((tmp_path / "r" / "search.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["steps"]) for r in rows] == [2, 4]
    assert float(rows[0]["loss"]) == pytest.approx(first.history[0]["loss"])
    alpha = json.loads((tmp_path / "r" / "alpha.json").read_text())
    assert [e["epoch"] for e in alpha["epochs"]] == [1, 2]
    assert json.loads((tmp_path / "r" / "last.json").read_text())["epoch"] == 2
    assert resumed.policy.provenance["search_cost"]["steps"] == 4
    # the resumed search ends where an uninterrupted one does
    straight = search(tiny(folder, tmp_path / "s", method="asga", budget="w3a3", epochs=2,
                           **step))
    assert resumed.argmax_bits == straight.argmax_bits
    a1 = json.loads((tmp_path / "s" / "alpha.json").read_text())["epochs"][-1]["layers"]
    assert a1 == alpha["epochs"][-1]["layers"]
    with pytest.raises(ConfigError, match="already holds a run"):
        search(tiny(folder, tmp_path / "s", method="asga", budget="w3a3", overwrite=False))


def test_bilevel_asga_and_fp_first_last(folder, tmp_path):
    res = search(tiny(folder, tmp_path / "bi", method="asga", budget="w4a4", bilevel=True,
                      first_last="fp"))
    _check_band(res, "bitops")
    prov = res.policy.provenance
    assert prov["level"].startswith("bi-level") and "val 16" in prov["proxy_data"]
    assert res.policy.layers["conv1"].w_bits == 32 and res.policy.first_last == "fp"
    assert prov["search_cost"]["forward_passes"] == 2 + 1  # 1 step: ASGA weights + logits


def test_registered_policy_method_gets_context_and_is_repaired(folder, tmp_path):
    seen = {}

    def all_max(ctx):  # type: ignore[no-untyped-def]
        seen["ctx"] = ctx
        bits = {n: ctx.fixed_bits.get(n, (6, 6)) for n in ctx.infos}
        return MethodResult(bits, {"note": "max bits", "passes": 0})

    register_method("test-max", description="test")(all_max)
    try:
        _run_test_max(folder, tmp_path, seen)
    finally:
        _REGISTRY.pop("test-max", None)


def _run_test_max(folder, tmp_path, seen):  # type: ignore[no-untyped-def]
    fp = build_model("resnet20", num_classes=4)
    save_checkpoint(tmp_path / "fp", fp, {"model": "resnet20", "num_classes": 4})
    res = search(tiny(folder, tmp_path / "m", method="test-max", budget="w3a3",
                      weights=str(tmp_path / "fp.safetensors")))
    _check_band(res, "bitops")
    prov = res.policy.provenance
    assert prov["note"] == "max bits" and res.repaired_layers
    assert prov["weights_init"].startswith("fp:") and prov["repair"]["changed_layers"]
    ctx = seen["ctx"]
    assert len(ctx.searchable) == 18 and ctx.budget.spec == "w3a3"
    assert torch.equal(ctx.model.conv1.weight, fp.conv1.weight)
    assert len(ctx.batches(1)[0][0]) == 16
    with pytest.raises(ConfigError, match="unknown search method"):
        search(tiny(folder, tmp_path / "u", method="nope", budget="w3a3"))


def test_config_yaml_and_cli(folder, tmp_path):
    from mpqkit.cli import main

    conf = tmp_path / "s.yaml"
    conf.write_text(yaml.safe_dump({"method": "edmips", "w_bits": [2, 4], "budget": "w3a3",
                                    "data": {"batch_size": 16}}))
    cfg = load_search_config(conf, {"epochs": 3, "a_bits": "4,2"})
    assert cfg.w_bits == [2, 4] and cfg.a_bits == [2, 4] and cfg.epochs == 3
    assert cfg.data.batch_size == 16
    with pytest.raises(ConfigError, match="unknown option"):
        load_search_config(None, {"lr": 0.1})
    out = tmp_path / "cli"
    common = ["--out", str(out), "--no-progress", "--device", "cpu"]
    argv = ["search", "--config", str(conf), "--data", f"imagefolder:{folder}", "--cache-dir",
            str(folder.parent / "cache"), "--epochs", "1", "--max-steps-per-epoch", "1", *common]
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "edmips" and saved["w_bits"] == [2, 4]
    assert main(argv) == 2  # refuses to overwrite a run
    assert main(["search", "--resume", "--epochs", "2", *common]) == 0
    assert len(list(csv.DictReader((out / "search.csv").open()))) == 2


def test_loss_terms():
    torch.manual_seed(0)
    feat = torch.randn(6, 8, 4, 4, requires_grad=True)
    logits = feat.mean((2, 3)) @ torch.randn(8, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cam = gradcam(feat, logits, y, create_graph=True)
    assert cam.shape == (6, 4, 4) and cam.requires_grad
    assert attribution_loss(cam, cam.detach(), power=1.0).item() == pytest.approx(0.0, abs=1e-5)
    attribution_loss(cam, torch.rand(6, 4, 4)).backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    z = torch.randn(6, 5, requires_grad=True)
    m = margin_loss(z, y)
    m.backward()
    assert m.item() > 0 and z.grad is not None
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert float(margin_loss(same, torch.tensor([0, 0, 1, 1]))) == pytest.approx(0.0, abs=1e-6)


def test_search_checkpoint_reloads_as_its_supernet(folder, tmp_path):
    import math

    import torch

    from mpqkit.engine import load_checkpoint_model
    from mpqkit.search import Supernet
    from mpqkit.sharpness import sharpness_from_checkpoint

    res = search(tiny(folder, tmp_path / "s", method="edmips", budget="w3a3"))
    sn, meta = load_checkpoint_model(res.run_dir / "last.safetensors")
    assert isinstance(sn, Supernet) and meta["kind"] == "supernet"
    assert sn.argmax_bits() == res.argmax_bits
    x = torch.randn(2, 3, 32, 32)
    assert sn(x).shape == (2, 4)
    out = sharpness_from_checkpoint(res.run_dir / "last.safetensors",
                                    {"name": f"imagefolder:{folder}", "input_size": 32},
                                    batches=1, batch_size=8)
    assert math.isfinite(out["surrogate_gap"])
