"""Exact rewrites of an exported QDQ graph so that onnxruntime runs integer kernels.

onnxruntime's CPU provider fuses ``DequantizeLinear -> op -> QuantizeLinear`` groups into
integer kernels (``QLinearConv``, ``QLinearAdd``, a ``MaxPool`` on uint8, ...) only when the
op's inputs come straight from ``DequantizeLinear`` nodes and its output goes to exactly one
``QuantizeLinear``. The converter writes the model's function node by node; these rewrites
reshape the graph into that form without changing a single value (every one is exact in float
arithmetic, so ``--verify`` is unaffected):

* ``DequantizeLinear -> Relu`` becomes an integer ``Clip(q, zero_point, type max) ->
  DequantizeLinear``: ``relu((q - z) * s) == (max(q, z) - z) * s``.
* ``DequantizeLinear -> Slice / Pad(0) / MaxPool / Flatten / Reshape`` becomes the same op on
  the integers followed by ``DequantizeLinear``: these ops only select, move or take the
  maximum of values (dequantization is increasing), and a zero Pad pads with the zero point,
  which dequantizes to 0. The op then runs on uint8 and its consumer reads a dequantized
  tensor (an ``Add`` after a zero-padded shortcut becomes ``QLinearAdd``).
* an ``Add`` of two dequantized tensors (with the ``Relu`` after it) whose output feeds several
  ``QuantizeLinear`` nodes is duplicated, one copy per ``QuantizeLinear``, so that each copy is
  one ``QLinearAdd`` (a residual add read by the next block's input quantizer and by the
  residual quantizer of :mod:`mpqkit.export.deploy`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_INT8_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
_GRID_OPS = ("Slice", "Pad", "MaxPool", "Flatten", "Reshape")



def unique_name(base: str, used: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3`` ... : the first not in ``used`` (which gets it)."""
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name

class _Rewriter:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.names = ({n.name for n in graph.node} | {o for n in graph.node for o in n.output}
                      | set(self.inits) | {i.name for i in graph.input})

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.graph.node for o in n.output}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                out.setdefault(i, []).append(n)
        return out

    def scalar(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return numpy_helper.to_array(t) if t is not None and not t.dims else None

    def per_tensor_dq(self, node: onnx.NodeProto | None) -> bool:
        """A DequantizeLinear with a scalar scale and an int8/uint8 scalar zero point."""
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) != 3:
            return False
        zp = self.inits.get(node.input[2])
        return (self.scalar(node.input[1]) is not None and zp is not None and not zp.dims
                and zp.data_type in _INT8_TYPES)

    def replace_nodes(self, nodes: Iterable[onnx.NodeProto]) -> None:
        nodes = list(nodes)
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    # -- the rewrites ----------------------------------------------------------------------------
    def relu_to_clip(self) -> int:
        """``DequantizeLinear -> Relu`` as ``Clip(q, zp, max) -> DequantizeLinear``."""
        prod, out, n_done = self.producers(), [], 0
        for node in self.graph.node:
            dq = prod.get(node.input[0]) if node.op_type == "Relu" else None
            if dq is None or not self.per_tensor_dq(dq):
                out.append(node)
                continue
            zp = self.inits[dq.input[2]]
            top = np.iinfo(_INT8_TYPES[zp.data_type]).max
            hi = self.fresh(f"{node.name}/int_max")
            self.inits[hi] = numpy_helper.from_array(np.array(top, _INT8_TYPES[zp.data_type]), hi)
            self.graph.initializer.append(self.inits[hi])
            clipped = self.fresh(f"{node.name}/int_relu:out")
            out.append(helper.make_node("Clip", [dq.input[0], dq.input[2], hi], [clipped],
                                        name=self.fresh(f"{node.name}/int_relu")))
            out.append(helper.make_node("DequantizeLinear", [clipped, dq.input[1], dq.input[2]],
                                        list(node.output), name=node.name))
            n_done += 1
        self.replace_nodes(out)
        return n_done

    def integer_grid_ops(self) -> int:
        """``DequantizeLinear -> grid op`` as ``grid op on the integers -> DequantizeLinear``
        (a zero Pad pads with the zero point)."""
        prod, out, n_done = self.producers(), [], 0
        for node in self.graph.node:
            dq = prod.get(node.input[0]) if node.op_type in _GRID_OPS else None
            if dq is None or not self.per_tensor_dq(dq) or not self._zero_pad(node):
                out.append(node)
                continue
            y = self.fresh(f"{node.output[0]}/int")
            inputs = [dq.input[0], *node.input[1:]]
            if node.op_type == "Pad":
                inputs = inputs[:2] + [dq.input[2]] + inputs[3:]
            moved = helper.make_node(node.op_type, inputs, [y], name=node.name)
            moved.attribute.extend(node.attribute)
            new_dq = helper.make_node("DequantizeLinear", [y, dq.input[1], dq.input[2]],
                                      list(node.output), name=self.fresh(f"{node.name}/dequant"))
            out.extend([moved, new_dq])
            prod[node.output[0]] = new_dq
            n_done += 1
        self.replace_nodes(out)
        return n_done

    def _zero_pad(self, node: onnx.NodeProto) -> bool:
        """Not a Pad, or a constant Pad with the value 0 (the dequantized zero point)."""
        if node.op_type != "Pad":
            return True
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        value = self.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        return mode == b"constant" and value is not None and float(value) == 0.0

    def split_adds(self) -> int:
        """One copy of ``Add [-> Relu]`` per QuantizeLinear that reads it."""
        prod, cons = self.producers(), self.consumers()
        after: dict[str, list[onnx.NodeProto]] = {}  # copies, by the node they follow
        for node in self.graph.node:
            if node.op_type != "Add" or not all(self.per_tensor_dq(prod.get(i))
                                                for i in node.input):
                continue
            chain = [node]
            users = cons.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Relu":
                chain.append(users[0])
                users = cons.get(users[0].output[0], [])
            if len(users) < 2 or not all(u.op_type == "QuantizeLinear" for u in users):
                continue
            copies = after.setdefault(chain[-1].output[0], [])
            for user in users[1:]:
                x = list(node.input)
                for n in chain:
                    y = self.fresh(f"{n.output[0]}/copy")
                    copies.append(helper.make_node(n.op_type, x, [y],
                                                   name=self.fresh(f"{n.name}/copy")))
                    x = [y]
                user.input[0] = x[0]
        nodes = []
        for n in self.graph.node:
            nodes.append(n)
            nodes.extend(after.get(n.output[0], []))
        self.replace_nodes(nodes)
        return len(after)


    def drop_unused(self) -> int:
        """Remove the nodes whose outputs nothing reads (a DequantizeLinear a rewrite left)."""
        outputs = {o.name for o in self.graph.output}
        dropped = 0
        while True:
            read = {i for n in self.graph.node for i in n.input} | outputs
            keep = [n for n in self.graph.node if any(o in read for o in n.output)]
            if len(keep) == len(self.graph.node):
                return dropped
            dropped += len(self.graph.node) - len(keep)
            self.replace_nodes(keep)


def integer_kernel_form(graph: onnx.GraphProto) -> dict[str, int]:
    """Apply the rewrites of the module docstring to ``graph`` in place; how many of each."""
    r = _Rewriter(graph)
    done = {"relu_to_clip": r.relu_to_clip(), "integer_grid_ops": r.integer_grid_ops(),
            "split_adds": r.split_adds()}
    r.drop_unused()
    return done
