"""Appending plain ONNX nodes to a graph: what a transfer row's ONNX f and F (and a local loss) are written with.

Every node is one whose gradient onnxruntime-training implements (Relu, Exp, Log, Abs, Tanh, Sigmoid, Add, Mul,
...). A builder is ``(g: OnnxNodes, t: str, kw: dict) -> str``: it reads the value named ``t`` and returns the name
of its result.

Example:
    >>> import onnx
    >>> g = OnnxNodes(onnx.GraphProto())
    >>> g.clamp("t", 0.0, 6.0).startswith("lw_sub_")
    True
    >>> [n.op_type for n in g.graph.node]
    ['Add', 'Relu', 'Add', 'Add', 'Relu', 'Sub']
"""
from __future__ import annotations

from typing import Any, Callable

import onnx
from onnx import TensorProto, helper


class OnnxNodes:
    """Appends plain ONNX nodes (whose gradients onnxruntime-training implements) to a graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph, self.count = graph, 0

    def __call__(self, op: str, *ins: str, _out: str | None = None, **attrs: Any) -> str:
        self.count += 1
        out = _out or f"lw_{op.lower()}_{self.count}"
        self.graph.node.append(helper.make_node(op, list(ins), [out], name=f"lw_{op}_{self.count}", **attrs))
        return out

    def const(self, v: float) -> str:
        self.count += 1
        name = f"lw_const_{self.count}"
        self.graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [float(v)]))
        return name

    def softplus(self, t: str) -> str:  # log(1 + e^t), stable: relu(t) + log(1 + e^{-|t|})
        e = self("Exp", self("Neg", self("Abs", t)))
        return self("Add", self("Relu", t), self("Log", self("Add", self.const(1.0), e)))

    def neg_part(self, t: str) -> str:  # min(t, 0)
        return self("Neg", self("Relu", self("Neg", t)))

    def total(self, t: str) -> str:
        return self("ReduceSum", t, keepdims=0)

    def shift(self, t: str, c: float) -> str:  # t + c
        return self("Add", t, self.const(c))

    def scale(self, t: str, c: float) -> str:  # c·t
        return self("Mul", self.const(c), t)

    def half_square(self, t: str) -> str:  # ½t²
        return self("Mul", self.const(0.5), self("Mul", t, t))

    def clamp(self, t: str, lo: float, hi: float) -> str:
        # lo + relu(t − lo) − relu(t − hi): Relu's gradient is one every onnxruntime-training build has
        return self("Sub", self.shift(self("Relu", self.shift(t, -lo)), lo), self("Relu", self.shift(t, -hi)))


OnnxBuilder = Callable[[OnnxNodes, str, dict], str]
