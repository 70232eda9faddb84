"""Uniform precision at the budget: every searchable layer at the same ``(w_bits, a_bits)``.

The pair of candidates with the largest cost not above the budget (ties: the more balanced pair,
then more weight bits). It is not required to land within 2% of the budget: a uniform policy
cannot, in general. ``same_bits=True`` restricts it to ``w_bits == a_bits``. Fixed layers
(first/last) keep their ``fixed_bits``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mpqkit.complexity import Budget, LayerInfo, policy_cost
from mpqkit.errors import BudgetError, ConfigError
from mpqkit.search.budget import achievable_range
from mpqkit.search.context import MethodResult, SearchContext
from mpqkit.search.registry import register_method

Bits = dict[str, tuple[int, int]]


@dataclass
class UniformConfig:
    same_bits: bool = field(default=False, metadata={
        "help": "only policies with w_bits == a_bits"})


def all_bits(infos: Mapping[str, LayerInfo], searchable: Sequence[str],
              fixed_bits: Mapping[str, tuple[int, int]], w: int, a: int) -> Bits:
    s = set(searchable)
    missing = [n for n in infos if n not in s and n not in fixed_bits]
    if missing:
        raise ConfigError(f"layers {', '.join(missing[:8])} are neither searchable nor fixed: "
                          "give each quantizable layer fixed bits or make it searchable")
    return {n: ((w, a) if n in s else tuple(fixed_bits[n])) for n in infos}  # type: ignore[misc]


def uniform_bits(infos: Mapping[str, LayerInfo], budget: Budget, searchable: Sequence[str],
                 fixed_bits: Mapping[str, tuple[int, int]], w_cands: Sequence[int],
                 a_cands: Sequence[int], *, same_bits: bool = False) -> Bits:
    """The largest uniform policy (all searchable layers at one candidate pair) within budget."""
    best: tuple[tuple[float, int, int], Bits] | None = None
    for w in sorted(set(w_cands)):
        for a in sorted(set(a_cands)):
            if same_bits and w != a:
                continue
            bits = all_bits(infos, searchable, fixed_bits, w, a)
            cost = policy_cost(infos, bits, budget.kind)
            if cost <= budget.value:
                key = (cost, -abs(w - a), w)
                if best is None or key > best[0]:
                    best = (key, bits)
    if best is None:
        wc, ac = sorted(set(w_cands)), sorted(set(a_cands))
        mn, _ = achievable_range(infos, searchable, fixed_bits, wc, ac, budget.kind)
        raise BudgetError(f"no uniform policy fits budget {budget.spec} = {budget.format()}; the "
                          f"smallest, w{wc[0]}a{ac[0]}, costs {budget.format(mn)}"
                          + (" (with w_bits == a_bits)" if same_bits else "")
                          + f": raise the budget to at least {budget.format(mn)}")
    return best[1]



@register_method("uniform", config=UniformConfig, description="uniform precision: the largest "
                 "uniform policy within the budget")
def uniform_method(ctx: SearchContext) -> MethodResult:
    """Uniform precision: the largest uniform policy not above the budget.

    ``same_bits`` (default false) restricts it to ``w_bits == a_bits``. The
    result is exempt from the budget-band repair: a uniform policy need not come within 2%.
    """
    same = bool(ctx.options.same_bits)
    bits = uniform_bits(ctx.infos, ctx.budget, ctx.searchable, ctx.fixed_bits,
                        ctx.w_candidates, ctx.a_candidates, same_bits=same)
    w, a = next((bits[n] for n in ctx.searchable), (0, 0))
    prov = {"uniform": f"w{w}a{a}", "same_bits": same, "images_processed": 0, "passes": 0}
    return MethodResult(bits, prov, repair=False)
