"""The layer table of a model: names, MACs, parameters, and the bits and BitOps of a policy."""

from __future__ import annotations

from typing import Any

from mpqkit.complexity import compute_complexity, profile_model
from mpqkit.models import build_model, default_input_size
from mpqkit.policy import Policy, parse_uniform

CONVENTIONS = ("conventions: MACs of Conv2d/Linear layers for one image at the stated input size; "
               "BitOps = sum MACs x w_bits x a_bits over layers with both sides quantized; "
               "size = weights at their bits (biases, BatchNorm excluded), 1 MB = 10^6 bytes")


def model_info(model: str, num_classes: int | None = None, input_size: int | None = None,
               policy: str | None = None, first_last: str = "8bit") -> dict[str, Any]:
    """Per-layer and total complexity of ``model`` at ``input_size`` (JSON-friendly dict).

    ``policy`` (a policy.json path or a uniform spec such as ``w4a4``) adds per-layer bits,
    BitOps, size and average bits.
    """
    num_classes = num_classes or (1000 if default_input_size(model) == 224 else 10)
    size = input_size or default_input_size(model)
    net = build_model(model, num_classes=num_classes)
    infos = profile_model(net, size)
    rows: list[dict[str, Any]] = [
        {"name": i.name, "kind": i.kind, "macs": i.macs, "params": i.params,
         "in_shape": list(i.in_shape), "out_shape": list(i.out_shape)} for i in infos.values()]
    totals: dict[str, Any] = {"macs": sum(i.macs for i in infos.values()),
                              "params": sum(i.params for i in infos.values())}
    if policy:
        if policy.endswith(".json"):
            pol = Policy.load(policy).retarget(net, size, model)
        else:
            w, a = parse_uniform(policy)
            pol = Policy.uniform(net, w, a, size, first_last=first_last, model_name=model)
        bits = pol.bits()
        for r in rows:
            wb, ab = bits[r["name"]]
            r.update(w_bits=wb, a_bits=ab, bitops=r["macs"] * wb * ab if max(wb, ab) < 32 else 0)
        totals.update(compute_complexity(infos, bits, (size, size)).to_dict())
    return {"model": model, "num_classes": num_classes, "input_size": [size, size],
            "layers": rows, "totals": totals, "conventions": CONVENTIONS}
