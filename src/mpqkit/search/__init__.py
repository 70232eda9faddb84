"""Policy search: the supernet, the shared loop, the method registry, budget feasibility and repair.

``search(SearchConfig(...))`` runs one registered method (``asga``, ``edmips``, ``gmpq``,
``seam``, ``hawq``, ``uniform``, ``random``: one module each in :mod:`mpqkit.search.methods`)
and returns a :class:`SearchResult` whose ``policy`` lands in ``[0.98, 1.0] x`` the budget.
Budgets and costs (``Budget``, ``parse_budget``, ``policy_cost``) live in
:mod:`mpqkit.complexity`.
"""

from mpqkit.search.budget import achievable_range, check_feasible, repair
from mpqkit.search.config import SearchConfig, load_search_config
from mpqkit.search.context import (
    MethodResult,
    Provenance,
    SearchContext,
    SearchResult,
    SupernetMethod,
    build_context,
)
from mpqkit.search.loop import DualLambda, SupernetSearch, search
from mpqkit.search.methods.hawq import hawq_search, hutchinson_trace
from mpqkit.search.methods.random import random_bits
from mpqkit.search.methods.uniform import uniform_bits
from mpqkit.search.registry import (
    MethodSpec,
    available_methods,
    get_method,
    method_specs,
    register_method,
)
from mpqkit.search.supernet import (
    MixedConv2d,
    MixedLinear,
    MixedQuantMixin,
    Supernet,
    build_supernet,
    mix_quantized,
    rate_policy,
)

__all__ = [
    "DualLambda", "MethodResult", "MethodSpec", "MixedConv2d", "MixedLinear", "MixedQuantMixin",
    "Provenance", "SearchConfig", "SearchContext", "SearchResult", "Supernet", "SupernetMethod",
    "SupernetSearch", "achievable_range", "available_methods", "build_context",
    "build_supernet", "check_feasible", "get_method", "hawq_search", "hutchinson_trace",
    "load_search_config", "method_specs", "mix_quantized", "random_bits", "rate_policy",
    "register_method", "repair", "search", "uniform_bits",
]
