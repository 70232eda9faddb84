"""Policy transfer by layer name, with the budget re-evaluated on the target."""

from __future__ import annotations

import json

import pytest

from mpqkit.cli import main
from mpqkit.complexity import parse_budget, profile_model
from mpqkit.errors import PolicyError
from mpqkit.models import build_model
from mpqkit.policy import Policy, first_last_layers
from mpqkit.search import random_bits
from mpqkit.transfer import transfer_policy

C = (2, 3, 4, 6)


@pytest.fixture(scope="module")
def proxy_policy() -> Policy:
    model = build_model("resnet18_cifar")
    infos = profile_model(model, 32)
    ends = first_last_layers(infos)
    fixed = {n: (8, 8) for n in ends}
    searchable = [n for n in infos if n not in fixed]
    budget = parse_budget(uniform="w3a3", infos=infos, fixed_bits=fixed, searchable=searchable)
    bits = random_bits(infos, budget, searchable, fixed, C, C, seed=3)
    return Policy.from_bits(model, bits, 32, model_name="resnet18_cifar", fixed=ends,
                            budget=budget.to_dict(), infos=infos)


def test_cifar_resnet18_to_torchvision_resnet18(proxy_policy):
    target, rep = transfer_policy(proxy_policy, "resnet18", 200, 64)
    assert target.model == "resnet18" and target.input_size == (64, 64)
    assert target.bits() == proxy_policy.bits()
    assert target.layers["fc"].params == 512 * 200
    # complexity recomputed at the target's input size: the ImageNet stem is stride 4
    assert target.layers["conv1"].macs == 3 * 64 * 7 * 7 * 32 * 32
    uniform = Policy.uniform(build_model("resnet18", num_classes=200), 3, 3, 64)
    b = rep["budget"]
    assert b["target_value"] == pytest.approx(uniform.complexity().bitops)
    assert rep["holds"] == (target.complexity().bitops <= b["target_value"])
    assert ("holds" if rep["holds"] else "does not hold") in rep["message"]
    assert target.budget["proxy_value"] == proxy_policy.budget["value"]
    assert target.provenance["transferred_from"]["model"] == "resnet18_cifar"


def test_budget_that_does_not_hold(proxy_policy):
    tight = Policy.from_dict({**proxy_policy.to_dict(),
                              "budget": {"kind": "bitops", "value": 1.0, "spec": "w2a2"}})
    _, rep = transfer_policy(tight, "resnet18", 10, 32)
    assert rep["holds"] is False and "does not hold" in rep["message"]
    assert rep["budget"]["target_value"] < rep["budget"]["target_achieved"]


def test_absolute_budget_maps_by_average_bit_product(proxy_policy):
    d = proxy_policy.to_dict()
    d["budget"] = {"kind": "bitops", "value": proxy_policy.budget["value"], "spec": "abs"}
    _, rep = transfer_policy(Policy.from_dict(d), "resnet18", 10, 32)
    # the absolute value equals the w3a3 BitOps on the proxy: both rules agree on the target
    _, rep_u = transfer_policy(proxy_policy, "resnet18", 10, 32)
    assert rep["budget"]["target_value"] == pytest.approx(rep_u["budget"]["target_value"])


def test_mismatched_names_are_refused_on_one_line():
    p = Policy.uniform(build_model("resnet20"), 4, 4, 32, model_name="resnet20")
    with pytest.raises(PolicyError) as e:
        transfer_policy(p, "resnet18", 10, 32)
    msg = str(e.value)
    assert "\n" not in msg and "layer4.0.conv1" in msg and "layer1.2.conv1" in msg


def test_cli(proxy_policy, tmp_path, capsys):
    src = proxy_policy.save(tmp_path / "proxy.json")
    out = tmp_path / "target.json"
    rc = main(["transfer", "--policy", str(src), "--model", "resnet18", "--num-classes", "200",
               "--input-size", "32", "--out", str(out)])
    assert rc == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "budget w3a3" in text and "hold" in text
    assert json.loads(out.read_text())["model"] == "resnet18"
    tight = Policy.from_dict({**proxy_policy.to_dict(),
                              "budget": {"kind": "bitops", "value": 1.0, "spec": "w2a2"}})
    rc = main(["transfer", "--policy", str(tight.save(tmp_path / "tight.json")), "--model",
               "resnet18", "--input-size", "32", "--budget-check"])
    assert rc == 2 and "does not hold" in capsys.readouterr().err
