"""Budgets: parsing, feasibility messages, and repair into [0.98, 1] x budget."""

from __future__ import annotations

import random

import pytest

from mpqkit.complexity import Budget, LayerInfo, parse_budget, policy_cost, profile_model
from mpqkit.errors import BudgetError, ConfigError
from mpqkit.models import build_model
from mpqkit.policy import first_last_layers
from mpqkit.search.budget import _greedy, achievable_range, check_feasible, repair, solve_choices

C = (2, 3, 4, 6)


@pytest.fixture(scope="module", params=["resnet20", "resnet18_cifar"])
def setup(request):
    infos = profile_model(build_model(request.param), 32)
    fixed = {n: (8, 8) for n in first_last_layers(infos)}
    searchable = [n for n in infos if n not in fixed]
    return request.param, infos, fixed, searchable


def _budgets(infos, fixed, searchable):
    out = [parse_budget(uniform=f"w{b}a{b}", infos=infos, fixed_bits=fixed,
                        searchable=searchable) for b in (2, 3, 4, 5, 6)]
    out.append(parse_budget(bitops="w3a4", infos=infos, fixed_bits=fixed, searchable=searchable))
    mn, mx = achievable_range(infos, searchable, fixed, C, C, "bitops")
    for f in (0.013, 0.37, 0.71):  # odd absolute values
        out.append(parse_budget(bitops=f"{mn + f * (mx - mn):.6e}", infos=infos,
                                fixed_bits=fixed, searchable=searchable))
    smn, smx = achievable_range(infos, searchable, fixed, C, C, "size_mb")
    for f in (0.05, 0.5, 0.93):
        out.append(parse_budget(size_mb=smn + f * (smx - smn), infos=infos, fixed_bits=fixed,
                                searchable=searchable))
    return out


def _starts(infos, fixed, searchable):
    yield {n: (8, 8) for n in infos}  # extreme high, outside the candidates
    yield {**{n: (2, 2) for n in searchable}, **fixed}
    yield {**{n: (32, 32) for n in searchable}, **fixed}
    for seed in range(3):
        rng = random.Random(seed)
        yield {**{n: (rng.choice(C), rng.choice(C)) for n in searchable}, **fixed}


def test_repair_lands_in_band(setup):
    _, infos, fixed, searchable = setup
    for budget in _budgets(infos, fixed, searchable):
        check_feasible(budget, infos, searchable, fixed, C, C)
        for i, start in enumerate(_starts(infos, fixed, searchable)):
            order = list(reversed(searchable)) if i % 2 else None
            out = repair(start, infos, budget, C, C, searchable, order=order)
            cost = policy_cost(infos, out, budget.kind)
            assert 0.98 * budget.value <= cost <= budget.value, (budget, i, cost / budget.value)
            assert all(out[n] == fixed[n] for n in fixed)
            assert all(out[n][0] in C and out[n][1] in C for n in searchable)
            assert repair(start, infos, budget, C, C, searchable, order=order) == out


def test_parse_budget_forms(setup):
    _, infos, fixed, searchable = setup
    kw = {"infos": infos, "fixed_bits": fixed, "searchable": searchable}
    b = parse_budget(uniform="w4a4", **kw)
    uniform = {n: fixed.get(n, (4, 4)) for n in infos}
    assert b.kind == "bitops" and b.value == policy_cost(infos, uniform, "bitops")
    assert b.spec == "w4a4" and b.to_dict() == {"kind": "bitops", "value": b.value,
                                                "spec": "w4a4"}
    assert parse_budget(bitops="W4A4", **kw).value == b.value
    assert parse_budget(bitops="1.5G", **kw).value == 1.5e9
    s = parse_budget(bitops="0.5MB", **kw)
    assert (s.kind, s.value) == ("size_mb", 0.5)
    assert parse_budget(size_mb=0.25, **kw).value == 0.25
    with pytest.raises(ConfigError, match="exactly one"):
        parse_budget(bitops="1G", uniform="w4a4", **kw)
    with pytest.raises(ConfigError, match="exactly one"):
        parse_budget(**kw)
    with pytest.raises(ConfigError):
        parse_budget(bitops="-3G", **kw)
    assert Budget.from_dict(b.to_dict()) == b


def test_infeasible_budgets_name_the_range(setup):
    _, infos, fixed, searchable = setup
    mn, mx = achievable_range(infos, searchable, fixed, C, C, "bitops")
    low = Budget("bitops", mn * 0.5, "low")
    with pytest.raises(BudgetError, match="below the smallest achievable") as e:
        check_feasible(low, infos, searchable, fixed, C, C)
    assert "raise the budget to at least" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BudgetError, match="below the smallest"):
        repair({n: (8, 8) for n in infos}, infos, low, C, C, searchable)
    high = Budget("bitops", mx * 1.5, "high")
    with pytest.raises(BudgetError, match="above the largest achievable"):
        check_feasible(high, infos, searchable, fixed, C, C)


def _toy(macs):
    return {f"l{i}": LayerInfo(f"l{i}", "conv", m, m, (), (), 1, 1) for i, m in enumerate(macs)}


def test_exact_fallback_when_greedy_cannot_fill():
    infos = _toy([55, 25, 49])
    budget = Budget("bitops", 2143.665, "odd")
    start = {n: (6, 6) for n in infos}
    assert _greedy(start, infos, budget, list(C), list(C), list(infos), None, 0.02) is None
    out = repair(start, infos, budget, C, C, list(infos))
    assert 0.98 * budget.value <= policy_cost(infos, out, "bitops") <= budget.value


def test_unreachable_band_is_refused_with_neighbours():
    infos = _toy([100])
    budget = Budget("bitops", 600, "600")
    with pytest.raises(BudgetError, match="nearest achievable") as e:
        check_feasible(budget, infos, ["l0"], {}, (2, 4), (2,))
    assert "400" in str(e.value) and "800" in str(e.value)


def test_solve_choices_minimises_within_band():
    costs = [[1, 2, 3], [1, 2, 3]]
    scores = [[3, 2, 0], [5, 1, 0.5]]  # totals of 4: (1,3) 3.5, (2,2) 3, (3,1) 5
    assert solve_choices(costs, scores, 3.5, 4) == [1, 1]
    assert solve_choices(costs, scores, 5.5, 6) == [2, 2]
    assert solve_choices(costs, scores, 6.5, 7) is None


def test_budget_in_average_bits():
    infos = profile_model(build_model("resnet20"), 32)
    fixed = {n: (8, 8) for n in first_last_layers(infos)}
    kw = {"infos": infos, "fixed_bits": fixed,
          "searchable": [n for n in infos if n not in fixed]}
    three = parse_budget(bits=3, **kw)
    assert three.value == parse_budget(uniform="w3a3", **kw).value and three.spec == "3bits"
    b25 = parse_budget(bits="2.5", **kw)
    fixed_cost = sum(infos[n].macs * 64 for n in fixed)
    searched = sum(i.macs for n, i in infos.items() if n not in fixed)
    assert b25.value == pytest.approx(fixed_cost + 6.25 * searched)
    # w2a3 and w3a2 (6 bit-products) fit under 2.5 bits (6.25), w3a3 does not
    assert parse_budget(uniform="w2a3", **kw).value < b25.value < three.value
    with pytest.raises(ConfigError, match="outside 2..8"):
        parse_budget(bits=1.5, **kw)
    with pytest.raises(ConfigError, match="exactly one budget"):
        parse_budget(bits=3, uniform="w3a3", **kw)


def test_repair_changes_as_few_layers_as_the_band_allows():
    # below the band: one step of the big layer fills it; stepping through the small, least
    # decided layers first (the greedy order) would change all five
    infos = _toy([100, 10, 10, 10, 10])
    start = {n: (2, 2) for n in infos}  # 560 BitOps
    budget = Budget("bitops", 770, "770")  # band [754.6, 770]: l0 at 3 bits gives 760
    order = ["l1", "l2", "l3", "l4", "l0"]
    greedy = _greedy(start, infos, budget, list(C), list(C), list(infos), order, 0.02)
    assert greedy is not None and sum(greedy[n] != start[n] for n in infos) >= 3
    out = repair(start, infos, budget, C, C, list(infos), order=order)
    assert [n for n in infos if out[n] != start[n]] == ["l0"]
    assert policy_cost(infos, out, "bitops") == 760
    # between equal counts the least decided layer (first in the order) is the one changed
    two = _toy([10, 10])
    out = repair({n: (2, 2) for n in two}, two, Budget("bitops", 122, "122"), C, C, list(two),
                 order=["l1", "l0"])
    assert out["l0"] == (2, 2) and out["l1"] != (2, 2)
