"""Uniform and random baselines at a budget."""

from __future__ import annotations

import pytest

from mpqkit.complexity import Budget, parse_budget, policy_cost, profile_model
from mpqkit.errors import BudgetError
from mpqkit.models import build_model
from mpqkit.policy import first_last_layers
from mpqkit.search import random_bits, uniform_bits

C = (2, 3, 4, 6)


@pytest.fixture(scope="module")
def setup():
    infos = profile_model(build_model("resnet20"), 32)
    fixed = {n: (8, 8) for n in first_last_layers(infos)}
    return infos, fixed, [n for n in infos if n not in fixed]


def test_uniform_is_the_largest_uniform_within_budget(setup):
    infos, fixed, searchable = setup
    kw = {"infos": infos, "fixed_bits": fixed, "searchable": searchable}
    b4 = parse_budget(uniform="w4a4", **kw)
    bits = uniform_bits(infos, b4, searchable, fixed, C, C)
    assert {bits[n] for n in searchable} == {(4, 4)}
    assert all(bits[n] == fixed[n] for n in fixed)
    just_below = Budget("bitops", b4.value - 1, "x")
    bits = uniform_bits(infos, just_below, searchable, fixed, C, C)
    # 12 < 16: ties w4a3, w3a4, w6a2, w2a6 -> the more balanced, then more activation bits
    assert {bits[n] for n in searchable} == {(3, 4)}
    bits = uniform_bits(infos, just_below, searchable, fixed, C, C, same_bits=True)
    assert {bits[n] for n in searchable} == {(3, 3)}
    assert policy_cost(infos, bits, "bitops") <= just_below.value
    with pytest.raises(BudgetError, match="no uniform policy fits"):
        uniform_bits(infos, Budget("bitops", 1e6, "1M"), searchable, fixed, C, C)


def test_random_is_seeded_and_in_band(setup):
    infos, fixed, searchable = setup
    for spec in ("w3a3", "w5a5"):
        b = parse_budget(uniform=spec, infos=infos, fixed_bits=fixed, searchable=searchable)
        policies = [random_bits(infos, b, searchable, fixed, C, C, seed=s) for s in range(4)]
        for bits in policies:
            assert 0.98 * b.value <= policy_cost(infos, bits, "bitops") <= b.value
            assert all(bits[n] == fixed[n] for n in fixed)
        assert random_bits(infos, b, searchable, fixed, C, C, seed=0) == policies[0]
        assert len({tuple(sorted(p.items())) for p in policies}) == 4


def test_methods_plug_into_search(tiny_folder, tmp_path):
    from mpqkit.data import DataConfig
    from mpqkit.search import SearchConfig, available_methods, search

    assert {"uniform", "random"} <= set(available_methods())
    for method in ("uniform", "random"):
        cfg = SearchConfig(model="resnet20", method=method, budget="w5a5", seed=1,
                           out=str(tmp_path / method), progress=False,
                           data=DataConfig(name=f"imagefolder:{tiny_folder}", batch_size=8,
                                           cache_dir=str(tmp_path / "cache")))
        res = search(cfg)
        prov = res.policy.provenance
        cost = res.policy.complexity().bitops
        assert cost <= res.budget.value
        assert prov["method"] == method and prov["seed"] == 1 and "wall_time_s" in prov
        assert prov["budget"]["spec"] == "w5a5" and prov["images_processed"] == 0
        assert (tmp_path / method / "policy.json").is_file()
        if method == "random":
            assert cost >= 0.98 * res.budget.value
        else:  # the loop leaves uniform alone
            assert len({res.policy.bits()[n] for n in res.policy.searchable()}) == 1


def test_uniform_at_2_5_bits_prefers_more_activation_bits_and_says_what_it_skipped(
        tiny_folder, tmp_path):
    from mpqkit.data import DataConfig
    from mpqkit.search import SearchConfig, search

    cfg = SearchConfig(model="resnet20", method="uniform", budget_bits=2.5, out=str(tmp_path),
                       overwrite=True, progress=False,
                       data=DataConfig(name=f"imagefolder:{tiny_folder}", batch_size=8,
                                       cache_dir=str(tmp_path / "cache")))
    res = search(cfg)
    pol = res.policy
    assert {pol.bits()[n] for n in pol.searchable()} == {(2, 3)}
    prov = pol.provenance
    assert prov["uniform"] == "w2a3" and prov["uniform_ties_skipped"] == ["w3a2"]
    assert prov["budget"]["spec"] == "2.5bits"
    assert "w3a2 skipped" in (tmp_path / "log.txt").read_text()
