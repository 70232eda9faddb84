"""Random policies at the budget: the baseline a search must beat.

Per searchable layer, weight and activation bits drawn uniformly from the candidates (``numpy``
generator seeded with ``seed``), then moved into ``[(1 - tol) * budget, budget]`` by
:func:`mpqkit.search.budget.repair` with a random layer order (also from the seed), so the
repair does not favour any layer. Fixed layers (first/last) keep their ``fixed_bits``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mpqkit.complexity import Budget, LayerInfo
from mpqkit.search.budget import DEFAULT_TOL, check_feasible, repair
from mpqkit.search.context import MethodResult, SearchContext
from mpqkit.search.methods.uniform import all_bits
from mpqkit.search.registry import register_method

Bits = dict[str, tuple[int, int]]


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
    bits = dict(all_bits(infos, searchable, fixed_bits, wc[0], ac[0]))
    for n, (i, j) in zip(names, draws, strict=True):
        bits[n] = (wc[int(i)], ac[int(j)])
    order = [names[int(k)] for k in rng.permutation(len(names))]
    return repair(bits, infos, budget, wc, ac, searchable, order=order, tol=tol)


@register_method("random", description="random per-layer bits, repaired into the budget band "
                 "(seeded)")
def random_method(ctx: SearchContext) -> MethodResult:
    """A random policy inside the budget band, seeded by ``cfg.seed``."""
    bits = random_bits(ctx.infos, ctx.budget, ctx.searchable, ctx.fixed_bits, ctx.w_candidates,
                       ctx.a_candidates, seed=ctx.cfg.seed, tol=ctx.cfg.tol)
    return MethodResult(bits, {"random_seed": ctx.cfg.seed, "images_processed": 0, "passes": 0})
