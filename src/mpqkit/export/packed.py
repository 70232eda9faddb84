"""Packed integer checkpoints (``.mpq``): every quantized weight at its own bit-width.

File layout (all integers little-endian)::

    b"MPQKPACK"                 8 bytes, magic
    u32 version                 4 bytes (1)
    u32 header length H         4 bytes
    header                      H bytes: zlib-compressed UTF-8 JSON
    data                        the tensors, back to back, at the offsets the header gives

The header holds the model name, number of classes, input size, normalisation, the policy, the
quantizer config, the CRC-32 of the data section, and one entry per tensor of the quantized
model's state dict:

* quantized weights (``"enc": "int"``): the integers of the weight quantizer, ``bits`` bits per
  value in two's complement, as a little-endian bit stream (value ``i`` occupies stream bits
  ``i*b .. i*b+b-1``; stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``; the same order as
  ONNX INT4/INT2), padded with zero bits to a whole byte;
* everything else (``"enc": "raw"``): the tensor's bytes in its own dtype (BatchNorm, biases,
  quantizer steps, full-precision layers' weights, ...), plus for max-abs weights the per-channel
  max-abs value the scale is derived from (``NAME::amax``).

Reloading rebuilds the model from the header (``build_model`` + ``quantize_model``) and gives
each quantized layer a float weight that its weight quantizer maps to the same integers and the
same scale, so the reloaded model's forward pass is bit-identical to the saved one (checked when
saving).

Size: the quantized weights take ``ceil(params * bits / 8)`` bytes per layer, full-precision
layers ``params * 4``: together this matches ``Policy.complexity().size_mb`` up to the per-layer
rounding to whole bytes. Everything else is overhead and is reported by :func:`packed_report`.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mpqkit.errors import CheckpointError
from mpqkit.export import ExportError
from mpqkit.quant.layers import QuantMixin
from mpqkit.quant.quantizers import (
    DoReFaQuantizer,
    LSQQuantizer,
    MaxAbsQuantizer,
    Quantizer,
)
from mpqkit.runio import atomic_write

MAGIC = b"MPQKPACK"
VERSION = 1
FORMAT = "mpqkit.packed"
_PREFIX = struct.Struct("<8sII")


# ----------------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------------
def pack_bits(values: np.ndarray | Tensor, bits: int) -> bytes:
    """Pack integers into ``bits``-bit two's complement fields, little-endian bit stream.

    Values must fit in ``bits`` bits (signed: ``-2**(bits-1) .. 2**(bits-1)-1``, or unsigned
    ``0 .. 2**bits - 1``). The result has ``ceil(n * bits / 8)`` bytes.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit fields: use 1..16")
    v = np.asarray(values.cpu() if isinstance(values, Tensor) else values).reshape(-1)
    v = v.astype(np.int64)
    if v.size and (v.min() < -(2 ** (bits - 1)) or v.max() > 2**bits - 1):
        raise ValueError(f"values in [{v.min()}, {v.max()}] do not fit in {bits} bits")
    u = (v & (2**bits - 1)).astype(np.uint16)
    if bits == 8:
        return u.astype(np.uint8).tobytes()
    fields = ((u[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(fields.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values of ``bits`` bits (int32 array)."""
    if len(data) < math.ceil(count * bits / 8):
        raise ValueError(f"{len(data)} bytes hold fewer than {count} {bits}-bit values")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        u = raw[:count].astype(np.int32)
    else:
        stream = np.unpackbits(raw, bitorder="little", count=count * bits)
        u = (stream.reshape(count, bits).astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(1)
    if signed:
        u = np.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return u.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# the integers a layer's weight quantizer produces
# ----------------------------------------------------------------------------------------------
def weight_integers(layer: QuantMixin) -> tuple[Tensor, Tensor, int, int]:
    """``(q, scale, qmin, qmax)`` with ``q * scale`` = the weight the layer's forward uses.

    ``q`` is an int32 tensor shaped like the weight; ``scale`` is 1-D (one value, or one per
    output channel). The integers are recovered from the quantizer's own forward output, so they
    are exactly those the PyTorch model computes with, whatever the method (LSQ, max-abs,
    DoReFa).
    """
    wq = layer.wq
    w = layer.weight.detach().float()
    with torch.no_grad():
        wfq = wq(w)
        scale, qmin, qmax = wq.qparams(w)
    scale = scale.detach().float()
    sb = scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    q = torch.round(wfq / sb).clamp(qmin, qmax)
    err = (q * sb - wfq).abs().max().item() if wfq.numel() else 0.0
    if not err <= 1e-5 * max(1.0, float(wfq.abs().max())):
        raise ExportError(f"layer weights do not lie on the quantizer's grid (error {err:.3g}): "
                          "the weight quantizer is not a uniform integer grid")
    return q.to(torch.int32), scale.reshape(-1), qmin, qmax


def check_calibrated(name: str, layer: QuantMixin) -> None:
    """Raise a one-line error if a quantizer of ``layer`` has no range (not calibrated)."""
    oq = getattr(layer, "oq", None)  # a folded convolution's output quantizer
    for what, q in (("weight", layer.wq), ("activation", layer.aq),
                    *((("output", oq),) if isinstance(oq, Quantizer) else ())):
        if q.enabled and not isinstance(q, MaxAbsQuantizer) and not bool(q.initialized):
            raise ExportError(f"layer {name!r} has an uncalibrated {what} quantizer: calibrate "
                              "the model (mpqkit.quant.calibrate) or export a fine-tuned "
                              "checkpoint")
        if what != "weight" and q.enabled and q.signed is None:
            raise ExportError(f"layer {name!r} has an activation quantizer whose sign is not "
                              "decided: calibrate the model first")


def _reconstruct_weight(wq: Quantizer, q: Tensor, scale: Tensor, amax: Tensor | None,
                        shape: tuple[int, ...]) -> Tensor:
    """A float weight that ``wq`` maps to integers ``q`` with the stored scale."""
    q = q.reshape(shape).float()
    per = (-1,) + (1,) * (len(shape) - 1)
    if isinstance(wq, DoReFaQuantizer):
        # tanh(w) / max|tanh(w)| * qmax == q: any w with tanh(w) proportional to q will do.
        qmax = wq.int_range()[1]
        return torch.atanh(0.5 * q.double() / qmax).float()
    if isinstance(wq, MaxAbsQuantizer):
        qmax = wq.int_range()[1]
        if amax is None:
            raise CheckpointError("a max-abs weight has no stored range: the file is corrupt")
        a = amax.float().reshape(per) if amax.numel() > 1 else amax.float().reshape(())
        s = a / qmax
        w = q * s
        # Every entry at the range's end is set to exactly +-amax: the recomputed scale is then
        # amax / qmax, bit for bit the one the saved model used.
        ends = q.abs() == qmax
        return torch.where(ends, torch.sign(q) * a, w)
    if isinstance(wq, LSQQuantizer):
        s = scale.abs().clamp_min(1e-8).float()
        s = s.reshape(per) if s.numel() > 1 else s.reshape(())
        return q * s
    raise ExportError(f"{type(wq).__name__} weights cannot be packed: use lsq, maxabs or dorefa")


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------
def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_packed_meta(meta: Mapping[str, Any]) -> None:
    if not meta.get("policy"):
        raise ExportError("the checkpoint has no policy (a full-precision model): the packed "
                          "format stores quantized weights; pass a QAT checkpoint "
                          "(mpqkit finetune), or use --format onnx --fp for the float model")
    for key in ("model", "num_classes"):
        if key not in meta:
            raise ExportError(f"checkpoint metadata lacks {key!r}: pass a checkpoint written by "
                              "mpqkit finetune")


class _DataSection:
    """The tensors' header entries and their bytes, back to back in the data section."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.chunks: list[bytes] = []
        self.offset = 0

    def add(self, entry: dict[str, Any], data: bytes) -> None:
        entry.update(offset=self.offset, nbytes=len(data))
        self.entries.append(entry)
        self.chunks.append(data)
        self.offset += len(data)


def _layer_info(layer: QuantMixin) -> dict[str, Any]:
    info: dict[str, Any] = {"w_bits": layer.w_bits, "a_bits": layer.a_bits}
    if layer.aq.enabled:
        info["a_range"] = list(layer.aq.int_range())
    return info


def _add_packed_weight(section: _DataSection, name: str, key: str, layer: QuantMixin) -> None:
    """Add the weight integers of ``layer`` (and the max-abs range), checked to reload exactly."""
    q, scale, qmin, qmax = weight_integers(layer)
    wq = layer.wq
    amax = None
    if isinstance(wq, MaxAbsQuantizer) and not isinstance(wq, DoReFaQuantizer):
        amax = wq._amax(layer.weight.detach().float()).reshape(-1).float()
    rec = _reconstruct_weight(wq, q, scale, amax, tuple(layer.weight.shape))
    with torch.no_grad():
        same = torch.equal(wq(rec), wq(layer.weight.detach().float()))
    if not same:
        raise ExportError(f"layer {name!r}: the packed weights would not reproduce the "
                          "model bit for bit (unsupported weight quantizer state)")
    bits = layer.w_bits
    section.add({"name": key, "enc": "int", "bits": bits, "shape": list(layer.weight.shape),
                 "qmin": qmin, "qmax": qmax, "method": wq.method,
                 "per_channel": wq.per_channel}, pack_bits(q, bits))
    if amax is not None:
        section.add({"name": f"{key}::amax", "enc": "raw", "dtype": "float32",
                     "shape": list(amax.shape)}, amax.numpy().tobytes())


def _add_quantized_layers(section: _DataSection, qlayers: Mapping[str, QuantMixin]
                          ) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Add the packed weights of ``qlayers``; returns the per-layer info and the packed keys."""
    layers_info: dict[str, dict[str, Any]] = {}
    packed_keys: set[str] = set()
    for name, layer in qlayers.items():
        check_calibrated(name, layer)
        key = f"{name}.weight" if name else "weight"
        layers_info[name] = _layer_info(layer)
        if not layer.wq.enabled:
            continue
        _add_packed_weight(section, name, key, layer)
        packed_keys.add(key)
    return layers_info, packed_keys


def _add_raw_tensors(section: _DataSection, state: Mapping[str, Tensor],
                     skip: set[str]) -> None:
    """Add every state-dict tensor not in ``skip`` as its raw bytes in its own dtype."""
    for key, t in state.items():
        if key in skip:
            continue
        t = t.detach().cpu().contiguous()
        section.add({"name": key, "enc": "raw", "dtype": _dtype_name(t), "shape": list(t.shape)},
                    t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def save_packed(model: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``model`` (a quantized model) as a packed integer checkpoint.

    ``meta`` is the checkpoint metadata (``model``, ``num_classes``, ``input_size``, ``policy``,
    ``quant``; ``dataset``, ``mean``, ``std`` optional), as :func:`load_checkpoint_model`
    returns it. Returns :func:`packed_report` of the written file.
    """
    from mpqkit import __version__

    _check_packed_meta(meta)
    was_training = model.training
    model.eval()
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantMixin)}
    if not qlayers:
        raise ExportError("the model has no quantized layer: pass a QAT checkpoint")
    folded = [n for n, m in qlayers.items() if hasattr(m, "folded")]
    if folded:
        raise ExportError(f"layer {folded[0]!r} was trained with BatchNorm folded (fold_bn), "
                          "which the packed format does not store yet: export --format onnx, "
                          "or fine-tune with --no-fold-bn for a packed file")
    state = model.state_dict()
    section = _DataSection()
    try:
        layers_info, packed_keys = _add_quantized_layers(section, qlayers)
        _add_raw_tensors(section, state, packed_keys)
    finally:
        model.train(was_training)
    data = b"".join(section.chunks)
    header = {
        "format": FORMAT, "version": VERSION, "mpqkit": __version__,
        "model": meta["model"], "num_classes": int(meta["num_classes"]),
        "input_size": meta.get("input_size"), "dataset": meta.get("dataset"),
        "mean": meta.get("mean"), "std": meta.get("std"),
        "policy": meta["policy"], "quant": meta.get("quant") or {},
        "layers": layers_info, "tensors": section.entries, "data_bytes": len(data),
        "crc32": zlib.crc32(data),
    }
    hbytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    path = atomic_write(path, lambda p: p.write_bytes(
        _PREFIX.pack(MAGIC, VERSION, len(hbytes)) + hbytes + data))
    return packed_report(path)


# ----------------------------------------------------------------------------------------------
# read
# ----------------------------------------------------------------------------------------------
def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid packed mpqkit file ({why}): re-export it with "
                           "mpqkit export --format packed")


def read_packed_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The header of a packed file and the offset of its data section."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"packed file {path} does not exist: pass a file written by "
                              "mpqkit export --format packed")
    with path.open("rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise _corrupt(path, "too short")
        magic, version, hlen = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise _corrupt(path, "wrong magic bytes")
        if version > VERSION:
            raise CheckpointError(f"{path} is packed format version {version}; this mpqkit reads "
                                  f"up to {VERSION}: upgrade mpqkit")
        hbytes = f.read(hlen)
    if len(hbytes) < hlen:
        raise _corrupt(path, "truncated header")
    try:
        header = json.loads(zlib.decompress(hbytes))
    except (zlib.error, ValueError, UnicodeDecodeError):
        raise _corrupt(path, "unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _corrupt(path, "not an mpqkit.packed header")
    return header, _PREFIX.size + hlen


def _read_data(path: Path, header: Mapping[str, Any], start: int) -> bytes:
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    if len(data) != header.get("data_bytes"):
        raise _corrupt(path, f"data section is {len(data)} bytes, header says "
                             f"{header.get('data_bytes')}")
    if zlib.crc32(data) != header.get("crc32"):
        raise _corrupt(path, "checksum mismatch")
    return data


def read_packed_integers(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header and the unpacked integer weights ``{state-dict key: int32 array}``."""
    path = Path(path)
    header, start = read_packed_header(path)
    data = _read_data(path, header, start)
    out = {}
    for e in header["tensors"]:
        if e["enc"] == "int":
            n = int(np.prod(e["shape"])) if e["shape"] else 1
            buf = data[e["offset"]:e["offset"] + e["nbytes"]]
            out[e["name"]] = unpack_bits(buf, int(e["bits"]), n).reshape(e["shape"])
    return header, out


def read_packed(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the quantized model of a packed file; returns ``(model, header)``."""
    from mpqkit.engine.config import from_dict
    from mpqkit.models import build_model
    from mpqkit.policy import Policy
    from mpqkit.quant import QuantConfig, quantize_model

    path = Path(path)
    header, start = read_packed_header(path)
    data = _read_data(path, header, start)
    try:
        policy = Policy.from_dict(header["policy"], f"{path} policy")
        model = build_model(header["model"], num_classes=int(header["num_classes"]))
        qcfg = from_dict(QuantConfig, header.get("quant") or {}, "quant")
        model = quantize_model(model, policy, qcfg, inplace=True)
        entries = {e["name"]: e for e in header["tensors"]}
    except (KeyError, TypeError) as exc:
        raise _corrupt(path, f"missing field {exc}") from None
    own = model.state_dict()
    state: dict[str, Tensor] = {}
    raw: dict[str, Tensor] = {}
    for name, e in entries.items():
        buf = data[e["offset"]:e["offset"] + e["nbytes"]]
        if e["enc"] == "raw":
            dtype = getattr(torch, e["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise _corrupt(path, f"unknown dtype {e['dtype']!r}")
            t = torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype) if buf else \
                torch.empty(0, dtype=dtype)
            raw[name] = t.reshape(e["shape"]).clone()
    for key in own:
        if key in raw:
            state[key] = raw[key]
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantMixin)}
    # Load the quantizer states first (scales), then rebuild the weights from the integers.
    model.load_state_dict(state, strict=False)
    for name, layer in qlayers.items():
        key = f"{name}.weight" if name else "weight"
        e = entries.get(key)
        if e is None or e["enc"] != "int":
            continue
        n = int(np.prod(e["shape"])) if e["shape"] else 1
        buf = data[e["offset"]:e["offset"] + e["nbytes"]]
        q = torch.from_numpy(unpack_bits(buf, int(e["bits"]), n))
        if int(e["bits"]) != layer.w_bits:
            raise _corrupt(path, f"layer {name!r} is packed at {e['bits']} bits but the policy "
                                 f"says {layer.w_bits}")
        amax = raw.get(f"{key}::amax")
        scale = layer.wq.scale.detach() if isinstance(layer.wq, LSQQuantizer) else torch.ones(1)
        w = _reconstruct_weight(layer.wq, q, scale, amax, tuple(e["shape"]))
        state[key] = w
    missing = [k for k in own if k not in state]
    if missing:
        raise _corrupt(path, f"missing tensors {', '.join(missing[:4])}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, header


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the quantized model stored in a packed file (eval mode)."""
    return read_packed(path)[0]


def packed_report(path: str | Path) -> dict[str, Any]:
    """Sizes of a packed file against its policy.

    ``weight_bytes``: quantized weights at their widths plus full-precision layers' float
    weights: what ``policy.complexity().size_mb`` counts. ``overhead_bytes`` = header + scales +
    other float tensors (BatchNorm, biases, quantizer states) + the 16-byte prefix.
    """
    from mpqkit.policy import Policy

    path = Path(path)
    header, start = read_packed_header(path)
    policy = Policy.from_dict(header["policy"], f"{path} policy")
    c = policy.complexity()
    fp_weights = {f"{n}.weight" for n, lp in policy.layers.items() if lp.w_bits >= 32}
    weight = scales = other = 0
    for e in header["tensors"]:
        name = e["name"]
        if e["enc"] == "int" or name in fp_weights:
            weight += e["nbytes"]
        elif name.endswith(("::amax", "wq.scale", "aq.scale", "aq.alpha")):
            scales += e["nbytes"]
        else:
            other += e["nbytes"]
    file_bytes = path.stat().st_size
    policy_bytes = c.size_mb * 1e6
    return {
        "path": str(path), "file_bytes": file_bytes, "policy_size_bytes": policy_bytes,
        "weight_bytes": weight,
        "weight_vs_policy": weight / policy_bytes if policy_bytes else float("nan"),
        "header_bytes": start, "scale_bytes": scales, "other_float_bytes": other,
        "overhead_bytes": file_bytes - weight,
        "overhead_vs_policy": (file_bytes - weight) / policy_bytes if policy_bytes else 0.0,
    }
