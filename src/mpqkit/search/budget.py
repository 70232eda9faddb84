"""Budget feasibility and repair: moving a policy into the budget band.

The budget itself lives with the costs in :mod:`mpqkit.complexity`: ``Budget``,
``parse_budget`` (BitOps, ``"same as uniform wWaA"`` or model size in MB), ``policy_cost`` and
``layer_cost``. This module answers whether a budget can be met (:func:`achievable_range`,
:func:`check_feasible`) and moves a policy into it (:func:`repair`, :func:`solve_choices`).

A searched policy must land in the band ``[(1 - tol) * budget, budget]`` (``tol = 0.02``).
:func:`repair` moves any policy there: first greedily (lowering or raising one bit-width step at
a time, least decided layers first when an ``order`` is given, else the most expensive layers
first), then, if the greedy pass cannot hit the band, with an exact multiple-choice integer
program (``scipy.optimize.milp``) that changes the starting policy as little as possible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mpqkit.complexity import Budget, LayerInfo, layer_cost, policy_cost
from mpqkit.errors import BudgetError, ConfigError

DEFAULT_TOL = 0.02

Bits = dict[str, tuple[int, int]]


# ----------------------------------------------------------------------------------------------
# feasibility
# ----------------------------------------------------------------------------------------------
def _check_layers(infos: Mapping[str, LayerInfo], searchable: Sequence[str],
                  fixed: Mapping[str, tuple[int, int]]) -> None:
    s = set(searchable)
    unknown = [n for n in s if n not in infos]
    if unknown:
        raise ConfigError(f"searchable layers {', '.join(sorted(unknown)[:8])} are not in the "
                          "model: list layers by their module names (see `mpqkit info`)")
    missing = [n for n in infos if n not in s and n not in fixed]
    if missing:
        raise ConfigError(f"layers {', '.join(missing[:8])} are neither searchable nor fixed: "
                          "give each quantizable layer fixed bits or make it searchable")


def _cands(c: Sequence[int], what: str) -> list[int]:
    out = sorted({int(b) for b in c})
    if not out:
        raise ConfigError(f"no {what} bit candidates: give at least one, e.g. 2,3,4,6")
    return out


def _extreme(infos: Mapping[str, LayerInfo], searchable: Sequence[str],
             fixed: Mapping[str, tuple[int, int]], w: int, a: int) -> Bits:
    s = set(searchable)
    return {n: ((w, a) if n in s else tuple(fixed[n])) for n in infos}  # type: ignore[misc]


def achievable_range(infos: Mapping[str, LayerInfo], searchable: Sequence[str],
                     fixed_bits: Mapping[str, tuple[int, int]], w_cands: Sequence[int],
                     a_cands: Sequence[int], kind: str) -> tuple[float, float]:
    """(smallest, largest) cost: every searchable layer at its minimum / maximum candidates."""
    wc, ac = _cands(w_cands, "weight"), _cands(a_cands, "activation")
    lo = policy_cost(infos, _extreme(infos, searchable, fixed_bits, wc[0], ac[0]), kind)
    hi = policy_cost(infos, _extreme(infos, searchable, fixed_bits, wc[-1], ac[-1]), kind)
    return lo, hi


def check_feasible(budget: Budget, infos: Mapping[str, LayerInfo], searchable: Sequence[str],
                   fixed_bits: Mapping[str, tuple[int, int]], w_cands: Sequence[int],
                   a_cands: Sequence[int], tol: float = DEFAULT_TOL) -> None:
    """Raise :class:`BudgetError` unless some policy costs within ``[(1-tol)B, B]``.

    The message gives the achievable range and the budget to ask for instead.
    """
    _check_tol(tol)
    _check_layers(infos, searchable, fixed_bits)
    wc, ac = _cands(w_cands, "weight"), _cands(a_cands, "activation")
    mn, mx = achievable_range(infos, searchable, fixed_bits, wc, ac, budget.kind)
    fmt = budget.format
    rng = f"achievable {fmt(mn)} .. {fmt(mx)}"
    if budget.value < mn:
        raise BudgetError(f"budget {budget.spec} = {fmt()} is below the smallest achievable "
                          f"{fmt(mn)} (searchable layers w{wc[0]}a{ac[0]}, fixed layers at their "
                          f"bits; {rng}): raise the budget to at least {fmt(mn)}")
    if (1 - tol) * budget.value > mx:
        raise BudgetError(f"budget {budget.spec} = {fmt()} is above the largest achievable "
                          f"{fmt(mx)} (searchable layers w{wc[-1]}a{ac[-1]}), so no policy comes "
                          f"within {tol:.0%} of it ({rng}): lower the budget to at most "
                          f"{fmt(mx)} or allow larger bit candidates")
    start = _extreme(infos, searchable, fixed_bits, wc[0], ac[0])
    if _greedy(start, infos, budget, wc, ac, searchable, None, tol) is not None:
        return
    if _milp_repair(start, infos, budget, wc, ac, searchable, None, tol) is not None:
        return
    below = _closest(infos, budget, wc, ac, searchable, fixed_bits, below=True, tol=tol)
    above = _closest(infos, budget, wc, ac, searchable, fixed_bits, below=False, tol=tol)
    near = ", ".join(s for s in (f"{fmt(below)} below" if below is not None else "",
                                 f"{fmt(above)} above" if above is not None else "") if s)
    raise BudgetError(f"no policy costs within {tol:.0%} under budget {budget.spec} = {fmt()} "
                      f"(the layers' costs are too coarse; nearest achievable: {near}): choose "
                      "a budget at one of those values or allow more bit candidates")


def _check_tol(tol: float) -> None:
    if not 0 <= tol < 1:
        raise ConfigError(f"budget tolerance {tol!r} must be in [0, 1): e.g. 0.02 for 2%")


# ----------------------------------------------------------------------------------------------
# repair
# ----------------------------------------------------------------------------------------------
def _snap(b: int, cands: list[int]) -> int:
    """The largest candidate <= b (the smallest candidate if b is below all)."""
    below = [c for c in cands if c <= b]
    return below[-1] if below else cands[0]


def repair(bits: Mapping[str, tuple[int, int]], infos: Mapping[str, LayerInfo], budget: Budget,
           w_cands: Sequence[int], a_cands: Sequence[int], searchable: Sequence[str],
           order: Sequence[str] | None = None, tol: float = DEFAULT_TOL) -> Bits:
    """Move a policy into ``[(1 - tol) * budget, budget]``; fixed layers keep their bits.

    Searchable bits outside the candidates are first snapped to the largest candidate not above
    them. An exact integer program then picks the policy inside the band closest to the start:
    fewest candidate steps changed, and between equal counts the least decided layers (earliest
    in ``order``, e.g. by the margin of the architecture logits) changed first. So the repair
    changes as little of a searched policy as the band allows (on ResNet-20 searches 0.92 x
    budget below the band: 1 or 2 layers, where stepping greedily through the least decided
    layers changed 3 or 4; benchmarks/search_decides.py). If the solver finds nothing, a greedy
    pass lowers (least decided or most expensive first, the step that saves more) or raises
    (the largest step that fits) one candidate step at a time. Deterministic. Raises
    :class:`BudgetError` when no policy lies in the band (see :func:`check_feasible`).
    """
    _check_tol(tol)
    wc, ac = _cands(w_cands, "weight"), _cands(a_cands, "activation")
    s = set(searchable)
    missing = [n for n in infos if n not in bits]
    if missing:
        raise ConfigError(f"the policy to repair lacks layers {', '.join(missing[:8])}: give "
                          "bits for every quantizable layer")
    _check_layers(infos, searchable, {n: bits[n] for n in infos if n not in s})
    start: Bits = {}
    for n in infos:
        w, a = bits[n]
        start[n] = (_snap(int(w), wc), _snap(int(a), ac)) if n in s else (int(w), int(a))
    out = start if _in_band(start, infos, budget, tol) else _milp_repair(
        start, infos, budget, wc, ac, searchable, order, tol)
    if out is None:
        out = _greedy(start, infos, budget, wc, ac, searchable, order, tol)
    if out is None:
        fixed = {n: start[n] for n in infos if n not in s}
        check_feasible(budget, infos, searchable, fixed, wc, ac, tol)  # raises with the range
        raise BudgetError(f"no policy found within {tol:.0%} under budget {budget.describe()}: "
                          "choose another budget or allow more bit candidates")
    return out


def _in_band(bits: Bits, infos: Mapping[str, LayerInfo], budget: Budget, tol: float) -> bool:
    return (1 - tol) * budget.value <= policy_cost(infos, bits, budget.kind) <= budget.value


def _priority(names: list[str], cur: Bits, infos: Mapping[str, LayerInfo], kind: str,
              order: Sequence[str] | None) -> list[str]:
    if order is not None:
        seen = set(names)
        first = [n for n in dict.fromkeys(order) if n in seen]
        rest = [n for n in names if n not in set(first)]
        rest.sort(key=lambda n: -layer_cost(infos[n], *cur[n], kind))
        return first + rest
    idx = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (-layer_cost(infos[n], *cur[n], kind), idx[n]))


def _down_step(n: str, cur: Bits, info: LayerInfo, wc: list[int], ac: list[int],
               kind: str) -> tuple[tuple[int, int], float] | None:
    """The single-step lowering of layer ``n`` that saves most: ``((w, a), saving)``."""
    w, a = cur[n]
    base = layer_cost(info, w, a, kind)
    opts = []
    iw, ia = wc.index(w), ac.index(a)
    if iw > 0:
        opts.append(((wc[iw - 1], a), base - layer_cost(info, wc[iw - 1], a, kind), 0))
    if ia > 0:
        opts.append(((w, ac[ia - 1]), base - layer_cost(info, w, ac[ia - 1], kind), 1))
    opts = [o for o in opts if o[1] > 0]
    if not opts:
        return None
    best = max(opts, key=lambda o: (o[1], -o[2]))  # ties: lower the weight bits first
    return best[0], best[1]


def _up_step(n: str, cur: Bits, info: LayerInfo, wc: list[int], ac: list[int], kind: str,
             room: float) -> tuple[tuple[int, int], float] | None:
    """The single-step raise of layer ``n`` that adds most without exceeding ``room``."""
    w, a = cur[n]
    base = layer_cost(info, w, a, kind)
    opts = []
    iw, ia = wc.index(w), ac.index(a)
    if iw + 1 < len(wc):
        opts.append(((wc[iw + 1], a), layer_cost(info, wc[iw + 1], a, kind) - base, 0))
    if ia + 1 < len(ac):
        opts.append(((w, ac[ia + 1]), layer_cost(info, w, ac[ia + 1], kind) - base, 1))
    opts = [o for o in opts if 0 < o[1] <= room]
    if not opts:
        return None
    best = max(opts, key=lambda o: (o[1], -o[2]))
    return best[0], best[1]


def _greedy(start: Bits, infos: Mapping[str, LayerInfo], budget: Budget, wc: list[int],
            ac: list[int], searchable: Sequence[str], order: Sequence[str] | None,
            tol: float) -> Bits | None:
    kind, hi = budget.kind, budget.value
    lo = (1 - tol) * hi
    cur = dict(start)
    names = [n for n in infos if n in set(searchable)]
    cost = policy_cost(infos, cur, kind)
    # 1. lower, in rounds, until at or under the budget
    while cost > hi:
        progressed = False
        for n in _priority(names, cur, infos, kind, order):
            step = _down_step(n, cur, infos[n], wc, ac, kind)
            if step is None:
                continue
            cur[n] = step[0]
            cost -= step[1]
            progressed = True
            if cost <= hi:
                break
        if not progressed:
            return None
        cost = policy_cost(infos, cur, kind)  # no drift from the running sums
    # 2. raise without crossing the budget until inside the band
    while cost < lo:
        room = hi - cost
        if order is not None:
            progressed = False
            for n in _priority(names, cur, infos, kind, order):
                step = _up_step(n, cur, infos[n], wc, ac, kind, hi - cost)
                if step is None:
                    continue
                cur[n] = step[0]
                cost += step[1]
                progressed = True
                if cost >= lo:
                    break
            if not progressed:
                return None
        else:
            best: tuple[str, tuple[int, int], float] | None = None
            for n in names:
                step = _up_step(n, cur, infos[n], wc, ac, kind, room)
                if step is not None and (best is None or step[1] > best[2]):
                    best = (n, step[0], step[1])
            if best is None:
                return None
            cur[best[0]] = best[1]
            cost += best[2]
        cost = policy_cost(infos, cur, kind)
    return cur if lo <= cost <= hi else None


# ----------------------------------------------------------------------------------------------
# exact fallback: multiple-choice integer program
# ----------------------------------------------------------------------------------------------
def solve_choices(costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]],
                  lo: float, hi: float, *, time_limit: float = 60.0) -> list[int] | None:
    """Pick one choice per group minimising ``sum scores`` subject to ``lo <= sum costs <= hi``.

    ``costs[g][k]`` and ``scores[g][k]`` are those of choice ``k`` of group ``g``. Solved exactly
    with ``scipy.optimize.milp`` (HiGHS), one binary per choice, a one-hot row per group and one
    budget row, costs scaled to the budget. The pick is checked in exact arithmetic; if the
    solver's tolerance carried it out of the band, the band is shrunk by a relative 1e-7 and the
    program solved again. Returns the chosen indices, or None when no assignment meets the
    band.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(c) for c in costs]
    if not sizes or min(sizes) == 0 or [len(s) for s in scores] != sizes:
        raise ValueError("costs and scores need the same non-empty choices per group")
    scale = max(abs(hi), abs(lo), 1e-300)
    flat_c = np.array([c for g in costs for c in g], dtype=float) / scale
    flat_s = np.array([s for g in scores for s in g], dtype=float)
    smax = float(np.abs(flat_s).max()) if flat_s.size else 0.0
    if smax > 0:
        flat_s = flat_s / smax
    n = flat_c.size
    rows = np.zeros((len(sizes), n))
    k = 0
    for g, m in enumerate(sizes):
        rows[g, k:k + m] = 1.0
        k += m
    for eps in (0.0, min(1e-7, (hi - lo) / scale / 4)):
        cons = [LinearConstraint(rows, 1.0, 1.0),
                LinearConstraint(flat_c[None, :], lo / scale + eps, hi / scale - eps)]
        res = milp(flat_s, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
                   options={"disp": False, "time_limit": time_limit, "mip_rel_gap": 1e-9})
        if res.x is None or res.status not in (0, 1):
            return None
        x = np.round(res.x).astype(int)
        out, k = [], 0
        for m in sizes:
            seg = x[k:k + m]
            if seg.sum() != 1:
                break
            out.append(int(seg.argmax()))
            k += m
        else:
            total = sum(costs[g][i] for g, i in enumerate(out))
            if lo <= total <= hi:
                return out
        # the solver's tolerance carried the rounded pick out of the band: shrink it and retry
    return None


def _choices(wc: list[int], ac: list[int]) -> list[tuple[int, int]]:
    return [(w, a) for w in wc for a in ac]


def _milp_repair(start: Bits, infos: Mapping[str, LayerInfo], budget: Budget, wc: list[int],
                 ac: list[int], searchable: Sequence[str], order: Sequence[str] | None,
                 tol: float) -> Bits | None:
    kind, hi = budget.kind, budget.value
    lo = (1 - tol) * hi
    s = set(searchable)
    names = [n for n in infos if n in s]
    fixed_cost = sum(layer_cost(infos[n], *start[n], kind) for n in infos if n not in s)
    rank = {n: i for i, n in enumerate(dict.fromkeys(order or []))}
    choices = _choices(wc, ac)
    costs, scores = [], []
    for n in names:
        w0, a0 = start[n]
        weight = 1.0 + rank.get(n, len(rank) + names.index(n)) / max(1, len(names) + len(rank))
        costs.append([layer_cost(infos[n], w, a, kind) for w, a in choices])
        scores.append([weight * (abs(wc.index(w) - wc.index(w0)) + abs(ac.index(a) - ac.index(a0)))
                       for w, a in choices])
    if not names:
        return None
    pick = solve_choices(costs, scores, lo - fixed_cost, hi - fixed_cost)
    if pick is None:
        return None
    out = dict(start)
    for n, k in zip(names, pick):
        out[n] = choices[k]
    cost = policy_cost(infos, out, kind)
    return out if lo <= cost <= hi else None


def _closest(infos: Mapping[str, LayerInfo], budget: Budget, wc: list[int], ac: list[int],
             searchable: Sequence[str], fixed: Mapping[str, tuple[int, int]], *, below: bool,
             tol: float) -> float | None:
    """The achievable cost nearest to the band from below (or above), for error messages."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    kind, hi = budget.kind, budget.value
    lo = (1 - tol) * hi
    s = set(searchable)
    names = [n for n in infos if n in s]
    base = policy_cost(infos, _extreme(infos, searchable, fixed, wc[0], ac[0]), kind) - sum(
        layer_cost(infos[n], wc[0], ac[0], kind) for n in names)
    choices = _choices(wc, ac)
    c = np.array([layer_cost(infos[n], w, a, kind) for n in names for w, a in choices]) / hi
    m = len(choices)
    rows = np.zeros((len(names), c.size))
    for g in range(len(names)):
        rows[g, g * m:(g + 1) * m] = 1
    band = (-np.inf, (lo - base) / hi) if below else ((hi - base) / hi, np.inf)
    res = milp(-c if below else c, integrality=np.ones(c.size), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(rows, 1, 1), LinearConstraint(c[None, :], *band)],
               options={"disp": False, "time_limit": 30})
    if res.x is None:
        return None
    return base + float(c @ np.round(res.x)) * hi
