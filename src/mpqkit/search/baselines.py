"""Baselines at the same budget: the best uniform policy, and seeded random policies.

* ``uniform``: every searchable layer at the same ``(w_bits, a_bits)``, the pair of candidates
  with the largest cost not above the budget (ties: the more balanced pair, then more weight
  bits). It is not required to land within 2% of the budget: a uniform policy cannot, in
  general. ``same_bits=True`` restricts it to ``w_bits == a_bits``.
* ``random``: per searchable layer, weight and activation bits drawn uniformly from the
  candidates (``numpy`` generator seeded with ``seed``), then moved into
  ``[(1 - tol) * budget, budget]`` by :func:`mpqkit.search.budget.repair` with a random layer
  order (also from the seed), so the repair does not favour any layer.

Fixed layers (first/last) keep their ``fixed_bits`` in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mpqkit.complexity import Budget, LayerInfo, policy_cost
from mpqkit.errors import BudgetError, ConfigError
from mpqkit.search.budget import DEFAULT_TOL, achievable_range, check_feasible, repair
from mpqkit.search.loop import MethodResult, SearchContext, register_method

Bits = dict[str, tuple[int, int]]


def _all_bits(infos: Mapping[str, LayerInfo], searchable: Sequence[str],
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
            bits = _all_bits(infos, searchable, fixed_bits, w, a)
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


def random_bits(infos: Mapping[str, LayerInfo], budget: Budget, searchable: Sequence[str],
                fixed_bits: Mapping[str, tuple[int, int]], w_cands: Sequence[int],
                a_cands: Sequence[int], *, seed: int = 0, tol: float = DEFAULT_TOL) -> Bits:
    """A seeded random policy inside ``[(1 - tol) * budget, budget]``."""
    check_feasible(budget, infos, searchable, fixed_bits, w_cands, a_cands, tol)
    wc, ac = sorted(set(w_cands)), sorted(set(a_cands))
    rng = np.random.default_rng(seed)
    s = set(searchable)
    names = [n for n in infos if n in s]
    draws = rng.integers(0, [len(wc), len(ac)], size=(len(names), 2))
    bits = dict(_all_bits(infos, searchable, fixed_bits, wc[0], ac[0]))
    for n, (i, j) in zip(names, draws, strict=True):
        bits[n] = (wc[int(i)], ac[int(j)])
    order = [names[int(k)] for k in rng.permutation(len(names))]
    return repair(bits, infos, budget, wc, ac, searchable, order=order, tol=tol)


# ----------------------------------------------------------------------------------------------
# the search-loop methods
# ----------------------------------------------------------------------------------------------
def uniform_method(ctx: SearchContext) -> MethodResult:
    """Uniform precision: the largest uniform policy not above the budget.

    ``cfg.options["same_bits"]`` (default false) restricts it to ``w_bits == a_bits``. The
    result is exempt from the budget-band repair: a uniform policy need not come within 2%.
    """
    same = bool(ctx.cfg.options.get("same_bits", False))
    bits = uniform_bits(ctx.infos, ctx.budget, ctx.searchable, ctx.fixed_bits,
                        ctx.w_candidates, ctx.a_candidates, same_bits=same)
    w, a = next((bits[n] for n in ctx.searchable), (0, 0))
    prov = {"uniform": f"w{w}a{a}", "same_bits": same, "images_processed": 0, "passes": 0}
    if "repair" in MethodResult.__dataclass_fields__:  # the loop's switch to skip the repair
        return MethodResult(bits, prov, repair=False)  # type: ignore[call-arg]
    return MethodResult(bits, prov)


def random_method(ctx: SearchContext) -> MethodResult:
    """A random policy inside the budget band, seeded by ``cfg.seed``."""
    bits = random_bits(ctx.infos, ctx.budget, ctx.searchable, ctx.fixed_bits, ctx.w_candidates,
                       ctx.a_candidates, seed=ctx.cfg.seed, tol=ctx.cfg.tol)
    return MethodResult(bits, {"random_seed": ctx.cfg.seed, "images_processed": 0, "passes": 0})


register_method("uniform", uniform_method, description="uniform precision: the largest uniform "
                "policy within the budget")
register_method("random", random_method, description="random per-layer bits, repaired into the "
                "budget band (seeded)")
