"""The mixed-precision policy: per-layer bits keyed by fully-qualified module name.

A policy is a versioned JSON document::

    {
      "format": "mpqkit.policy", "version": 1,
      "model": "resnet20", "input_size": [32, 32], "first_last": "8bit",
      "candidates": {"w_bits": [2, 3, 4, 6], "a_bits": [2, 3, 4, 6]},
      "layers": {"conv1": {"w_bits": 8, "a_bits": 8, "macs": 442368, "params": 432,
                           "kind": "conv", "fixed": true}, ...},
      "complexity": {"bitops": ..., "size_mb": ..., ...},
      "budget": {"kind": "bitops", "value": 1.2e9, "spec": "w4a4"} | null,
      "provenance": {"tool": "mpqkit 0.1.0", "method": "manual", "created": "...", ...}
    }

Layers are matched by name, never by position: :meth:`Policy.validate` lists every layer the
model has that the policy lacks, and every policy layer the model does not have.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mpqkit.complexity import (
    Complexity,
    LayerInfo,
    compute_complexity,
    normalize_input_size,
    profile_model,
)
from mpqkit.errors import ConfigError, PolicyError
from mpqkit.quant.layers import quantizable_layers
from mpqkit.quant.quantizers import FULL_PRECISION, SUPPORTED_BITS

FORMAT = "mpqkit.policy"
VERSION = 1
FIRST_LAST_MODES = ("8bit", "fp", "search")
DEFAULT_CANDIDATES = (2, 3, 4, 6)


def _version() -> str:
    from mpqkit import __version__

    return __version__


@dataclass
class LayerPolicy:
    """Bits of one layer, and its cost at the policy's input size."""

    w_bits: int
    a_bits: int
    macs: int = 0
    params: int = 0
    kind: str = "conv"
    fixed: bool = False  # not searched (first/last layer by default)

    def to_dict(self) -> dict[str, Any]:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "macs": self.macs,
                "params": self.params, "kind": self.kind, "fixed": self.fixed}


def _check_layer_bits(name: str, w: Any, a: Any) -> tuple[int, int]:
    out = []
    for what, b in (("w_bits", w), ("a_bits", a)):
        if isinstance(b, bool) or not isinstance(b, int) or b not in SUPPORTED_BITS:
            raise PolicyError(f"layer {name!r} has {what}={b!r}, outside the supported range: use "
                              "2..8, or 32 for full precision")
        out.append(b)
    return out[0], out[1]


def parse_uniform(spec: str) -> tuple[int, int]:
    """``"w4a4"`` -> ``(4, 4)``; ``"w8a32"`` allowed. Raises a one-line error otherwise."""
    m = re.fullmatch(r"\s*w(\d+)a(\d+)\s*", str(spec).lower())
    if not m:
        raise ConfigError(f"cannot read the uniform policy {spec!r}: write it as wWaA, e.g. w4a4")
    w, a = int(m.group(1)), int(m.group(2))
    _check_layer_bits(spec, w, a)
    return w, a


@dataclass
class Policy:
    """Per-layer bit-widths plus everything needed to interpret and reproduce them."""

    layers: dict[str, LayerPolicy]
    input_size: tuple[int, int] = (32, 32)
    model: str = ""
    first_last: str = "8bit"
    w_candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    a_candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    budget: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_bits(cls, model: nn.Module, bits: Mapping[str, tuple[int, int]],
                  input_size: int | tuple[int, int], *, model_name: str = "",
                  first_last: str = "8bit", fixed: Iterable[str] = (),
                  w_candidates: Iterable[int] = DEFAULT_CANDIDATES,
                  a_candidates: Iterable[int] = DEFAULT_CANDIDATES,
                  provenance: Mapping[str, Any] | None = None,
                  budget: Mapping[str, Any] | None = None,
                  infos: Mapping[str, LayerInfo] | None = None) -> Policy:
        """A policy for ``model`` from explicit per-layer ``(w_bits, a_bits)``."""
        hw = normalize_input_size(input_size)
        infos = infos if infos is not None else profile_model(model, hw)
        missing = [n for n in infos if n not in bits]
        extra = [n for n in bits if n not in infos]
        if missing or extra:
            raise PolicyError(_mismatch_message(missing, extra))
        fixed = set(fixed)
        layers = {}
        for name, info in infos.items():
            w, a = _check_layer_bits(name, *bits[name])
            layers[name] = LayerPolicy(w, a, info.macs, info.params, info.kind, name in fixed)
        prov = {"tool": f"mpqkit {_version()}", "method": "manual",
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        prov.update(provenance or {})
        return cls(layers=layers, input_size=hw, model=model_name, first_last=first_last,
                   w_candidates=tuple(sorted(set(w_candidates))),
                   a_candidates=tuple(sorted(set(a_candidates))),
                   budget=dict(budget) if budget else None, provenance=prov)

    @classmethod
    def uniform(cls, model: nn.Module, w_bits: int, a_bits: int,
                input_size: int | tuple[int, int], *, first_last: str = "8bit",
                model_name: str = "", provenance: Mapping[str, Any] | None = None) -> Policy:
        """Every layer at ``w_bits``/``a_bits``; first conv and last linear per ``first_last``.

        ``first_last``: ``"8bit"`` (8/8, counted in BitOps; default), ``"fp"`` (full precision,
        left out of BitOps, as in EdMIPS/GMPQ) or ``"search"`` (treated like any other layer).
        """
        infos = profile_model(model, input_size)
        fixed_bits = first_last_bits(first_last)
        ends = first_last_layers(infos) if fixed_bits else []
        bits = {n: (fixed_bits if n in ends and fixed_bits else (w_bits, a_bits)) for n in infos}
        prov = {"method": "uniform", "spec": f"w{w_bits}a{a_bits}"}
        prov.update(provenance or {})
        return cls.from_bits(model, bits, input_size, model_name=model_name,
                             first_last=first_last, fixed=ends, provenance=prov, infos=infos)

    # -- queries --------------------------------------------------------------------------------
    def bits(self) -> dict[str, tuple[int, int]]:
        return {n: (lp.w_bits, lp.a_bits) for n, lp in self.layers.items()}

    def searchable(self) -> list[str]:
        return [n for n, lp in self.layers.items() if not lp.fixed]

    def layer_infos(self) -> dict[str, LayerInfo]:
        return {n: LayerInfo(n, lp.kind, lp.macs, lp.params, (), ()) for n, lp in
                self.layers.items()}

    def complexity(self) -> Complexity:
        """BitOps, size and average bits at the policy's input size."""
        return compute_complexity(self.layer_infos(), self.bits(), self.input_size)

    def describe(self) -> str:
        """A one-line summary, e.g. for logs."""
        c = self.complexity()
        return (f"{len(self.layers)} layers, BitOps {c.bitops / 1e9:.4f}G at "
                f"{c.input_size[0]}x{c.input_size[1]}, size {c.size_mb:.4f} MB, "
                f"avg bits w{c.avg_w_bits:.2f}/a{c.avg_a_bits:.2f}")

    # -- checks ---------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise a one-line :class:`PolicyError` naming every missing and extra layer."""
        names = list(quantizable_layers(model))
        missing = [n for n in names if n not in self.layers]
        extra = [n for n in self.layers if n not in names]
        if missing or extra:
            raise PolicyError(_mismatch_message(missing, extra))
        for n, lp in self.layers.items():
            _check_layer_bits(n, lp.w_bits, lp.a_bits)

    def retarget(self, model: nn.Module, input_size: int | tuple[int, int],
                 model_name: str = "") -> Policy:
        """The same bits on ``model`` (matched by name), with complexity at ``input_size``."""
        self.validate(model)
        infos = profile_model(model, input_size)
        prov = dict(self.provenance)
        prov["transferred_from"] = {"model": self.model, "input_size": list(self.input_size)}
        return Policy.from_bits(model, self.bits(), input_size, model_name=model_name or
                                self.model, first_last=self.first_last,
                                fixed=[n for n, lp in self.layers.items() if lp.fixed],
                                w_candidates=self.w_candidates, a_candidates=self.a_candidates,
                                provenance=prov, budget=self.budget, infos=infos)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": self.version, "model": self.model,
            "input_size": list(self.input_size), "first_last": self.first_last,
            "candidates": {"w_bits": list(self.w_candidates), "a_bits": list(self.a_candidates)},
            "layers": {n: lp.to_dict() for n, lp in self.layers.items()},
            "complexity": self.complexity().to_dict(),
            "budget": self.budget, "provenance": self.provenance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        from mpqkit.runio import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "policy") -> Policy:
        if not isinstance(d, Mapping):
            raise PolicyError(f"{source} is not a JSON object: write a policy as "
                              '{"format": "mpqkit.policy", "version": 1, "layers": {...}}')
        if d.get("format", FORMAT) != FORMAT:
            raise PolicyError(f"{source} has format {d.get('format')!r}, not {FORMAT!r}: "
                              "pass an mpqkit policy file")
        version = d.get("version", VERSION)
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise PolicyError(f"{source} has policy version {version!r}; this mpqkit reads "
                              f"version 1..{VERSION}: upgrade mpqkit or re-create the policy")
        raw = d.get("layers")
        if not isinstance(raw, Mapping) or not raw:
            raise PolicyError(f"{source} has no 'layers' object: add "
                              '"layers": {"<module name>": {"w_bits": 4, "a_bits": 4}, ...}')
        layers = {}
        for name, v in raw.items():
            if not isinstance(v, Mapping) or "w_bits" not in v or "a_bits" not in v:
                raise PolicyError(f"{source}: layer {name!r} needs both 'w_bits' and 'a_bits'")
            w, a = _check_layer_bits(name, v["w_bits"], v["a_bits"])
            layers[name] = LayerPolicy(w, a, int(v.get("macs", 0)), int(v.get("params", 0)),
                                       str(v.get("kind", "conv")), bool(v.get("fixed", False)))
        cand = d.get("candidates") or {}
        first_last = str(d.get("first_last", "8bit"))
        if first_last not in FIRST_LAST_MODES:
            raise PolicyError(f"{source}: first_last={first_last!r} is unknown: use one of "
                              f"{', '.join(FIRST_LAST_MODES)}")
        try:
            hw = normalize_input_size(d.get("input_size", 32))
        except ConfigError as exc:
            raise PolicyError(f"{source}: {exc}") from None
        return cls(layers=layers, input_size=hw, model=str(d.get("model", "")),
                   first_last=first_last,
                   w_candidates=tuple(cand.get("w_bits", DEFAULT_CANDIDATES)),
                   a_candidates=tuple(cand.get("a_bits", DEFAULT_CANDIDATES)),
                   budget=d.get("budget"), provenance=dict(d.get("provenance") or {}),
                   version=version)

    @classmethod
    def from_json(cls, text: str, source: str = "policy") -> Policy:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}): fix the file or re-create it") from None
        return cls.from_dict(d, source)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file {path} does not exist: pass the path of a policy.json "
                              "(e.g. RUN_DIR/policy.json) or a uniform spec such as w4a4")
        return cls.from_json(path.read_text(), str(path))


def first_last_bits(first_last: str) -> tuple[int, int] | None:
    """Fixed bits of the first and last layer under a ``first_last`` mode (None: searched)."""
    if first_last == "8bit":
        return (8, 8)
    if first_last == "fp":
        return (FULL_PRECISION, FULL_PRECISION)
    if first_last == "search":
        return None
    raise ConfigError(f"first_last={first_last!r} is unknown: use one of "
                      f"{', '.join(FIRST_LAST_MODES)}")


def first_last_layers(infos: Mapping[str, LayerInfo]) -> list[str]:
    """Names of the first executed conv layer and the last executed linear (or last) layer."""
    executed = [n for n, i in infos.items() if i.calls > 0] or list(infos)
    first = next((n for n in executed if infos[n].kind == "conv"), executed[0])
    linears = [n for n in executed if infos[n].kind == "linear"]
    last = linears[-1] if linears else executed[-1]
    return [first] if first == last else [first, last]


def _mismatch_message(missing: list[str], extra: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} model layer(s) missing from the policy: "
                     f"{', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if extra:
        parts.append(f"{len(extra)} policy layer(s) not in the model: "
                     f"{', '.join(extra[:12])}{' ...' if len(extra) > 12 else ''}")
    return ("policy does not fit the model (" + "; ".join(parts) + "): use a policy made for this "
            "model, or re-create it with `mpqkit transfer`")
