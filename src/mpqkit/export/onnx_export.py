"""ONNX export of (mixed-precision) quantized models as QuantizeLinear/DequantizeLinear graphs.

How the graph is built: the model's forward is traced with ``torch.fx`` (quantized layers and
torch.nn layers are leaves) and every node is written with ``onnx.helper``. This keeps full
control over the integer types, the scales and the rounding, needs neither the TorchScript
exporter (``dynamo=False``: deprecated in torch 2.14 and limited to opset 20, so no INT4) nor
onnxscript (the dynamo exporter's dependency), and turns any op it cannot express into a
one-line error naming the layer or the operation.

Graph conventions (a quantized layer ``L`` = ``QConv2d``/``QLinear``):

* input activation: ``QuantizeLinear(x, s_a, zp=0)`` to a container type, then (if the
  container is wider than the b-bit range) ``Clip(lo, hi)`` on the integers, then
  ``DequantizeLinear``. ``s_a`` is the learned step (LSQ) or ``alpha / qmax`` (PACT); ``lo, hi``
  the quantizer's range (unsigned ``[0, 2^b-1]``, signed ``[-2^(b-1), 2^(b-1)-1]``).
* weights: integer initializer + ``DequantizeLinear`` (``axis=0`` and a 1-D scale when
  per-channel). Values are the quantizer's integers ``[-(2^(b-1)-1), 2^(b-1)-1]``.
* the float op (Conv / Gemm / MatMul) on the dequantized tensors; bias stays float.
* full-precision layers (32 bits) are plain float ops with float initializers.
* BatchNorm (``fold_bn``, default): folded into the convolution before it (the deployment form
  of :mod:`mpqkit.export.deploy`), so a layer is ``DequantizeLinear -> Conv(bias) -> [Relu] ->
  QuantizeLinear``, which onnxruntime runs as ``QLinearConv``; a folded convolution trained with
  an output quantizer (``oq``, :mod:`mpqkit.quant.fold`) ends in its own
  ``QuantizeLinear/DequantizeLinear`` (``out_type``, ``out_range`` in the layer summary); an
  8-bit signed output is written as uint8 with zero point 128 (the same integers + 128), the
  form onnxruntime's integer kernels take.
* residual adds (``residual_quant``, default): an add of two quantized values gets an 8-bit
  residual quantizer on what it feeds to non-quantized consumers (:mod:`mpqkit.export.deploy`),
  so that onnxruntime runs it as ``QLinearAdd``; it changes the function by one rounding to
  1/255 of the add's range, and :func:`~mpqkit.export.deploy.export_reference` (what
  :func:`export_checkpoint` returns for ``--verify``) includes it.
* exact rewrites (:mod:`mpqkit.export.qdq_rewrite`): a ReLU after a DequantizeLinear becomes an
  integer Clip, slicing / zero padding / max pooling run on the integers, and an add read by
  several QuantizeLinear nodes is written once per reader, so that onnxruntime fuses them.

Integer types (``int_types``), checked with onnxruntime 1.31 on CPU:

* ``"int8"`` (default): int8 weights only, the b-bit range in an int8 container. The form that
  runs fast: onnxruntime 1.32's CPU provider fuses ``DequantizeLinear(int8/uint8) -> Conv ->
  QuantizeLinear`` into ``QLinearConv`` but has no integer Conv kernel for INT4 weights, which it
  dequantizes on every run (ResNet-20 w4a4, BatchNorm folded, 1 thread: INT4 weights 1.8-2.1x
  the float model's latency, int8 containers 0.47-0.57x; ``benchmarks/bench_export.py``).
  Also the most widely runnable form (opset >= 13).
* ``"auto"``: weights in ONNX's own narrow types where the opset has them: <= 4 bits
  as INT4 (opset >= 21; onnxruntime runs INT4 DequantizeLinear per tensor and per axis), 2 bits
  as INT2 (opset >= 25); other widths, and everything below opset 21, in an int8 container
  holding only the b-bit range (the stored values are in range; nothing else is needed).
  The smallest files; slow in onnxruntime (above). With BatchNorm folded, onnxruntime 1.32
  fuses an INT2 weight into ``QLinearConv`` and then refuses to load the graph (``tensor(int2)``
  is not a valid QLinearConv input): INT2 needs ``fold_bn=False`` there.
* ``"native"``: as auto, but a weight of <= 4 bits with an opset below 21 is an error instead
  of a fallback to int8.

Activations always use a uint8 (unsigned) or int8 (signed) container, with an integer ``Clip``
to the b-bit range below 8 bits (onnxruntime runs Clip on int8/uint8). UINT4/INT4 activations
were tried and rejected: onnxruntime 1.31's Clip+QuantizeLinear fusion fails to load a graph in
which a ReLU6 (Clip) feeds a QuantizeLinear to a 4-bit type (MobileNet-V2).

Rounding: ``QuantizeLinear`` rounds half to even after a true division ``x / scale``
(onnxruntime divides, it does not multiply by ``1/scale``), exactly as the PyTorch fake
quantizers (``torch.round(x / s)``); the zero point is 0; the integer Clip equals the clamp.
PACT's clip at ``alpha`` coincides with the clamp at ``qmax`` (``alpha / s == qmax``). The
dequantized weights equal the PyTorch fake-quantized weights bit for bit (LSQ, max-abs; DoReFa
within one float ulp, ``q * (1/qmax)`` against ``q / qmax``). The two graphs therefore compute
the same function up to the float summation order of the convolutions, which flips a rounding
now and then (measured: 99.98% class agreement, top-1 within 0.01 points on the 10,000
CIFAR-10 test images for a mixed 2..8-bit ResNet-20).

Metadata (``metadata_props``): ``mpqkit.version``, ``mpqkit.policy`` (the policy JSON),
``mpqkit.model``, ``mpqkit.num_classes``, ``mpqkit.input_size``, ``mpqkit.mean``/``mpqkit.std``
(the input normalisation the model expects), ``mpqkit.quant``, ``mpqkit.int_types`` and
``mpqkit.float`` ("1" for a float export). Input ``input`` is ``[N, C, H, W]`` float32
(normalised), output ``logits``.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from mpqkit.errors import CheckpointError, ConfigError, MpqkitError
from mpqkit.export import DEFAULT_OPSET, INT_TYPES, ExportError
from mpqkit.export.packed import check_calibrated, pack_bits, weight_integers
from mpqkit.export.qdq_rewrite import integer_kernel_form, unique_name
from mpqkit.quant.fold import QConvBn2d, QuantTracer
from mpqkit.quant.layers import QuantMixin, quantizable_layers
from mpqkit.quant.quantizers import FULL_PRECISION, Quantizer
from mpqkit.runio import atomic_write

MIN_OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_I64_MAX = 2**63 - 1


@dataclass(frozen=True)
class QType:
    """An ONNX integer type usable by QuantizeLinear/DequantizeLinear."""

    name: str
    onnx_type: int
    lo: int
    hi: int
    min_opset: int

    @property
    def bits(self) -> int:
        return int(round(math.log2(self.hi - self.lo + 1)))


QTYPES = {
    "int8": QType("int8", TensorProto.INT8, -128, 127, 10),
    "uint8": QType("uint8", TensorProto.UINT8, 0, 255, 10),
    "int4": QType("int4", TensorProto.INT4, -8, 7, 21),
    "uint4": QType("uint4", TensorProto.UINT4, 0, 15, 21),
    "int2": QType("int2", TensorProto.INT2, -2, 1, 25),
    "uint2": QType("uint2", TensorProto.UINT2, 0, 3, 25),
}
QTYPE_BY_ONNX = {t.onnx_type: t for t in QTYPES.values()}

SUPPORTED_MODULES = ("Conv2d", "Linear", "BatchNorm1d/2d", "ReLU", "ReLU6", "Hardtanh",
                     "LeakyReLU", "Sigmoid", "Tanh", "SiLU", "Hardswish", "Hardsigmoid", "GELU",
                     "Softmax", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Flatten",
                     "LayerNorm", "Dropout", "Identity")


def max_opset() -> int:
    """The newest ONNX opset the installed onnx package knows."""
    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    """Return ``opset`` if mpqkit can export to it, else raise a one-line error."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset {opset!r} is not an integer: pass e.g. --opset {DEFAULT_OPSET}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: per-channel DequantizeLinear (axis) and "
                          f"integer Clip need opset {MIN_OPSET} or newer; pass --opset "
                          f"{DEFAULT_OPSET} (INT4 weights need 21)")
    if opset > max_opset():
        raise ExportError(f"opset {opset} is newer than the installed onnx package knows "
                          f"({max_opset()}): pass --opset {max_opset()} or lower")
    return opset


# ----------------------------------------------------------------------------------------------
# values flowing through the converter
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dyn:
    """An int known only at run time (the batch size): the name of a 0-D int64 tensor."""

    name: str


class _Unsupported(Exception):
    """Raised inside the converter; turned into an ExportError naming the layer or node."""


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str,
         default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


_ALIASES = {
    "iadd": "add", "add_": "add", "isub": "sub", "sub_": "sub", "imul": "mul", "mul_": "mul",
    "truediv": "div", "itruediv": "div", "div_": "div", "concat": "cat", "concatenate": "cat",
    "relu_": "relu", "view": "reshape", "contiguous": "identity", "clone": "identity",
    "detach": "identity", "dropout": "identity", "dropout1d": "identity",
    "dropout2d": "identity", "float": "identity", "hardtanh_": "hardtanh",
    "sigmoid_": "sigmoid", "tanh_": "tanh", "leaky_relu_": "leaky_relu", "relu6_": "relu6",
    "floordiv": "floordiv", "ifloordiv": "floordiv",
}
_FUNC_MODULES = ("operator", "_operator", "torch", "torch.nn.functional", "torch._C._nn",
                 "torch.functional", "builtins", "torch._C._VariableFunctions")
# functions of other libraries that the tracer keeps as calls (``torch.fx.wrap``), by
# (module, name); each has a handler below
_LIBRARY_FUNCS = {("torchvision.ops.stochastic_depth", "stochastic_depth")}


def _canon(node: fx.Node) -> str:
    if node.op == "call_method":
        name = str(node.target)
    else:
        t = node.target
        mod = getattr(t, "__module__", None)
        if (mod is not None and mod not in _FUNC_MODULES and t is not getattr
                and (mod, getattr(t, "__name__", None)) not in _LIBRARY_FUNCS):
            raise _Unsupported(f"function {getattr(t, '__qualname__', t)!r} from {mod}")
        name = getattr(t, "__name__", str(t))
    return _ALIASES.get(name, name)


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    return f"function {mod + '.' if mod else ''}{getattr(t, '__name__', t)}"


# ----------------------------------------------------------------------------------------------
# handler tables: which _Converter method writes an op (function / method) or a module
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Call:
    """A call_function / call_method node: its canonical op name and its loaded arguments."""

    node: fx.Node
    name: str
    args: Sequence[Any]
    kwargs: Mapping[str, Any]

    @property
    def a0(self) -> Any:
        """The first argument, loaded (a tensor name, a Python value or a :class:`_Dyn`)."""
        return self.args[0] if self.args else None

    @property
    def src(self) -> Any:
        """The first argument as traced (the fx node whose shape metadata gives its shape)."""
        return self.node.args[0] if self.node.args else None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return _arg(self.args, self.kwargs, i, name, default)


_OpMethod = Callable[["_Converter", _Call], Any]


class _OpHandler(NamedTuple):
    method: _OpMethod
    tensor_input: bool  # the first argument must be a tensor


_FUNCTION_HANDLERS: dict[str, _OpHandler] = {}
_MODULE_HANDLERS: list[tuple[tuple[type, ...], bool, Callable[..., Any]]] = []


def _handles(*names: str, tensor_input: bool = True) -> Callable[[_OpMethod], _OpMethod]:
    """Register a ``_Converter`` method as the writer of the canonical op ``names``.

    With ``tensor_input`` (the default) a call whose first argument is not a tensor is refused
    before the method runs.
    """

    def deco(method: _OpMethod) -> _OpMethod:
        for name in names:
            _FUNCTION_HANDLERS[name] = _OpHandler(method, tensor_input)
        return method

    return deco


def _handles_module(*types: type, exact: bool = False
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a ``_Converter`` method ``(self, lname, mod, node, x)`` as the writer of modules.

    A module matches by ``isinstance`` (by its exact type with ``exact``); the table is scanned
    in registration order (the order of the methods in the class) and the first match wins.
    """

    def deco(method: Callable[..., Any]) -> Callable[..., Any]:
        _MODULE_HANDLERS.append((types, exact, method))
        return method

    return deco


# ----------------------------------------------------------------------------------------------
# the converter
# ----------------------------------------------------------------------------------------------
class _Converter:
    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], opset: int,
                 fp: bool, int_types: str) -> None:
        self.model = model
        self.input_shape = input_shape
        self.opset = opset
        self.fp = fp
        self.int_types = int_types
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self.consts: dict[tuple[Any, ...], str] = {}
        self.layers: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.batch: _Dyn | None = None
        self.layer_info: dict[str, Any] = {}
        self.residual: list[dict[str, Any]] = []

    # -- naming and emission ---------------------------------------------------------------------
    def uniq(self, base: str) -> str:
        return unique_name(base or "node", self.used)

    def init(self, base: str, tensor: np.ndarray | onnx.TensorProto) -> str:
        name = self.uniq(base)
        if isinstance(tensor, np.ndarray):
            tensor = numpy_helper.from_array(tensor, name)
        else:
            tensor.name = name
        self.inits.append(tensor)
        return name

    def const_i64(self, values: Sequence[int] | int) -> str:
        arr = np.asarray(values, dtype=np.int64)
        key = ("i64", arr.shape, tuple(arr.reshape(-1).tolist()))
        if key not in self.consts:
            self.consts[key] = self.init("const_i64", arr)
        return self.consts[key]

    def const_f32(self, value: float) -> str:
        key = ("f32", float(np.float32(value)))
        if key not in self.consts:
            self.consts[key] = self.init("const_f32", np.array(value, dtype=np.float32))
        return self.consts[key]

    def op(self, op_type: str, inputs: Sequence[str], name: str | None = None,
           **attrs: Any) -> str:
        node_name = self.uniq(name or op_type)
        out = self.uniq(f"{node_name}:out" if name else node_name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name,
                                           **attrs))
        return out

    def op_multi(self, op_type: str, inputs: Sequence[str], n: int, name: str,
                 **attrs: Any) -> tuple[str, ...]:
        """A node with ``n`` outputs (``name:out0``, ...); their names."""
        node_name = self.uniq(name)
        outs = tuple(self.uniq(f"{node_name}:out{i}") for i in range(n))
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outs), name=node_name,
                                           **attrs))
        return outs

    # -- tracing -------------------------------------------------------------------------------
    def trace(self) -> fx.GraphModule:
        try:
            graph = QuantTracer().trace(self.model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported in one line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"cannot trace the model's forward for export ({msg[:160]}): "
                              "export needs a forward without data-dependent Python control "
                              "flow") from None
        gm = fx.GraphModule(self.model, graph)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                if isinstance(mod, QuantMixin) and not self.fp:
                    check_calibrated(str(node.target), mod)
        c, h, w = self.input_shape
        sample = torch.zeros(2, c, h, w)
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(sample)
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"the model does not run on a {c}x{h}x{w} input ({msg[:160]}): "
                              "pass the input size it was built for") from None
        return gm

    @staticmethod
    def shape(node: Any) -> tuple[int, ...]:
        tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if tm is None or not hasattr(tm, "shape"):
            raise _Unsupported("an operation whose input is not a single tensor")
        return tuple(int(d) for d in tm.shape)

    def convert(self) -> onnx.GraphProto:
        gm = self.trace()
        env: dict[str, Any] = {}
        out_value: Any = None

        def load(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n.name])

        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if env:
                    raise ExportError(f"the model's forward takes more than one input "
                                      f"({node.name!r}): export supports one image tensor")
                env[node.name] = INPUT_NAME
                self.used.add(INPUT_NAME)
                continue
            if node.op == "output":
                out_value = load(node.args[0])
                continue
            try:
                if node.op == "get_attr":
                    t = _fetch_attr(gm, str(node.target))
                    env[node.name] = self.init(str(node.target), _np(t))
                elif node.op == "call_module":
                    mod = gm.get_submodule(node.target)
                    env[node.name] = self.module(str(node.target), mod, node,
                                                 load(node.args), load(node.kwargs))
                else:
                    env[node.name] = self.function(node, load(node.args), load(node.kwargs))
            except _Unsupported as exc:
                if node.op == "call_module":
                    mod = gm.get_submodule(node.target)
                    where = f"layer {node.target!r} ({type(mod).__name__})"
                else:
                    where = f"{_describe(node)} (node {node.name!r})"
                raise ExportError(f"cannot export {where} to ONNX: {exc}; mpqkit's exporter "
                                  "handles " + ", ".join(SUPPORTED_MODULES[:8]) + ", pooling "
                                  "and add/mul/cat/flatten/reshape/pad/slicing") from None
        if not isinstance(out_value, str):
            raise ExportError("the model returns "
                              f"{type(out_value).__name__ if out_value is not None else 'None'}, "
                              "not one tensor: export supports models returning logits")
        self.nodes.append(helper.make_node("Identity", [out_value], [OUTPUT_NAME],
                                           name="output"))
        out_shape = self.shape(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        c, h, w = self.input_shape
        inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", c, h, w])
        outp = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                             ["N", *out_shape[1:]])
        return helper.make_graph(self.nodes, "mpqkit", [inp], [outp], initializer=self.inits)

    # -- helpers for shapes ----------------------------------------------------------------------
    def batch_size(self) -> _Dyn:
        if self.batch is None:
            shape = self.op("Shape", [INPUT_NAME], name="batch_shape")
            idx = self.const_i64(0)
            self.batch = _Dyn(self.op("Gather", [shape, idx], name="batch_size", axis=0))
        return self.batch

    def shape_tensor(self, items: Sequence[Any]) -> str:
        if all(isinstance(i, int) for i in items):
            return self.const_i64([int(i) for i in items])
        parts = []
        for i in items:
            if isinstance(i, _Dyn):
                parts.append(self.op("Unsqueeze", [i.name, self.const_i64([0])]))
            elif isinstance(i, int):
                parts.append(self.const_i64([i]))
            else:
                raise _Unsupported(f"a shape entry of type {type(i).__name__}")
        return self.op("Concat", parts, axis=0)

    def dyn_arith(self, op: str, a: Any, b: Any) -> Any:
        pyop = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                "floordiv": operator.floordiv}.get(op)
        if not isinstance(a, _Dyn) and not isinstance(b, _Dyn):
            if op == "div":
                return a / b
            if pyop is None:
                raise _Unsupported(f"{op} of Python values")
            return pyop(a, b)
        onnx_op = {"add": "Add", "sub": "Sub", "mul": "Mul", "floordiv": "Div"}.get(op)
        if onnx_op is None or not all(isinstance(v, _Dyn | int) for v in (a, b)):
            raise _Unsupported(f"{op} on the batch size")
        names = [v.name if isinstance(v, _Dyn) else self.const_i64(int(v)) for v in (a, b)]
        return _Dyn(self.op(onnx_op, names))

    # -- quantized and float layers --------------------------------------------------------------
    def act_type(self, bits: int, qmin: int, qmax: int) -> tuple[QType, bool]:
        """Container type for an activation range, and whether a Clip is needed.

        Always an 8-bit container: onnxruntime 1.31 crashes in its Clip+QuantizeLinear fusion
        when a ReLU6/Clip feeds a QuantizeLinear to UINT4/INT4, so 4- and 2-bit activations use
        uint8/int8 plus the integer Clip like every other width below 8.
        """
        t = QTYPES["int8" if qmin < 0 else "uint8"]
        if qmin < t.lo or qmax > t.hi:
            raise _Unsupported(f"a {bits}-bit activation range [{qmin}, {qmax}] wider than 8 bits")
        return t, (qmin, qmax) != (t.lo, t.hi)

    def weight_type(self, lname: str, bits: int, qmin: int, qmax: int) -> QType:
        if self.int_types != "int8":
            for name in ("int2", "int4"):
                t = QTYPES[name]
                if t.lo <= qmin and qmax <= t.hi and self.opset >= t.min_opset:
                    return t
            t4 = QTYPES["int4"]
            if self.int_types == "native" and t4.lo <= qmin and qmax <= t4.hi:
                raise ExportError(f"layer {lname!r} has {bits}-bit weights: INT4 needs opset "
                                  f"{t4.min_opset} or newer (asked for {self.opset}): pass --opset "
                                  f"{t4.min_opset}, or --int-types auto to store them in int8")
        return QTYPES["int8"]

    def int_init(self, base: str, values: np.ndarray, t: QType) -> str:
        values = np.asarray(values)
        if t.name in ("int8", "uint8"):
            return self.init(base, values.astype(np.int8 if t.name == "int8" else np.uint8))
        tensor = helper.make_tensor(base, t.onnx_type, list(values.shape),
                                    pack_bits(values, t.bits), raw=True)
        return self.init(base, tensor)

    def act_qdq(self, lname: str, aq: Quantizer, x: str, role: str = "input") -> str:
        try:
            scale, qmin, qmax = aq.qparams(None)
        except (ValueError, NotImplementedError, TypeError):
            raise _Unsupported(f"its {type(aq).__name__} activation quantizer has no fixed "
                               "scale") from None
        if scale.numel() != 1:
            raise _Unsupported("a per-channel activation scale")
        t, clip = self.act_type(aq.bits, qmin, qmax)
        zero = 0
        if role != "input" and t.name == "int8" and not clip:
            # an 8-bit signed output: uint8 with zero point 128 holds the same integers + 128
            # and is the form onnxruntime's integer kernels (QLinearConv/QLinearAdd) take
            t, zero = QTYPES["uint8"], 128
        s = self.init(f"{lname}.{role}_scale", np.array(scale.detach().float().reshape(()).item(),
                                                         dtype=np.float32))
        zp = self.int_init(f"{lname}.{role}_zero_point", np.array(zero, np.int64), t)
        q = self.op("QuantizeLinear", [x, s, zp], name=f"{lname}/{role}_quant")
        if clip:
            lo = self.int_init(f"{lname}.{role}_min", np.array(qmin), t)
            hi = self.int_init(f"{lname}.{role}_max", np.array(qmax), t)
            q = self.op("Clip", [q, lo, hi], name=f"{lname}/{role}_clip")
        if role in ("input", "output"):  # a layer's quantizer: recorded in its summary
            key = "a" if role == "input" else "out"
            self.layer_info[f"{key}_type"] = t.name + (f" (zero point {zero})" if zero else "")
            self.layer_info[f"{key}_range"] = [qmin, qmax]
        return self.op("DequantizeLinear", [q, s, zp], name=f"{lname}/{role}_dequant")

    def weight_dq(self, lname: str, mod: QuantMixin) -> str:
        try:
            q, scale, qmin, qmax = weight_integers(mod)
        except ExportError as exc:
            raise ExportError(f"layer {lname!r}: {exc}") from None
        t = self.weight_type(lname, mod.w_bits, qmin, qmax)
        per_axis = scale.numel() > 1
        s_arr = scale.numpy().astype(np.float32)
        if not per_axis:
            s_arr = s_arr.reshape(())
        wq = self.int_init(f"{lname}.weight_quant", q.numpy(), t)
        s = self.init(f"{lname}.weight_scale", s_arr)
        zp = self.int_init(f"{lname}.weight_zero_point", np.zeros(s_arr.shape, np.int64), t)
        attrs = {"axis": 0} if per_axis else {}
        self.layer_info["w_type"] = t.name
        return self.op("DequantizeLinear", [wq, s, zp], name=f"{lname}/weight_dequant", **attrs)

    @_handles_module(QuantMixin)
    def quant_layer(self, lname: str, mod: QuantMixin, node: fx.Node, x: str) -> str:
        self.layer_info = {"name": lname, "op": type(mod).__name__, "w_bits": mod.w_bits,
                           "a_bits": mod.a_bits, "w_type": "float", "a_type": "float"}
        if self.fp:
            self.layer_info.update(w_bits=FULL_PRECISION, a_bits=FULL_PRECISION)
        if not self.fp and mod.aq.enabled:
            x = self.act_qdq(lname, mod.aq, x)
        if not self.fp and mod.wq.enabled:
            w = self.weight_dq(lname, mod)
        else:
            w = self.init(f"{lname}.weight", _np(mod.weight))
        self.layers.append(self.layer_info)
        y = self.float_layer(lname, mod, node, x, w)
        oq = getattr(mod, "oq", None)  # the output quantizer of a folded convolution
        if not self.fp and isinstance(oq, Quantizer) and oq.enabled:
            y = self.act_qdq(lname, oq, y, role="output")
        return y

    @_handles_module(Quantizer)
    def quantizer(self, lname: str, mod: Quantizer, node: fx.Node, x: str) -> str:
        """A quantizer on its own (a residual quantizer of :mod:`mpqkit.export.deploy`)."""
        if self.fp or not mod.enabled:
            return x
        scale, qmin, qmax = mod.qparams(None)
        self.residual.append({"name": lname, "bits": mod.bits, "range": [qmin, qmax],
                              "scale": float(scale.reshape(-1)[0])})
        return self.act_qdq(lname, mod, x, role="residual")

    def float_layer(self, lname: str, mod: nn.Module, node: fx.Node, x: str, w: str) -> str:
        b = self.init(f"{lname}.bias", _np(mod.bias)) if mod.bias is not None else None
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros":
                raise _Unsupported(f"padding_mode={mod.padding_mode!r}")
            if isinstance(mod.padding, str):
                r = [int(v) for v in mod._reversed_padding_repeated_twice]
                pads = [r[2], r[0], r[3], r[1]]
            else:
                ph, pw = _pair(mod.padding)
                pads = [ph, pw, ph, pw]
            return self.op("Conv", [x, w] + ([b] if b else []), name=lname,
                           kernel_shape=list(_pair(mod.kernel_size)),
                           strides=list(_pair(mod.stride)), pads=pads,
                           dilations=list(_pair(mod.dilation)), group=int(mod.groups))
        if isinstance(mod, nn.Linear):
            rank = len(self.shape(node.args[0]))
            if rank == 2:
                return self.op("Gemm", [x, w] + ([b] if b else []), name=lname, transB=1)
            wt = self.op("Transpose", [w], name=f"{lname}/weight_t", perm=[1, 0])
            y = self.op("MatMul", [x, wt], name=lname)
            return self.op("Add", [y, b], name=f"{lname}/bias") if b else y
        raise _Unsupported("a quantized layer type without an ONNX form")

    # -- modules -------------------------------------------------------------------------------
    def module(self, lname: str, mod: nn.Module, node: fx.Node, args: Sequence[Any],
               kwargs: Mapping[str, Any]) -> Any:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, str):
            raise _Unsupported("a call without a tensor input")
        for types, exact, method in _MODULE_HANDLERS:
            if (type(mod) in types) if exact else isinstance(mod, types):
                return method(self, lname, mod, node, x)
        raise _Unsupported(f"{type(mod).__name__} has no ONNX form in mpqkit's exporter")

    @_handles_module(nn.Conv2d, nn.Linear, exact=True)
    def _mod_float_layer(self, lname: str, mod: nn.Conv2d | nn.Linear, node: fx.Node,
                         x: str) -> str:
        self.layers.append({"name": lname, "op": type(mod).__name__,
                            "w_bits": FULL_PRECISION, "a_bits": FULL_PRECISION,
                            "w_type": "float", "a_type": "float"})
        return self.float_layer(lname, mod, node, x, self.init(f"{lname}.weight",
                                                                _np(mod.weight)))

    @_handles_module(nn.BatchNorm1d, nn.BatchNorm2d)
    def _mod_batchnorm(self, lname: str, mod: nn.BatchNorm1d | nn.BatchNorm2d, node: fx.Node,
                       x: str) -> str:
        if mod.running_mean is None or mod.running_var is None:
            raise _Unsupported("BatchNorm without running statistics")
        c = mod.num_features
        g = _np(mod.weight) if mod.weight is not None else np.ones(c, np.float32)
        bb = _np(mod.bias) if mod.bias is not None else np.zeros(c, np.float32)
        ins = [x, self.init(f"{lname}.weight", g), self.init(f"{lname}.bias", bb),
               self.init(f"{lname}.running_mean", _np(mod.running_mean)),
               self.init(f"{lname}.running_var", _np(mod.running_var))]
        return self.op("BatchNormalization", ins, name=lname, epsilon=float(mod.eps))

    @_handles_module(nn.LayerNorm)
    def _mod_layer_norm(self, lname: str, mod: nn.LayerNorm, node: fx.Node, x: str) -> str:
        w = self.init(f"{lname}.weight", _np(mod.weight)) if mod.weight is not None else None
        b = self.init(f"{lname}.bias", _np(mod.bias)) if mod.bias is not None else None
        return self.layer_norm(node.args[0], x, mod.normalized_shape, w, b, mod.eps, lname)

    @_handles_module(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
    def _mod_identity(self, lname: str, mod: nn.Module, node: fx.Node, x: str) -> str:
        return x

    @_handles_module(nn.ReLU)
    def _mod_relu(self, lname: str, mod: nn.ReLU, node: fx.Node, x: str) -> str:
        return self.op("Relu", [x], name=lname)

    @_handles_module(nn.ReLU6)  # before Hardtanh, its base class
    def _mod_relu6(self, lname: str, mod: nn.ReLU6, node: fx.Node, x: str) -> str:
        return self.clip(x, 0.0, 6.0, lname)

    @_handles_module(nn.Hardtanh)
    def _mod_hardtanh(self, lname: str, mod: nn.Hardtanh, node: fx.Node, x: str) -> str:
        return self.clip(x, mod.min_val, mod.max_val, lname)

    @_handles_module(nn.LeakyReLU)
    def _mod_leaky_relu(self, lname: str, mod: nn.LeakyReLU, node: fx.Node, x: str) -> str:
        return self.op("LeakyRelu", [x], name=lname, alpha=float(mod.negative_slope))

    @_handles_module(nn.Sigmoid)
    def _mod_sigmoid(self, lname: str, mod: nn.Sigmoid, node: fx.Node, x: str) -> str:
        return self.op("Sigmoid", [x], name=lname)

    @_handles_module(nn.Tanh)
    def _mod_tanh(self, lname: str, mod: nn.Tanh, node: fx.Node, x: str) -> str:
        return self.op("Tanh", [x], name=lname)

    @_handles_module(nn.SiLU)
    def _mod_silu(self, lname: str, mod: nn.SiLU, node: fx.Node, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x], name=f"{lname}/sigmoid")],
                       name=lname)

    @_handles_module(nn.Hardswish)
    def _mod_hardswish(self, lname: str, mod: nn.Hardswish, node: fx.Node, x: str) -> str:
        return self.hardswish(x, lname)

    @_handles_module(nn.Hardsigmoid)
    def _mod_hardsigmoid(self, lname: str, mod: nn.Hardsigmoid, node: fx.Node, x: str) -> str:
        return self.op("HardSigmoid", [x], name=lname, alpha=1.0 / 6, beta=0.5)

    @_handles_module(nn.GELU)
    def _mod_gelu(self, lname: str, mod: nn.GELU, node: fx.Node, x: str) -> str:
        return self.gelu(x, mod.approximate, lname)

    @_handles_module(nn.Softmax)
    def _mod_softmax(self, lname: str, mod: nn.Softmax, node: fx.Node, x: str) -> str:
        return self.op("Softmax", [x], name=lname, axis=self.axis(node.args[0], mod.dim))

    @_handles_module(nn.Flatten)
    def _mod_flatten(self, lname: str, mod: nn.Flatten, node: fx.Node, x: str) -> str:
        return self.flatten(node.args[0], x, mod.start_dim, mod.end_dim, lname)

    @_handles_module(nn.AdaptiveAvgPool2d)
    def _mod_adaptive_avg(self, lname: str, mod: nn.AdaptiveAvgPool2d, node: fx.Node,
                          x: str) -> str:
        return self.adaptive_avg(node.args[0], x, mod.output_size, lname)

    @_handles_module(nn.MaxPool2d)
    def _mod_max_pool(self, lname: str, mod: nn.MaxPool2d, node: fx.Node, x: str) -> str:
        if mod.return_indices:
            raise _Unsupported("return_indices=True")
        return self.pool("MaxPool", x, mod.kernel_size, mod.stride, mod.padding,
                         mod.ceil_mode, lname, dilation=mod.dilation)

    @_handles_module(nn.AvgPool2d)
    def _mod_avg_pool(self, lname: str, mod: nn.AvgPool2d, node: fx.Node, x: str) -> str:
        if mod.divisor_override:
            raise _Unsupported("divisor_override")
        return self.pool("AveragePool", x, mod.kernel_size, mod.stride, mod.padding,
                         mod.ceil_mode, lname, count_include_pad=mod.count_include_pad)

    # -- shared op builders ----------------------------------------------------------------------
    def clip(self, x: str, lo: float, hi: float, name: str | None = None) -> str:
        return self.op("Clip", [x, self.const_f32(lo), self.const_f32(hi)], name=name)

    def hardswish(self, x: str, name: str | None) -> str:
        if self.opset >= 14:
            return self.op("HardSwish", [x], name=name)
        return self.op("Mul", [x, self.op("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)],
                       name=name)

    def gelu(self, x: str, approximate: str, name: str | None) -> str:
        if self.opset >= 20:
            return self.op("Gelu", [x], name=name, approximate=approximate)
        if approximate != "none":
            raise _Unsupported("GELU with approximate='tanh' below opset 20")
        e = self.op("Erf", [self.op("Div", [x, self.const_f32(math.sqrt(2.0))])])
        return self.op("Mul", [self.op("Mul", [x, self.const_f32(0.5)]),
                               self.op("Add", [e, self.const_f32(1.0)])], name=name)

    def layer_norm(self, src: Any, x: str, normalized_shape: Sequence[int], w: str | None,
                   b: str | None, eps: float, name: str) -> str:
        """LayerNormalization over the last ``len(normalized_shape)`` axes (opset >= 17;
        mean / variance / scale nodes below)."""
        shape = self.shape(src)
        k = len(tuple(normalized_shape))
        if tuple(shape[len(shape) - k:]) != tuple(normalized_shape):
            raise _Unsupported(f"layer norm over {tuple(normalized_shape)} of a tensor of shape "
                               f"{shape}")
        if self.opset >= 17:
            w = w or self.init(f"{name}.weight", np.ones(normalized_shape, np.float32))
            return self.op("LayerNormalization", [x, w] + ([b] if b else []), name=name,
                           axis=len(shape) - k, epsilon=float(eps))
        axes = list(range(len(shape) - k, len(shape)))
        mean = self.op("ReduceMean", [x], axes=axes, keepdims=1)
        d = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Mul", [d, d])], axes=axes, keepdims=1)
        y = self.op("Div", [d, self.op("Sqrt", [self.op("Add", [var, self.const_f32(eps)])])],
                    name=None if (w or b) else name)
        if w:
            y = self.op("Mul", [y, w], name=None if b else name)
        return self.op("Add", [y, b], name=name) if b else y

    def axis(self, src: Any, dim: int | None) -> int:
        rank = len(self.shape(src))
        if dim is None:
            raise _Unsupported("an implicit dim")
        return int(dim) % rank

    def flatten(self, src: Any, x: str, start: int, end: int, name: str | None) -> str:
        shape = self.shape(src)
        rank = len(shape)
        start, end = start % rank, end % rank
        if start == 1 and end == rank - 1:
            return self.op("Flatten", [x], name=name, axis=1)
        target = ([0] if start > 0 else []) + list(shape[1:start]) + [-1] + list(shape[end + 1:])
        return self.op("Reshape", [x, self.const_i64(target)], name=name)

    def adaptive_avg(self, src: Any, x: str, size: Any, name: str | None) -> str:
        h, w = self.shape(src)[-2:]
        oh, ow = (size, size) if isinstance(size, int) else tuple(size)
        oh, ow = oh or h, ow or w
        if (oh, ow) == (1, 1):
            return self.op("GlobalAveragePool", [x], name=name)
        if h % oh == 0 and w % ow == 0:
            k = [h // oh, w // ow]
            return self.op("AveragePool", [x], name=name, kernel_shape=k, strides=k)
        # any other sizes (e.g. VGG's 7x7 after a 2x2 map): PyTorch's bins as two averaging
        # matrices, A_h @ x @ A_w^T
        rows = self.init(f"{name}/rows", _adaptive_matrix(h, oh))
        cols = self.init(f"{name}/cols", _adaptive_matrix(w, ow).T.copy())
        return self.op("MatMul", [self.op("MatMul", [rows, x]), cols], name=name)

    def pool(self, op_type: str, x: str, kernel: Any, stride: Any, padding: Any,
             ceil_mode: bool, name: str | None, **extra: Any) -> str:
        k = list(_pair(kernel))
        s = list(_pair(stride if stride not in (None, [], ()) else kernel))
        p = list(_pair(padding))
        attrs: dict[str, Any] = {"kernel_shape": k, "strides": s, "pads": p + p,
                                 "ceil_mode": int(bool(ceil_mode))}
        if "dilation" in extra:
            attrs["dilations"] = list(_pair(extra["dilation"]))
        if "count_include_pad" in extra:
            attrs["count_include_pad"] = int(bool(extra["count_include_pad"]))
        return self.op(op_type, [x], name=name, **attrs)

    def tensor_or_const(self, v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Unsupported(f"an operand of type {type(v).__name__}")
        return self.const_f32(float(v))

    # -- functions and tensor methods ------------------------------------------------------------
    def function(self, node: fx.Node, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        call = _Call(node, _canon(node), args, kwargs)
        handler = _FUNCTION_HANDLERS.get(call.name)
        if (handler is None or handler.tensor_input) and not isinstance(call.a0, str):
            raise _Unsupported("a call whose first argument is not a tensor")
        if handler is None:
            raise _Unsupported("no ONNX form in mpqkit's exporter")
        return handler.method(self, call)

    @_handles("add", "sub", "mul", "div", "floordiv", tensor_input=False)
    def _fn_arith(self, c: _Call) -> Any:
        other = c.arg(1, "other")
        if c.name in ("add", "sub") and c.arg(2, "alpha", 1) != 1:
            raise _Unsupported("alpha != 1")
        if not isinstance(c.a0, str) and not isinstance(other, str):
            return self.dyn_arith(c.name, c.a0, other)
        if c.name == "floordiv":
            raise _Unsupported("floor division of tensors")
        onnx_op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}[c.name]
        return self.op(onnx_op, [self.tensor_or_const(c.a0), self.tensor_or_const(other)],
                       name=c.node.name)

    @_handles("eq", "ne", "lt", "le", "gt", "ge", tensor_input=False)
    def _fn_compare(self, c: _Call) -> bool:
        # comparisons of values known when exporting (a tensor's ndim, its static sizes), as
        # in timm's shape asserts; tensors and the batch size have no Python truth value here
        a, b = c.a0, c.arg(1, "other")
        if any(isinstance(v, str | _Dyn) for v in (a, b)):
            raise _Unsupported("a comparison of run-time values (a data-dependent branch)")
        return bool(getattr(operator, c.name)(a, b))

    @_handles("_assert", tensor_input=False)
    def _fn_assert(self, c: _Call) -> None:
        cond = c.a0
        if not isinstance(cond, bool | int):
            raise _Unsupported("an assertion on run-time values")
        if not cond:
            raise _Unsupported(f"the model's assertion fails ({c.arg(1, 'message', '')})")
        return None

    @_handles("identity", tensor_input=False)
    def _fn_identity(self, c: _Call) -> Any:
        return c.a0

    @_handles("getattr", tensor_input=False)
    def _fn_getattr(self, c: _Call) -> Any:
        if isinstance(c.a0, str) and c.args[1] == "shape":
            return self.size_of(c.src, None)
        if isinstance(c.a0, str) and c.args[1] == "ndim":
            return len(self.shape(c.src))
        raise _Unsupported(f"attribute {c.args[1]!r} of a tensor")

    @_handles("size", tensor_input=False)
    def _fn_size(self, c: _Call) -> Any:
        return self.size_of(c.src, c.arg(1, "dim"))

    @_handles("getitem", tensor_input=False)
    def _fn_getitem(self, c: _Call) -> Any:
        if isinstance(c.a0, str):
            return self.getitem(c.src, c.a0, c.args[1], c.node.name)
        if isinstance(c.a0, tuple | list):
            return c.a0[c.args[1]]
        raise _Unsupported("indexing a non-tensor value")

    @_handles("relu")
    def _fn_relu(self, c: _Call) -> str:
        return self.op("Relu", [c.a0], name=c.node.name)

    @_handles("relu6")
    def _fn_relu6(self, c: _Call) -> str:
        return self.clip(c.a0, 0.0, 6.0, c.node.name)

    @_handles("hardtanh")
    def _fn_hardtanh(self, c: _Call) -> str:
        return self.clip(c.a0, c.arg(1, "min_val", -1.0), c.arg(2, "max_val", 1.0), c.node.name)

    @_handles("leaky_relu")
    def _fn_leaky_relu(self, c: _Call) -> str:
        return self.op("LeakyRelu", [c.a0], name=c.node.name,
                       alpha=float(c.arg(1, "negative_slope", 0.01)))

    @_handles("sigmoid", "tanh")
    def _fn_sigmoid_tanh(self, c: _Call) -> str:
        return self.op(c.name.capitalize(), [c.a0], name=c.node.name)

    @_handles("silu")
    def _fn_silu(self, c: _Call) -> str:
        return self.op("Mul", [c.a0, self.op("Sigmoid", [c.a0])], name=c.node.name)

    @_handles("hardswish")
    def _fn_hardswish(self, c: _Call) -> str:
        return self.hardswish(c.a0, c.node.name)

    @_handles("hardsigmoid")
    def _fn_hardsigmoid(self, c: _Call) -> str:
        return self.op("HardSigmoid", [c.a0], name=c.node.name, alpha=1.0 / 6, beta=0.5)

    @_handles("gelu")
    def _fn_gelu(self, c: _Call) -> str:
        return self.gelu(c.a0, c.arg(1, "approximate", "none"), c.node.name)

    @_handles("softmax")
    def _fn_softmax(self, c: _Call) -> str:
        return self.op("Softmax", [c.a0], name=c.node.name,
                       axis=self.axis(c.src, c.arg(1, "dim")))

    @_handles("flatten")
    def _fn_flatten(self, c: _Call) -> str:
        return self.flatten(c.src, c.a0, c.arg(1, "start_dim", 0), c.arg(2, "end_dim", -1),
                            c.node.name)

    @_handles("adaptive_avg_pool2d")
    def _fn_adaptive_avg_pool2d(self, c: _Call) -> str:
        return self.adaptive_avg(c.src, c.a0, c.arg(1, "output_size"), c.node.name)

    @_handles("max_pool2d")
    def _fn_max_pool2d(self, c: _Call) -> str:
        kernel, stride = c.arg(1, "kernel_size"), c.arg(2, "stride")
        padding = c.arg(3, "padding", 0)
        if c.arg(6, "return_indices", False):
            raise _Unsupported("return_indices=True")
        return self.pool("MaxPool", c.a0, kernel, stride, padding, c.arg(5, "ceil_mode", False),
                         c.node.name, dilation=c.arg(4, "dilation", 1))

    @_handles("avg_pool2d")
    def _fn_avg_pool2d(self, c: _Call) -> str:
        kernel, stride = c.arg(1, "kernel_size"), c.arg(2, "stride")
        padding = c.arg(3, "padding", 0)
        if c.arg(6, "divisor_override"):
            raise _Unsupported("divisor_override")
        return self.pool("AveragePool", c.a0, kernel, stride, padding,
                         c.arg(4, "ceil_mode", False), c.node.name,
                         count_include_pad=c.arg(5, "count_include_pad", True))

    @_handles("pad")
    def _fn_pad(self, c: _Call) -> str:
        return self.pad(c.src, c.a0, c.arg(1, "pad"), c.arg(2, "mode", "constant"),
                        c.arg(3, "value", None), c.node.name)

    @_handles("cat", tensor_input=False)
    def _fn_cat(self, c: _Call) -> str:
        tensors = c.arg(0, "tensors")
        if not all(isinstance(t, str) for t in tensors):
            raise _Unsupported("concatenating non-tensors")
        dim = c.arg(1, "dim", 0)
        return self.op("Concat", list(tensors), name=c.node.name,
                       axis=self.axis(c.node.args[0][0], dim))

    @_handles("mean")
    def _fn_mean(self, c: _Call) -> str:
        dim = c.arg(1, "dim")
        keep = bool(c.arg(2, "keepdim", False))
        rank = len(self.shape(c.src))
        dims = list(range(rank)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        axes = [int(d) % rank for d in dims]
        if self.opset >= 18:
            return self.op("ReduceMean", [c.a0, self.const_i64(axes)], name=c.node.name,
                           keepdims=int(keep))
        return self.op("ReduceMean", [c.a0], name=c.node.name, axes=axes, keepdims=int(keep))

    @_handles("reshape")
    def _fn_reshape(self, c: _Call) -> str:
        shape = list(c.args[1:])
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = list(shape[0])
        if "shape" in c.kwargs:
            shape = list(c.kwargs["shape"])
        return self.op("Reshape", [c.a0, self.shape_tensor(shape)], name=c.node.name)

    @_handles("permute")
    def _fn_permute(self, c: _Call) -> str:
        dims = list(c.args[1:])
        if len(dims) == 1 and isinstance(dims[0], tuple | list):
            dims = list(dims[0])
        if "dims" in c.kwargs:
            dims = list(c.kwargs["dims"])
        rank = len(self.shape(c.src))
        return self.op("Transpose", [c.a0], name=c.node.name, perm=[int(d) % rank for d in dims])

    @_handles("transpose")
    def _fn_transpose(self, c: _Call) -> str:
        rank = len(self.shape(c.src))
        d0 = int(c.arg(1, "dim0")) % rank
        d1 = int(c.arg(2, "dim1")) % rank
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.op("Transpose", [c.a0], name=c.node.name, perm=perm)

    @_handles("unsqueeze")
    def _fn_unsqueeze(self, c: _Call) -> str:
        rank = len(self.shape(c.src)) + 1
        d = int(c.arg(1, "dim")) % rank
        return self.op("Unsqueeze", [c.a0, self.const_i64([d])], name=c.node.name)

    @_handles("squeeze")
    def _fn_squeeze(self, c: _Call) -> str:
        shape = self.shape(c.src)
        dim = c.arg(1, "dim")
        dims = [i for i, s in enumerate(shape) if s == 1 and i > 0] if dim is None else (
            [dim] if isinstance(dim, int) else list(dim))
        axes = [int(d) % len(shape) for d in dims if shape[int(d) % len(shape)] == 1]
        if not axes:
            return c.a0
        return self.op("Squeeze", [c.a0, self.const_i64(axes)], name=c.node.name)

    @_handles("batch_norm")
    def _fn_batch_norm(self, c: _Call) -> str:
        # F.batch_norm on running statistics (timm's BatchNormAct2d)
        mean, var = c.arg(1, "running_mean"), c.arg(2, "running_var")
        w, b = c.arg(3, "weight"), c.arg(4, "bias")
        if c.arg(5, "training", False) or not isinstance(mean, str) or not isinstance(var, str):
            raise _Unsupported("batch norm on batch statistics (training mode, or no running "
                               "statistics)")
        ch = self.shape(c.src)[1]
        w = w if isinstance(w, str) else self.init(f"{c.node.name}.weight", np.ones(ch, np.float32))
        b = b if isinstance(b, str) else self.init(f"{c.node.name}.bias", np.zeros(ch, np.float32))
        return self.op("BatchNormalization", [c.a0, w, b, mean, var], name=c.node.name,
                       epsilon=float(c.arg(7, "eps", 1e-5)))

    @_handles("layer_norm")
    def _fn_layer_norm(self, c: _Call) -> str:
        w, b = c.arg(2, "weight"), c.arg(3, "bias")
        if not all(v is None or isinstance(v, str) for v in (w, b)):
            raise _Unsupported("a layer norm weight or bias that is not a tensor")
        return self.layer_norm(c.src, c.a0, tuple(c.arg(1, "normalized_shape")), w, b,
                               c.arg(4, "eps", 1e-5), c.node.name)

    @_handles("chunk")
    def _fn_chunk(self, c: _Call) -> tuple[str, ...]:
        shape = self.shape(c.src)
        axis = self.axis(c.src, c.arg(2, "dim", 0))
        chunks = int(c.arg(1, "chunks"))
        each = -(-shape[axis] // chunks)  # torch.chunk: ceil-sized pieces, the last smaller
        sizes = [min(each, shape[axis] - i) for i in range(0, shape[axis], each)]
        return self.split(c.a0, axis, sizes, c.node.name)

    @_handles("split")
    def _fn_split(self, c: _Call) -> tuple[str, ...]:
        shape = self.shape(c.src)
        axis = self.axis(c.src, c.arg(2, "dim", 0))
        sizes = c.arg(1, "split_size_or_sections", c.kwargs.get("split_size"))
        if isinstance(sizes, int):
            sizes = [min(sizes, shape[axis] - i) for i in range(0, shape[axis], sizes)]
        if not all(isinstance(v, int) for v in sizes) or sum(sizes) != shape[axis]:
            raise _Unsupported(f"split sizes {sizes!r}")
        return self.split(c.a0, axis, list(sizes), c.node.name)

    def split(self, x: str, axis: int, sizes: Sequence[int], name: str) -> tuple[str, ...]:
        if len(sizes) == 1:
            return (x,)
        return self.op_multi("Split", [x, self.const_i64(list(sizes))], len(sizes), name,
                             axis=axis)

    @_handles("stochastic_depth")
    def _fn_stochastic_depth(self, c: _Call) -> str:
        # torchvision.ops.stochastic_depth: the identity at inference (training=False)
        if c.arg(3, "training", True):
            raise _Unsupported("stochastic depth in training mode")
        return c.a0

    def size_of(self, src: Any, dim: int | None) -> Any:
        shape = self.shape(src)
        dims: list[Any] = [self.batch_size(), *shape[1:]]
        if dim is None:
            return tuple(dims)
        return dims[int(dim) % len(shape)]

    def pad(self, src: Any, x: str, pad: Sequence[int], mode: str, value: float | None,
            name: str) -> str:
        rank = len(self.shape(src))
        if not all(isinstance(p, int) for p in pad) or len(pad) % 2 or len(pad) > 2 * rank:
            raise _Unsupported(f"pad={pad!r}")
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(pad) // 2):
            d = rank - 1 - i
            begins[d], ends[d] = int(pad[2 * i]), int(pad[2 * i + 1])
        modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}
        if mode not in modes:
            raise _Unsupported(f"padding mode {mode!r}")
        ins = [x, self.const_i64(begins + ends)]
        if mode == "constant":
            ins.append(self.const_f32(0.0 if value is None else float(value)))
        return self.op("Pad", ins, name=name, mode=modes[mode])

    def getitem(self, src: Any, x: str, idx: Any, name: str) -> str:
        shape = self.shape(src)
        rank = len(shape)
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(i is None for i in items):
            raise _Unsupported("indexing with None (new axes)")
        if sum(1 for i in items if i is Ellipsis) > 1:
            raise _Unsupported("more than one Ellipsis")
        if Ellipsis in items:
            k = items.index(Ellipsis)
            items = items[:k] + [slice(None)] * (rank - len(items) + 1) + items[k + 1:]
        if len(items) > rank:
            raise _Unsupported("more indices than dimensions")
        starts, ends, axes, steps, squeeze = [], [], [], [], []
        for d, it in enumerate(items):
            if isinstance(it, bool) or not isinstance(it, int | slice):
                raise _Unsupported(f"an index of type {type(it).__name__}")
            if isinstance(it, int):
                starts.append(it)
                ends.append(it + 1 if it != -1 else _I64_MAX)
                axes.append(d)
                steps.append(1)
                squeeze.append(d)
                continue
            if it == slice(None):
                continue
            if not all(v is None or isinstance(v, int) for v in (it.start, it.stop, it.step)):
                raise _Unsupported("a slice with run-time bounds")
            step = 1 if it.step is None else it.step
            if step <= 0:
                raise _Unsupported("a non-positive slice step")
            starts.append(0 if it.start is None else it.start)
            ends.append(_I64_MAX if it.stop is None else it.stop)
            axes.append(d)
            steps.append(step)
        y = x
        if axes:
            y = self.op("Slice", [x, self.const_i64(starts), self.const_i64(ends),
                                  self.const_i64(axes), self.const_i64(steps)], name=name)
        if squeeze:
            y = self.op("Squeeze", [y, self.const_i64(squeeze)])
        return y


def _adaptive_matrix(n: int, out: int) -> np.ndarray:
    """``out x n``: row ``i`` averages PyTorch's adaptive-pooling bin ``[floor(i n / out),
    ceil((i + 1) n / out))``."""
    m = np.zeros((out, n), np.float32)
    for i in range(out):
        lo, hi = (i * n) // out, -(-((i + 1) * n) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _fetch_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise _Unsupported(f"a non-tensor attribute {target!r}")
    return obj


def _np(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu()
    if a.is_floating_point():
        a = a.float()
    return a.contiguous().numpy().copy()


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _policy_json(model: nn.Module, meta: Mapping[str, Any] | None,
                 input_size: tuple[int, int]) -> str | None:
    if meta and meta.get("policy"):
        return json.dumps(meta["policy"], separators=(",", ":"))
    if not any(isinstance(m, QuantMixin) for m in model.modules()):
        return None
    from mpqkit.policy import Policy

    bits = {n: ((m.w_bits, m.a_bits) if isinstance(m, QuantMixin) else
                (FULL_PRECISION, FULL_PRECISION)) for n, m in quantizable_layers(model).items()}
    return Policy.from_bits(model, bits, input_size).to_json()


def export_onnx(model: nn.Module, path: str | Path, *, input_size: int | Sequence[int] = 32,
                in_channels: int = 3, opset: int = DEFAULT_OPSET, fp: bool = False,
                int_types: str = "int8", meta: Mapping[str, Any] | None = None,
                fold_bn: bool = True, residual_quant: bool = True) -> dict[str, Any]:
    """Write ``model`` as ONNX: QDQ around every quantized layer, or all float with ``fp``.

    ``meta`` (checkpoint metadata, optional) supplies the policy and the model description
    written into ``metadata_props``; without it the policy is derived from the model's bits.
    Returns a summary: path, opset, bytes and one entry per exported Conv/Linear layer with its
    bits and the ONNX types used. Raises :class:`ExportError` with a one-line message when the
    model, the opset or an op cannot be exported. ``fold_bn`` (default): write the deployment
    form of :func:`~mpqkit.export.deploy.deployment_model`, every BatchNorm after a quantized
    convolution folded into it (``folded_at_export`` in the summary names the layers trained
    unfolded); without it, BatchNorms trained unfolded stay BatchNormalization nodes.
    ``residual_quant`` (default): 8-bit residual quantizers on the residual adds of quantized
    values (:mod:`mpqkit.export.deploy`; ``residual_quant`` in the summary lists them), so that
    onnxruntime runs those adds on integers; the model the file computes is then
    :func:`~mpqkit.export.deploy.export_reference`. The graph is finally put in the form
    onnxruntime fuses into integer kernels by exact rewrites (:mod:`mpqkit.export.qdq_rewrite`;
    ``rewrites`` in the summary counts them).
    """
    from mpqkit import __version__
    from mpqkit.export.deploy import deployment_model

    check_opset(opset)
    if int_types not in INT_TYPES:
        raise ExportError(f"int_types={int_types!r} is unknown: use one of {', '.join(INT_TYPES)}")
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(hw) != 2:
        raise ExportError(f"input size {input_size!r} is invalid: give one int or (height, width)")
    if fp and any(isinstance(m, QuantMixin) for m in model.modules()):
        from mpqkit.quant import dequantize_model

        model = dequantize_model(model)  # a copy: tracing never touches the quantizers
    at_export: list[str] = []
    if not fp and (fold_bn or any(isinstance(m, QConvBn2d) for m in model.modules())):
        try:
            model, at_export = deployment_model(model, residual_quant)  # a copy, eval mode
        except ConfigError as exc:
            raise ExportError(str(exc)) from None
    was_training = model.training
    device = next(iter(model.parameters()), torch.zeros(())).device
    model.eval().cpu()
    try:
        conv = _Converter(model, (in_channels, int(hw[0]), int(hw[1])), opset, fp, int_types)
        graph = conv.convert()
        rewrites = {} if fp else integer_kernel_form(graph)
        policy = None if fp else _policy_json(model, meta, (int(hw[0]), int(hw[1])))
    finally:
        model.to(device).train(was_training)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="mpqkit",
                              producer_version=__version__)
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    props = {"mpqkit.version": __version__, "mpqkit.float": "1" if fp else "0",
             "mpqkit.int_types": int_types,
             "mpqkit.input_size": json.dumps([int(hw[0]), int(hw[1])])}
    if policy is not None:
        props["mpqkit.policy"] = policy
    for key in ("model", "num_classes", "dataset", "mean", "std", "quant"):
        if meta and meta.get(key) is not None:
            v = meta[key]
            props[f"mpqkit.{key}"] = v if isinstance(v, str) else json.dumps(v)
    helper.set_model_props(proto, props)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker ({str(exc).splitlines()[0]}): "
                          "this is an mpqkit bug; please report it with the model") from None
    path = atomic_write(path, lambda p: onnx.save_model(proto, str(p)))
    return {"path": str(path), "format": "onnx", "opset": opset, "fp": fp,
            "int_types": int_types, "bytes": path.stat().st_size, "layers": conv.layers,
            "folded_at_export": at_export, "residual_quant": conv.residual,
            "rewrites": rewrites}


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, format: str = "onnx",
                      opset: int = DEFAULT_OPSET, fp: bool = False,
                      int_types: str = "int8", fold_bn: bool = True,
                      residual_quant: bool = True
                      ) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """Export a run's checkpoint (``RUN_DIR/best.safetensors``) as ONNX or a packed file.

    Returns ``(summary, model, meta)``: the export summary, and the PyTorch model the file
    computes (the checkpoint's model, with the residual quantizers of an ONNX export:
    :func:`~mpqkit.export.deploy.export_reference`) and the metadata (for verification).
    """
    from mpqkit.engine.trainer import load_checkpoint_model
    from mpqkit.export.packed import save_packed
    from mpqkit.quant import dequantize_model

    if format not in ("onnx", "packed"):
        raise ExportError(f"format {format!r} is unknown: use onnx or packed")
    if format == "packed" and fp:
        raise ExportError("--fp applies to --format onnx only: the packed format stores "
                          "quantized weights")
    try:
        model, meta = load_checkpoint_model(checkpoint)
    except MpqkitError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {checkpoint} ({str(exc).splitlines()[0][:120]}): "
                              "pass a checkpoint written by mpqkit train/finetune") from None
    if not meta.get("policy") and not fp:
        raise ExportError(f"{checkpoint} has no policy (a full-precision checkpoint): pass --fp "
                          "to export the float model, or a QAT checkpoint from mpqkit finetune")
    if format == "packed":
        return save_packed(model, out, meta), model, meta
    if fp:
        model = dequantize_model(model)
    size = meta.get("input_size") or (meta.get("policy") or {}).get("input_size") or 32
    summary = export_onnx(model, out, input_size=size if isinstance(size, int) else tuple(size),
                          opset=opset, fp=fp, int_types=int_types, meta=meta, fold_bn=fold_bn,
                          residual_quant=residual_quant)
    if not fp and residual_quant and summary["residual_quant"]:
        from mpqkit.export.deploy import export_reference

        model = export_reference(model)
    return summary, model, meta
