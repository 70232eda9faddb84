"""Policy transfer: the bits searched on a proxy model, mapped by layer name onto a target model.

The proxy and the target must share the names of their quantized layers (e.g. the CIFAR-stem
``resnet18_cifar`` and torchvision's ``resnet18``); any missing or extra layer is refused with
the names. Complexity is recomputed at the target's input size.

The budget a policy was searched under is stated on the proxy. On the target it is re-evaluated
by :func:`mpqkit.complexity.retarget_budget` as the same *uniform-equivalent* budget: a ``w3a3``
budget becomes the BitOps of uniform w3a3 on the target (fixed layers at their fixed bits) at
the target's input size. An absolute budget ``B`` becomes its average bit product over the
searchable layers, ``p = (B - fixed BitOps) / searchable MACs`` on the proxy, then ``fixed BitOps
+ p * searchable MACs`` on the target (``p = 9`` for a w3a3 budget, so both rules agree). A size
budget likewise becomes average bits per searchable weight. The budget *holds* when the
transferred policy does not exceed that figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpqkit.complexity import Budget, format_cost, retarget_budget
from mpqkit.errors import BudgetError, PolicyError
from mpqkit.models import build_model, default_input_size
from mpqkit.policy import Policy
from mpqkit.quant.layers import quantizable_layers


def _fixed_bits(policy: Policy) -> dict[str, tuple[int, int]]:
    return {n: (lp.w_bits, lp.a_bits) for n, lp in policy.layers.items() if lp.fixed}


def _names(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit})" if len(names) > limit
                                       else "")


def transfer_policy(policy: Policy | str | Path, model_name: str, num_classes: int | None = None,
                    input_size: int | tuple[int, int] | None = None, *,
                    budget_check: bool = False, out: str | Path | None = None
                    ) -> tuple[Policy, dict[str, Any]]:
    """Map ``policy`` onto ``model_name`` by layer name; re-check its budget on the target.

    Returns the target policy (complexity at ``input_size``, default the model's native size;
    its ``budget`` re-evaluated on the target, the proxy's value kept as ``proxy_value``) and a
    JSON-friendly report: layers, complexity on proxy and target, the budget on both, and
    whether it ``holds``. Raises :class:`PolicyError` naming every missing and extra layer, and
    with ``budget_check`` a :class:`BudgetError` when the budget does not hold. ``out``: save
    the target policy there (not when the check fails).
    """
    src = policy if isinstance(policy, Policy) else Policy.load(policy)
    num_classes = num_classes or (1000 if default_input_size(model_name) == 224 else 10)
    model = build_model(model_name, num_classes=num_classes)
    _check_names(src, model, model_name)
    target, report = _retarget(src, model, model_name, num_classes,
                               input_size or default_input_size(model_name))
    if budget_check and report["holds"] is False:
        raise BudgetError(f"{report['message']}: lower the proxy budget and search again, or "
                          "drop --budget-check to write the policy anyway")
    if out:
        target.save(out)
        report["out"] = str(out)
    return target, report


def _check_names(src: Policy, model: Any, model_name: str) -> None:
    names = list(quantizable_layers(model))
    missing = [n for n in names if n not in src.layers]
    extra = [n for n in src.layers if n not in set(names)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {model_name} layer(s) missing from the policy: "
                         f"{_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} policy layer(s) not in {model_name}: {_names(extra)}")
        raise PolicyError(f"cannot transfer the {src.model or 'given'} policy to {model_name}, "
                          f"the quantized layer names differ ({'; '.join(parts)}): transfer "
                          "between models that share layer names, e.g. resnet18_cifar -> "
                          "resnet18")


def _retarget(src: Policy, model: Any, model_name: str, num_classes: int,
              size: int | tuple[int, int]) -> tuple[Policy, dict[str, Any]]:
    target = src.retarget(model, size, model_name)
    target.provenance["transferred_to"] = {"model": model_name, "num_classes": num_classes,
                                           "input_size": list(target.input_size)}
    pc, tc = src.complexity(), target.complexity()
    h, w = target.input_size
    report: dict[str, Any] = {
        "source_model": src.model, "target_model": model_name, "num_classes": num_classes,
        "source_input_size": list(src.input_size), "input_size": [h, w],
        "layers": len(target.layers), "source_complexity": pc.to_dict(),
        "complexity": tc.to_dict(), "budget": None, "holds": None,
    }
    if not src.budget:
        report["message"] = (f"{model_name} at {h}x{w}: BitOps {tc.bitops / 1e9:.4f}G, size "
                             f"{tc.size_mb:.4f} MB; the policy records no budget to check")
        return target, report
    budget = Budget.from_dict(src.budget)
    value, rule = retarget_budget(budget, src.layer_infos(), _fixed_bits(src),
                                  target.layer_infos(), _fixed_bits(target),
                                  target.input_size)
    achieved = float(tc.bitops) if budget.kind == "bitops" else float(tc.size_mb)
    holds = achieved <= value * (1 + 1e-9)
    # the proxy's figures, for reference
    proxy_achieved = float(pc.bitops) if budget.kind == "bitops" else float(pc.size_mb)
    report["budget"] = {"kind": budget.kind, "spec": budget.spec, "proxy_value": budget.value,
                        "proxy_achieved": proxy_achieved, "target_value": value,
                        "target_achieved": achieved, "ratio": achieved / value if value else
                        float("inf"), "rule": rule}
    report["holds"] = holds
    report["message"] = (f"budget {budget.spec} {'holds' if holds else 'does not hold'} on "
                         f"{model_name} at {h}x{w}: {format_cost(achieved, budget.kind)} "
                         f"{'<=' if holds else '>'} {format_cost(value, budget.kind)} ({rule})")
    target.budget = {"kind": budget.kind, "value": value, "spec": budget.spec,
                     "proxy_value": budget.value, "proxy_model": src.model,
                     "proxy_input_size": list(src.input_size)}
    return target, report

