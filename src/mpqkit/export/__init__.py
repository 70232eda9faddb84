"""Deployment: ONNX export with QuantizeLinear/DequantizeLinear, packed integer checkpoints,
inspection of exported files and verification in onnxruntime.

Public API (imported lazily, so ``import mpqkit.export`` does not load onnx)::

    export_onnx(model, path, input_size=32, opset=21, fp=False, int_types="int8", meta=None)
    export_checkpoint(checkpoint, out, format="onnx", opset=21, fp=False, int_types="int8")
    save_packed(model, path, meta) / load_packed(path) / read_packed(path) / packed_report(path)
    inspect_file(path) -> dict / format_inspection(report) -> str
    verify_onnx(model, onnx_path, loader) -> dict / verify_packed(model, packed_path, loader)
    verify_export(model, meta, path, fmt, data=None, threads=None) -> dict
    check_verification(result, tolerance=0.1)

See :mod:`mpqkit.export.onnx_export` for the graph conventions and the onnxruntime choices.
"""

from __future__ import annotations

import importlib
from typing import Any

from mpqkit.errors import MpqkitError

#: Default ONNX opset of exports: the first with INT4/UINT4 QuantizeLinear/DequantizeLinear.
DEFAULT_OPSET = 21
#: ``int_types`` choices of the ONNX export (see :mod:`mpqkit.export.onnx_export`).
INT_TYPES = ("int8", "auto", "native")


class ExportError(MpqkitError):
    """A model, checkpoint or option that cannot be exported as asked."""


class VerificationError(ExportError):
    """The exported model does not compute what the PyTorch model computes."""

    exit_code = 3


_LAZY = {
    "export_onnx": "mpqkit.export.onnx_export",
    "export_checkpoint": "mpqkit.export.onnx_export",
    "save_packed": "mpqkit.export.packed",
    "load_packed": "mpqkit.export.packed",
    "read_packed": "mpqkit.export.packed",
    "packed_report": "mpqkit.export.packed",
    "pack_bits": "mpqkit.export.packed",
    "unpack_bits": "mpqkit.export.packed",
    "inspect_file": "mpqkit.export.inspection",
    "format_inspection": "mpqkit.export.inspection",
    "verify_onnx": "mpqkit.export.verify",
    "verify_packed": "mpqkit.export.verify",
    "verify_export": "mpqkit.export.verify",
    "check_verification": "mpqkit.export.verify",
}

__all__ = ["DEFAULT_OPSET", "INT_TYPES", "ExportError", "VerificationError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'mpqkit.export' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
