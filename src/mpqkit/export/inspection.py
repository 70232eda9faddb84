"""What an exported file really holds: per-layer bits read from the file's own data.

For an ONNX file the bits come from the graph, not from the embedded policy: a layer is a
Conv/Gemm/MatMul node; its weight bits are the width of the signed symmetric range that the
stored integers span (``max |q| = 2^(b-1) - 1`` means b bits) and its container is the
initializer's type; its activation bits come from the ``Clip`` bounds after ``QuantizeLinear``
(or the quantized type's own range when there is no Clip). For a packed file the weight bits are
the field width the data section uses (bytes * 8 / values) and the stored values' range is
checked against it. Each layer is then compared with the embedded policy:

* ``ok``: the file's bits equal the policy's;
* ``narrower``: the stored weights span fewer bits than the policy allows (still within range,
  e.g. a trained step that never reaches the extreme integers);
* ``mismatch``: the file holds more bits than the policy says, a different activation range,
  or a float layer where the policy has a quantized one (or the reverse);
* ``not in policy``: the file has a layer the policy does not name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpqkit.errors import CheckpointError
from mpqkit.export import ExportError

FP = 32


def signed_bits(values: np.ndarray) -> int:
    """Bits of the smallest signed symmetric range holding ``values`` (at least 2)."""
    if values.size == 0:
        return 2
    m = int(np.abs(values.astype(np.int64)).max())
    return max(2, 1 + math.ceil(math.log2(m + 1)))


def range_bits(lo: int, hi: int) -> int:
    """Bits of an integer range: ``[0, 2^b-1]`` or ``[-2^(b-1), 2^(b-1)-1]`` -> b."""
    return max(1, math.ceil(math.log2(hi - lo + 1)))


def _status(w_file: int, a_file: int, pol: Mapping[str, Any] | None) -> str:
    if pol is None:
        return "not in policy"
    pw, pa = int(pol["w_bits"]), int(pol["a_bits"])
    if a_file != pa or (w_file == FP) != (pw == FP) or w_file > pw:
        return "mismatch"
    return "ok" if w_file == pw else "narrower"


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------
def _load_onnx(path: Path) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{path} is not a readable ONNX model ({str(exc).splitlines()[0][:100]})"
                          ": re-export it with mpqkit export") from None


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Per-layer bits of an ONNX file (see the module docstring)."""
    path = Path(path)
    model = _load_onnx(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    props = {p.key: p.value for p in model.metadata_props}
    policy = _onnx_policy(path, props)
    pol_layers = (policy or {}).get("layers", {})
    layers = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = _onnx_weight(node, producer, inits)
        if weight is None:
            continue  # a MatMul of two activations: not a layer
        rec: dict[str, Any] = {"name": node.name, "op": node.op_type, **weight,
                               **_onnx_activation(path, node, producer, inits)}
        pol = pol_layers.get(node.name)
        rec["policy_w_bits"] = pol["w_bits"] if pol else None
        rec["policy_a_bits"] = pol["a_bits"] if pol else None
        rec["status"] = _status(rec["w_bits"], rec["a_bits"], pol) if policy else "no policy"
        layers.append(rec)
    found = {r["name"] for r in layers}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return _summary(path, "onnx", layers, policy, [n for n in pol_layers if n not in found], {
        "opset": opset, "mpqkit_version": props.get("mpqkit.version"),
        "model": props.get("mpqkit.model"), "float": props.get("mpqkit.float") == "1",
        "int_types": props.get("mpqkit.int_types")})


def _onnx_policy(path: Path, props: Mapping[str, str]) -> Any:
    """The policy embedded in the ONNX metadata, or None."""
    if "mpqkit.policy" not in props:
        return None
    try:
        return json.loads(props["mpqkit.policy"])
    except json.JSONDecodeError:
        raise ExportError(f"{path}: the embedded policy is not valid JSON: re-export the "
                          "model") from None


def _arr(inits: Mapping[str, Any], name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name])


def _qtype_name(t: Any) -> str:
    from mpqkit.export.onnx_export import QTYPE_BY_ONNX

    qt = QTYPE_BY_ONNX.get(t.data_type)
    return qt.name if qt else str(t.data_type)


def _onnx_weight(node: Any, producer: Mapping[str, Any],
                 inits: Mapping[str, Any]) -> dict[str, Any] | None:
    """The weight fields of a layer node; None when its weight is no initializer."""
    w_name = node.input[1]
    w_src = producer.get(w_name)
    if w_src is not None and w_src.op_type == "Transpose":
        w_name = w_src.input[0]
        w_src = producer.get(w_name)
    if w_src is not None and w_src.op_type == "DequantizeLinear" and w_src.input[0] in inits:
        t = inits[w_src.input[0]]
        q = _arr(inits, t.name).astype(np.int32)
        scale = _arr(inits, w_src.input[1]) if w_src.input[1] in inits else np.zeros(())
        return {"w_bits": signed_bits(q), "w_container": _qtype_name(t),
                "w_range": [int(q.min()), int(q.max())] if q.size else [0, 0],
                "w_per_channel": bool(scale.size > 1)}
    if w_name in inits:
        return {"w_bits": FP, "w_container": "float"}
    return None


def _onnx_activation(path: Path, node: Any, producer: Mapping[str, Any],
                     inits: Mapping[str, Any]) -> dict[str, Any]:
    """The input-activation fields of a layer node (from its QuantizeLinear and Clip)."""
    from mpqkit.export.onnx_export import QTYPE_BY_ONNX

    a_src = producer.get(node.input[0])
    if a_src is None or a_src.op_type != "DequantizeLinear":
        return {"a_bits": FP, "a_container": "float"}
    q_src = producer.get(a_src.input[0])
    clip = None
    if q_src is not None and q_src.op_type == "Clip":
        lo_hi = [int(_arr(inits, n).reshape(())) for n in q_src.input[1:3] if n in inits]
        clip = lo_hi if len(lo_hi) == 2 else None
        q_src = producer.get(q_src.input[0])
    if q_src is None or q_src.op_type != "QuantizeLinear" or len(q_src.input) < 3:
        raise ExportError(f"{path}: layer {node.name!r} dequantizes an activation that "
                          "no QuantizeLinear produced: not an mpqkit QDQ graph")
    zp = inits.get(q_src.input[2])
    qt = QTYPE_BY_ONNX.get(zp.data_type) if zp is not None else None
    if qt is None:
        raise ExportError(f"{path}: layer {node.name!r} quantizes to an unknown type")
    lo, hi = clip if clip else (qt.lo, qt.hi)
    return {"a_bits": range_bits(lo, hi), "a_container": qt.name + ("+Clip" if clip else ""),
            "a_range": [lo, hi], "a_signed": lo < 0}


# ----------------------------------------------------------------------------------------------
# packed
# ----------------------------------------------------------------------------------------------
def inspect_packed(path: str | Path) -> dict[str, Any]:
    """Per-layer bits of a packed ``.mpq`` file."""
    from mpqkit.export.packed import read_packed_integers

    path = Path(path)
    header, ints = read_packed_integers(path)
    policy = header.get("policy") or {}
    pol_layers = policy.get("layers", {})
    entries = {e["name"]: e for e in header.get("tensors", [])}
    layers = []
    for name, info in (header.get("layers") or {}).items():
        key = f"{name}.weight" if name else "weight"
        e = entries.get(key)
        rec: dict[str, Any] = {"name": name, "op": "packed"}
        if e is not None and e["enc"] == "int":
            n = int(np.prod(e["shape"])) if e["shape"] else 1
            widths = [b for b in range(1, 33) if math.ceil(n * b / 8) == e["nbytes"]]
            if int(e["bits"]) not in widths:
                raise CheckpointError(f"{path}: layer {name!r} takes {e['nbytes']} bytes for {n} "
                                      f"values, not {e['bits']} bits each: the file is corrupt")
            q = ints[key]
            rec.update(w_bits=int(e["bits"]), w_value_bits=signed_bits(q),
                       w_container=f"{e['bits']}-bit packed",
                       w_range=[int(q.min()), int(q.max())] if q.size else [0, 0],
                       w_bytes=e["nbytes"], w_per_channel=bool(e.get("per_channel")))
        else:
            rec.update(w_bits=FP, w_container="float32")
        if info.get("a_range"):
            lo, hi = (int(v) for v in info["a_range"])
            rec.update(a_bits=range_bits(lo, hi), a_container="range", a_range=[lo, hi],
                       a_signed=lo < 0)
        else:
            rec.update(a_bits=FP, a_container="float")
        pol = pol_layers.get(name)
        rec["policy_w_bits"] = pol["w_bits"] if pol else None
        rec["policy_a_bits"] = pol["a_bits"] if pol else None
        rec["status"] = _status(rec["w_bits"], rec["a_bits"], pol)
        if rec.get("w_value_bits", 0) > rec["w_bits"]:
            rec["status"] = "mismatch"
        layers.append(rec)
    found = {r["name"] for r in layers}
    from mpqkit.export.packed import packed_report

    return _summary(path, "packed", layers, policy or None,
                    [n for n in pol_layers if n not in found],
                    {"mpqkit_version": header.get("mpqkit"), "model": header.get("model"),
                     "sizes": packed_report(path)})


def _summary(path: Path, fmt: str, layers: list[dict[str, Any]], policy: Any,
             missing: list[str], extra: Mapping[str, Any]) -> dict[str, Any]:
    bad = [r["name"] for r in layers if r["status"] in ("mismatch", "not in policy")]
    return {"path": str(path), "format": fmt, **extra, "policy_embedded": policy is not None,
            "layers": layers, "missing_from_file": missing,
            "matches_policy": bool(policy) and not bad and not missing}


# ----------------------------------------------------------------------------------------------
# front door
# ----------------------------------------------------------------------------------------------
def inspect_file(path: str | Path) -> dict[str, Any]:
    """Inspect an exported ``.onnx`` or packed ``.mpq`` file (detected from its content)."""
    from mpqkit.export.packed import MAGIC

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass an .onnx or .mpq file written by "
                              "mpqkit export")
    with path.open("rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        return inspect_packed(path)
    if path.suffix == ".mpq":
        raise CheckpointError(f"{path} is not a valid packed mpqkit file (wrong magic bytes): "
                              "re-export it with mpqkit export --format packed")
    return inspect_onnx(path)


def _bits(b: Any) -> str:
    return "fp32" if b == FP else str(b)


def format_inspection(report: Mapping[str, Any]) -> str:
    """A human-readable table of :func:`inspect_file`'s result."""
    lines = []
    if report["format"] == "onnx":
        head = (f"{report['path']}: ONNX opset {report.get('opset')}, "
                f"{'float export' if report.get('float') else 'QDQ'}"
                f" (int types {report.get('int_types') or '?'}), mpqkit "
                f"{report.get('mpqkit_version') or '?'}")
    else:
        head = (f"{report['path']}: packed mpqkit file, mpqkit "
                f"{report.get('mpqkit_version') or '?'}")
    if report.get("model"):
        head += f", model {report['model']}"
    lines.append(head)
    rows = [("layer", "op", "w bits", "w storage", "a bits", "a storage", "policy", "status")]
    for r in report["layers"]:
        w_store = r["w_container"]
        if "w_range" in r:
            w_store += f" [{r['w_range'][0]},{r['w_range'][1]}]"
            if r.get("w_per_channel"):
                w_store += " per-ch"
        a_store = r["a_container"]
        if "a_range" in r:
            a_store += f" [{r['a_range'][0]},{r['a_range'][1]}]"
        pw, pa = r.get("policy_w_bits"), r.get("policy_a_bits")
        pol = "-" if pw is None else ("fp32" if pw == pa == FP else f"w{_bits(pw)}a{_bits(pa)}")
        rows.append((r["name"], r["op"], _bits(r["w_bits"]), w_store, _bits(r["a_bits"]),
                     a_store, pol, r["status"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    if report["format"] == "packed" and report.get("sizes"):
        s = report["sizes"]
        lines.append(f"size {s['file_bytes']} bytes: weights {s['weight_bytes']} (policy "
                     f"{s['policy_size_bytes']:.0f}, x{s['weight_vs_policy']:.4f}), overhead "
                     f"{s['overhead_bytes']} (header {s['header_bytes']}, scales "
                     f"{s['scale_bytes']}, other float {s['other_float_bytes']})")
    n = len(report["layers"])
    if not report["policy_embedded"]:
        lines.append(f"{n} layers; no policy embedded (float export or foreign file)")
    elif report["matches_policy"]:
        narrower = sum(1 for r in report["layers"] if r["status"] == "narrower")
        lines.append(f"all {n} layers match the embedded policy"
                     + (f" ({narrower} with weights spanning fewer bits than allowed)"
                        if narrower else ""))
    else:
        bad = [r["name"] for r in report["layers"] if r["status"] in ("mismatch",
                                                                      "not in policy")]
        msg = f"MISMATCH with the embedded policy: {len(bad)} layer(s) differ"
        if bad:
            msg += f" ({', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''})"
        if report["missing_from_file"]:
            msg += f"; {len(report['missing_from_file'])} policy layer(s) missing from the file"
        lines.append(msg)
    return "\n".join(lines)
