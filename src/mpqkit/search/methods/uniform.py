"""Uniform precision at the budget: every searchable layer at the same ``(w_bits, a_bits)``.

The pair of candidates with the largest cost not above the budget (ties: the more balanced
pair, then more activation bits; see :func:`uniform_candidates` for why). It is not required to
land within 2% of the budget: a uniform policy cannot, in general. ``same_bits=True`` restricts
it to ``w_bits == a_bits``. Fixed layers (first/last) keep their ``fixed_bits``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mpqkit.complexity import Budget, LayerInfo, policy_cost
from mpqkit.errors import BudgetError, ConfigError
from mpqkit.search.budget import achievable_range
from mpqkit.search.context import MethodResult, SearchContext
from mpqkit.search.registry import register_method

Bits = dict[str, tuple[int, int]]
log = logging.getLogger("mpqkit")


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


def uniform_candidates(infos: Mapping[str, LayerInfo], budget: Budget,
                       searchable: Sequence[str], fixed_bits: Mapping[str, tuple[int, int]],
                       w_cands: Sequence[int], a_cands: Sequence[int], *,
                       same_bits: bool = False) -> list[tuple[float, int, int]]:
    """Every uniform ``(cost, w, a)`` within the budget, best first.

    Best = the largest cost; between equal costs the more balanced pair (w4a3 over w6a2: no
    side at its extreme), then the one with more activation bits (w2a3 over w3a2 at 2.5 bits),
    the more sensitive side at low precision: a 2-bit activation after ReLU has 4 levels for a
    whole layer's input, and its error reaches every later layer; after the same 1-epoch
    CIFAR-10 fine-tune of ResNet-20, w2a3 scored 81.01% and w3a2 78.25%.
    """
    out = []
    for w in sorted(set(w_cands)):
        for a in sorted(set(a_cands)):
            if same_bits and w != a:
                continue
            cost = policy_cost(infos, all_bits(infos, searchable, fixed_bits, w, a), budget.kind)
            if cost <= budget.value:
                out.append((cost, w, a))
    return sorted(out, key=lambda c: (round(c[0], 6), -abs(c[1] - c[2]), c[2]), reverse=True)


def uniform_bits(infos: Mapping[str, LayerInfo], budget: Budget, searchable: Sequence[str],
                 fixed_bits: Mapping[str, tuple[int, int]], w_cands: Sequence[int],
                 a_cands: Sequence[int], *, same_bits: bool = False) -> Bits:
    """The best uniform policy within budget (see :func:`uniform_candidates`)."""
    cands = uniform_candidates(infos, budget, searchable, fixed_bits, w_cands, a_cands,
                               same_bits=same_bits)
    _check_some(cands, infos, budget, searchable, fixed_bits, w_cands, a_cands, same_bits)
    _, w, a = cands[0]
    return all_bits(infos, searchable, fixed_bits, w, a)


def _check_some(cands: list[tuple[float, int, int]], infos: Mapping[str, LayerInfo],
                budget: Budget, searchable: Sequence[str],
                fixed_bits: Mapping[str, tuple[int, int]], w_cands: Sequence[int],
                a_cands: Sequence[int], same_bits: bool) -> None:
    if not cands:
        wc, ac = sorted(set(w_cands)), sorted(set(a_cands))
        mn, _ = achievable_range(infos, searchable, fixed_bits, wc, ac, budget.kind)
        raise BudgetError(f"no uniform policy fits budget {budget.spec} = {budget.format()}; the "
                          f"smallest, w{wc[0]}a{ac[0]}, costs {budget.format(mn)}"
                          + (" (with w_bits == a_bits)" if same_bits else "")
                          + f": raise the budget to at least {budget.format(mn)}")


@register_method("uniform", config=UniformConfig, description="uniform precision: the largest "
                 "uniform policy within the budget")
def uniform_method(ctx: SearchContext) -> MethodResult:
    """Uniform precision: the largest uniform policy not above the budget.

    Equal-cost candidates: the more balanced pair, then more activation bits win
    (:func:`uniform_candidates`); the ones
    skipped are logged and recorded (``uniform_ties_skipped``). ``same_bits`` (default false)
    restricts it to ``w_bits == a_bits``. The result is exempt from the budget-band repair: a
    uniform policy need not come within 2%.
    """
    same = bool(ctx.options.same_bits)
    cands = uniform_candidates(ctx.infos, ctx.budget, ctx.searchable, ctx.fixed_bits,
                               ctx.w_candidates, ctx.a_candidates, same_bits=same)
    _check_some(cands, ctx.infos, ctx.budget, ctx.searchable, ctx.fixed_bits, ctx.w_candidates,
                ctx.a_candidates, same)
    best, w, a = cands[0]
    bits = all_bits(ctx.infos, ctx.searchable, ctx.fixed_bits, w, a)
    ties = [f"w{cw}a{ca}" for c, cw, ca in cands[1:] if abs(c - best) <= 1e-9 * best]
    if ties:
        log.info(f"uniform: w{w}a{a} chosen; equal-cost {', '.join(ties)} skipped (ties go to "
                 "the more balanced pair, then more activation bits)")
    prov = {"uniform": f"w{w}a{a}", "same_bits": same, "uniform_ties_skipped": ties,
            "uniform_within_budget": [f"w{cw}a{ca}" for _, cw, ca in cands],
            "images_processed": 0, "passes": 0}
    return MethodResult(bits, prov, repair=False)
