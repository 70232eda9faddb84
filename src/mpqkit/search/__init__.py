"""Policy search: the supernet, the shared loop, the methods, budget feasibility and repair.

``search(SearchConfig(...))`` runs one method (``asga``, ``edmips``, ``gmpq``, ``seam``, and the
methods other modules register, e.g. ``hawq``) and returns a :class:`SearchResult` whose
``policy`` lands in ``[0.98, 1.0] x`` the budget. Budgets and costs (``Budget``,
``parse_budget``, ``policy_cost``) live in :mod:`mpqkit.complexity`.
"""

from mpqkit.search.baselines import random_bits, uniform_bits
from mpqkit.search.budget import achievable_range, check_feasible, repair
from mpqkit.search.hawq import hawq_search, hutchinson_trace
from mpqkit.search.loop import (
    DualLambda,
    MethodResult,
    SearchConfig,
    SearchContext,
    SearchResult,
    SupernetMethod,
    SupernetSearch,
    available_methods,
    build_context,
    get_method,
    load_search_config,
    register_method,
    search,
)
from mpqkit.search.supernet import (
    MixedConv2d,
    MixedLinear,
    MixedQuantMixin,
    Supernet,
    build_supernet,
    mix_quantized,
)

__all__ = [
    "DualLambda", "MethodResult", "MixedConv2d", "MixedLinear", "MixedQuantMixin",
    "SearchConfig", "SearchContext", "SearchResult", "Supernet", "SupernetMethod",
    "SupernetSearch", "build_context",
    "achievable_range", "available_methods", "build_supernet", "check_feasible", "get_method",
    "hawq_search", "hutchinson_trace", "load_search_config", "mix_quantized", "random_bits",
    "register_method", "repair", "search", "uniform_bits",
]
