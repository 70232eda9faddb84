"""What a search method gets and gives back.

* :class:`SearchContext`: the FP model (weights loaded), the proxy data, the layer infos, the
  searchable and fixed layers, the candidates, the checked budget and the run folder, built by
  :func:`build_context`;
* :class:`SupernetMethod`: the base of the methods the shared supernet loop trains (a method
  adds an optimizer choice, a loss term, a setup);
* :class:`MethodResult`: what a policy method (no supernet) returns;
* :class:`Provenance`: the record of how a policy was searched, stored in ``policy.json`` and
  read back by ``mpqkit report``;
* :class:`SearchResult`: what :func:`mpqkit.search.search` returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpqkit.complexity import (
    Budget,
    LayerInfo,
    normalize_input_size,
    parse_budget,
    policy_cost,
    profile_model,
)
from mpqkit.data import DataBundle, DataConfig, build_data, make_loader
from mpqkit.engine.config import to_dict
from mpqkit.engine.distributed import resolve_device
from mpqkit.engine.trainer import load_weights
from mpqkit.models import build_model
from mpqkit.policy import Policy, first_last_bits, first_last_layers
from mpqkit.search.budget import check_feasible, repair
from mpqkit.search.config import SearchConfig
from mpqkit.search.supernet import Supernet

Bits = dict[str, tuple[int, int]]


@dataclass
class SearchContext:
    """What a method gets: model, data, layers, candidates, budget and the run folder."""

    cfg: SearchConfig
    model: nn.Module  # full precision, weights loaded (if any), on ``device``
    data: DataBundle
    device: torch.device
    input_size: tuple[int, int]  # deployment resolution of the complexity
    infos: dict[str, LayerInfo]
    searchable: list[str]
    fixed_bits: dict[str, tuple[int, int]]
    w_candidates: tuple[int, ...]
    a_candidates: tuple[int, ...]
    budget: Budget
    run_dir: Path
    weights_init: str
    num_classes: int

    @property
    def options(self) -> Any:
        """The method's own config (a dataclass of :mod:`mpqkit.search.methods`)."""
        return self.cfg.method_options()

    def batches(self, n: int, batch_size: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """The first ``n`` proxy training batches of epoch 0 (deterministic), on the device."""
        loader = make_loader(self.data.train, batch_size or self.cfg.data.batch_size, train=True,
                             seed=self.cfg.seed, epoch=0, workers=self.cfg.data.workers)
        out = []
        for i, (x, y) in enumerate(loader):
            if i >= n:
                break
            out.append((x.to(self.device), y.to(self.device)))
        return out

    def policy(self, bits: Mapping[str, tuple[int, int]],
               provenance: Mapping[str, Any] | None = None) -> Policy:
        """A :class:`Policy` of ``bits`` with this search's conventions and budget."""
        return Policy.from_bits(self.model, bits, self.input_size, model_name=self.cfg.model,
                                first_last=self.cfg.first_last, fixed=list(self.fixed_bits),
                                w_candidates=self.w_candidates, a_candidates=self.a_candidates,
                                provenance=provenance, budget=self.budget.to_dict(),
                                infos=self.infos)

    def repair(self, bits: Mapping[str, tuple[int, int]],
               order: list[str] | None = None) -> tuple[Bits, dict[str, Any]]:
        """``bits`` moved into the budget band, and the record of what the repair changed."""
        fixed = {n: tuple(self.fixed_bits[n]) for n in self.fixed_bits}
        start = {n: (fixed[n] if n in fixed else tuple(bits[n])) for n in self.infos}
        out = repair(start, self.infos, self.budget, self.w_candidates, self.a_candidates,
                     self.searchable, order=order, tol=self.cfg.tol)
        final = {n: (int(w), int(a)) for n, (w, a) in out.items()}
        kind = self.budget.kind
        return final, {"changed_layers": [n for n in self.infos if final[n] != start[n]],
                       "cost_before": policy_cost(self.infos, start, kind),
                       "cost_after": policy_cost(self.infos, final, kind)}


def build_context(cfg: SearchConfig, run_dir: str | Path, *,
                  bilevel_split: bool = True) -> SearchContext:
    """Proxy data, model (FP weights loaded if any), layer infos and the checked budget.

    Raises :class:`~mpqkit.errors.BudgetError` (with the achievable range) for a budget no
    policy can meet, before any training.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data_cfg = cfg.data
    if cfg.bilevel and bilevel_split and not data_cfg.val_split:
        data_cfg = DataConfig(**{**to_dict(data_cfg), "val_split": cfg.val_fraction})
    data = build_data(data_cfg)
    num_classes = cfg.num_classes or data.num_classes
    model = build_model(cfg.model, num_classes=num_classes)
    weights_init = load_weights(model, cfg.weights, cfg.model, data.name)
    input_size = normalize_input_size(cfg.input_size or data.input_size)
    infos = profile_model(model, input_size)
    fb = first_last_bits(cfg.first_last)
    fixed_bits = {n: fb for n in first_last_layers(infos)} if fb is not None else {}
    searchable = [n for n in infos if n not in fixed_bits]
    wc, ac = tuple(cfg.w_bits), tuple(cfg.a_bits)
    budget = parse_budget(bitops=cfg.budget_bitops, uniform=cfg.budget,
                          size_mb=cfg.budget_size_mb, bits=cfg.budget_bits, infos=infos,
                          fixed_bits=fixed_bits, searchable=searchable)
    check_feasible(budget, infos, searchable, fixed_bits, wc, ac, cfg.tol)
    model.to(device)
    return SearchContext(cfg, model, data, device, input_size, infos, searchable, fixed_bits,
                         wc, ac, budget, Path(run_dir), weights_init, num_classes)


class SupernetMethod:
    """A differentiable search on the shared supernet: subclasses add a loss term or a setup.

    ``sharpness`` names the sharpness-aware wrapper the method needs (``"asga"``), or None to
    use ``cfg.optim`` as configured. :meth:`loss` returns ``(loss, logits, extras)``: the task
    loss plus the method's terms (the complexity penalty is added by the loop), the logits for
    accuracy, and scalar extras for the logs (``task_loss``, ``extra_loss``).
    """

    name = ""
    sharpness: str | None = None

    def setup(self, ctx: SearchContext, supernet: Supernet) -> dict[str, Any]:
        """Prepare (e.g. a teacher); returns the method's provenance entries."""
        return {}

    def param_group_options(self, ctx: SearchContext) -> dict[str, Any]:
        """Extra keys of the logits' param group (e.g. ``perturb``)."""
        return {}

    def loss(self, ctx: SearchContext, supernet: Supernet, x: Tensor,
             y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        logits = supernet(x)
        loss = F.cross_entropy(logits, y)
        return loss, logits, {"task_loss": float(loss.detach())}

    def counters(self) -> dict[str, int]:
        """Extra cost of the method (e.g. teacher forwards), for the search cost record."""
        return {}

    def load_counters(self, state: Mapping[str, int]) -> None:
        """Restore :meth:`counters` on resume."""


@dataclass
class MethodResult:
    """What a policy method returns.

    ``repair=False`` exempts the bits from the move into the budget band (e.g. the uniform
    baseline, which need not come within the band); they are recorded as they are.
    """

    bits: dict[str, tuple[int, int]]
    provenance: dict[str, Any] = field(default_factory=dict)
    repair: bool = True


@dataclass
class Provenance:
    """How a policy was searched (``policy.json``'s ``provenance``).

    ``argmax_bits`` is the policy the search chose before the budget repair and ``repair`` what
    the repair changed; ``details`` holds the method's own record (e.g. GMPQ's teacher).
    """

    method: str
    proxy_data: str = ""
    dataset: str = ""
    subset: float | int | None = None
    seed: int = 0
    weights_init: str = "random"
    budget: dict[str, Any] | None = None
    first_last: str = "8bit"
    quant: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""
    wall_time_s: float | None = None
    epochs: int | None = None
    steps: int | None = None
    level: str | None = None
    search_cost: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    dual: dict[str, Any] | None = None
    decidedness_mean: float | None = None
    argmax_bits: dict[str, list[int]] | None = None
    repair: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, ctx: SearchContext, **kw: Any) -> Provenance:
        """The record every search shares, plus ``kw``."""
        cfg = ctx.cfg
        return cls(cfg.method, ctx.data.description, ctx.data.name, cfg.data.subset, cfg.seed,
                   ctx.weights_init, ctx.budget.to_dict(), cfg.first_last, to_dict(cfg.quant),
                   str(ctx.run_dir), **kw)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON: the known fields (unset ones left out), then the method's details."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "details" and getattr(self, f.name) not in (None, {}, "")}
        d.update({k: v for k, v in self.details.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        """Read a policy's provenance (also of mpqkit 0.1 and hand-written policies)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"details"}
        known = {k: v for k, v in d.items() if k in names}
        known.setdefault("method", "manual")
        if "wall_time_s" not in known and isinstance(d.get("seconds"), int | float):
            known["wall_time_s"] = d["seconds"]
        if "dataset" not in known and "data" in d:
            known["dataset"] = str(d["data"])
        return cls(**known, details={k: v for k, v in d.items() if k not in names})

    @property
    def images_processed(self) -> int | None:
        v = self.search_cost.get("images_processed", self.details.get("images_processed"))
        return int(v) if isinstance(v, int | float) else None

    @property
    def repaired_layers(self) -> list[str]:
        return list(self.repair.get("changed_layers", []))


@dataclass
class SearchResult:
    """What a search produced."""

    policy: Policy
    run_dir: Path
    method: str
    budget: Budget
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    argmax_bits: dict[str, tuple[int, int]] | None = None
    repaired_layers: list[str] = field(default_factory=list)

    def summary(self) -> str:
        cost = policy_cost(self.policy.layer_infos(), self.policy.bits(), self.budget.kind)
        return (f"{self.method}: {self.policy.describe()}; {self.budget.format(cost)} = "
                f"{cost / self.budget.value:.2%} of budget {self.budget.describe()}; "
                f"{len(self.repaired_layers)} layer(s) repaired; {self.seconds:.0f}s")
