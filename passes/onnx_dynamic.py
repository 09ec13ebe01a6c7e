"""A symbolic batch dimension for exported graphs, so the ONNX files run any batch size (a last partial batch too).

A graph traced for one batch size bakes it in: ``view`` / ``reshape`` / ``expand`` sizes, and the ``1/N`` of a
mean over the batch. Exported graphs are therefore traced from their Python functions again, on fake tensors
whose first dimension is a symbol (:func:`symbolic_examples`): every size computed from it stays an expression
(``sym_size``, ``operator.mul``, ...) that the ONNX graph computes from its inputs' shapes at run time.

- :func:`lower_sym_numel`: ``aten.sym_numel`` (what ``mean`` and ``mse_loss``'s backward divide by) as the product
  of its sizes, which torchlib translates (it has no translation of ``sym_numel`` itself).
- :func:`check_batch_dynamic` refuses (:class:`ExportError`) a graph whose trace fixed the batch size (a guard
  such as ``Eq(s0, 16)``: a literal size in the model or loss), naming the guard and the line that made it.
- :func:`name_batch_dims` names the batch dimension ``"batch"`` in the ONNX model's inputs and outputs.

Example:
    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> ex = symbolic_examples([torch.zeros(16, 4), torch.zeros(4)], [True, False])
    >>> gm = make_fx(lambda x, w: (x * w).mean(0), tracing_mode="fake")(*ex.tensors)
    >>> check_batch_dynamic(ex, "demo")   # nothing fixed the batch
    >>> ex.batch_name() == str(gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape[0])
    True
"""
from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import dataclass
from typing import Sequence

import onnx
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from lwcompile.errors import ExportError

aten = torch.ops.aten
BATCH = "batch"
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass
class SymbolicExamples:
    """Fake example tensors sharing one fake mode; ``batch`` is the first dynamic tensor's first size (a SymInt)."""

    mode: FakeTensorMode
    tensors: tuple[torch.Tensor, ...]
    batch: torch.SymInt | None

    def batch_expr(self):
        """The batch symbol after the trace's unifications (``s1 == s0`` of labels and inputs), or a number if the
        trace fixed it."""
        return None if self.batch is None else self.mode.shape_env.replace(self.batch.node.expr)

    def batch_name(self) -> str | None:
        expr = self.batch_expr()
        return None if expr is None else str(expr)


def symbolic_examples(tensors: Sequence[torch.Tensor], dynamic: Sequence[bool | Sequence[int]]) -> SymbolicExamples:
    """Fake copies of ``tensors`` (values never read) in one new fake mode; ``dynamic[i]`` lists the dimensions of
    tensor i that are symbolic (True: the first one). Sizes are not duck-typed: equal sizes are only the same symbol
    when the trace proves it (an example batch equal to a feature width stays two symbols)."""
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    out, batch = [], None
    for i, (t, dyn) in enumerate(zip(tensors, dynamic)):
        t = t.detach()
        dims = (0,) if dyn is True else () if dyn is False else tuple(dyn)
        sizes = [DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC for d in range(t.dim())]
        f = mode.from_tensor(t, source=ConstantSource(f"example{i}"),
                             symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
        if batch is None and dims and t.dim() > dims[0] and isinstance(f.shape[dims[0]], torch.SymInt):
            batch = f.shape[dims[0]]
        out.append(f)
    return SymbolicExamples(mode, tuple(out), batch)


def lower_sym_numel(gm: torch.fx.GraphModule) -> None:
    """Replace every ``aten.sym_numel(x)`` node (make_fx records one for ``x.numel()`` of a symbolic tensor, e.g.
    the ``N`` of a mean) by the product of ``x``'s sizes: ``sym_size.int`` nodes for the symbolic ones times the
    static ones, which torchlib translates (it has no translation of ``sym_numel``)."""
    g = gm.graph
    hits = [n for n in g.nodes if n.op == "call_function" and n.target is aten.sym_numel.default]
    for n in hits:
        x = n.args[0]
        shape = x.meta["val"].shape
        static = math.prod(int(s) for s in shape if not isinstance(s, torch.SymInt))
        acc = None
        with g.inserting_before(n):
            for d, s in enumerate(shape):
                if not isinstance(s, torch.SymInt):
                    continue
                size = g.call_function(aten.sym_size.int, (x, d))
                size.meta["val"] = s
                acc = size if acc is None else _mul(g, acc, size)
            acc = static if acc is None else acc if static == 1 else _mul(g, acc, static)
        n.replace_all_uses_with(acc) if isinstance(acc, torch.fx.Node) else _replace_by_constant(n, acc)
        g.erase_node(n)
    if hits:
        g.lint()
        gm.recompile()


def _mul(g: torch.fx.Graph, a: torch.fx.Node, b) -> torch.fx.Node:
    node = g.call_function(operator.mul, (a, b))
    node.meta["val"] = a.meta["val"] * (b.meta["val"] if isinstance(b, torch.fx.Node) else b)
    return node


def _replace_by_constant(n: torch.fx.Node, value: int) -> None:
    for user in list(n.users):
        user.replace_input_with(n, value)


def _mentions(expr, symbol) -> bool:
    return symbol in getattr(expr, "free_symbols", ())


def check_batch_dynamic(ex: SymbolicExamples, graph_name: str) -> None:
    """Refuse when the trace fixed the batch size, or when code outside torch (the model's or the loss's Python)
    tested it beyond what every batch of two or more meets (equal to another symbol, ``> 1``, ``!= 1``): the graph
    would be the one for that branch only."""
    if ex.batch is None:
        return
    expr = ex.batch_expr()
    env = ex.mode.shape_env
    if expr.is_number:
        raise ExportError(f"graph {graph_name!r} cannot be made batch-dynamic: its trace fixed the batch size to "
                          f"{int(expr)} ({_guards_on(env, ex.batch.node.expr) or 'a size computed from it'}). Use "
                          "sizes computed from the input (x.shape[0], or -1 in view/reshape) instead of literal "
                          "batch sizes in the model and loss.")
    sym = next(iter(expr.free_symbols))
    for g in env.guards:
        e = env.replace(g.expr)  # in terms of the unified symbols (a label's batch is the input's)
        if not _mentions(e, sym) or _trivial(e, sym) or _TORCH_DIR in _where(g):
            continue  # torch's own size tests pick kernels and memory formats (conv: batch < 16), not results
        raise ExportError(f"graph {graph_name!r} cannot be made batch-dynamic: its trace requires {e} of the batch "
                          f"size {sym} (from {_where(g)}), so the ONNX graph would not hold for every batch. Use "
                          "sizes computed from the input (x.shape[0], or -1 in view/reshape) instead of literal sizes.")


def _trivial(e, sym) -> bool:
    """Guards every batch size >= 2 meets (0/1 specialization checks, a symbol equal to another)."""
    import sympy

    if isinstance(e, sympy.Eq) and all(isinstance(a, sympy.Symbol) for a in e.args):
        return True
    try:
        return all(bool(e.subs(sym, n)) for n in (2, 3, 7, 64, 1000))  # holds at every size tried
    except TypeError:
        return False


def _guards_on(env: ShapeEnv, symbol) -> str:
    hits = [f"{g.expr} from {_where(g)}" for g in env.guards if _mentions(g.expr, symbol)]
    return "; ".join(hits[:3])


def _where(guard) -> str:
    loc = getattr(guard, "sloc", None)
    if loc is None:
        return "an unknown place"
    user = getattr(loc, "maybe_user_loc", None)
    frame = getattr(loc, "framework_loc", None)
    text = user or frame
    if hasattr(text, "filename"):
        return f"{text.filename}:{text.lineno} in {text.name}"
    return str(text or loc)


def name_batch_dims(model: onnx.ModelProto, examples: Sequence[torch.Tensor]) -> None:
    """Rename the batch symbol (the first symbolic size among ``examples``) to ``"batch"`` in the
    model's inputs, outputs and value infos (expressions such as ``5*s0`` too)."""
    name = None
    for t in examples:
        dims = symbolic_dims(t) if isinstance(t, torch.Tensor) else ()
        if dims:
            size = t.shape[dims[0]]
            name = str(size.node.shape_env.replace(size.node.expr))
            break
    if name is None or not re.fullmatch(r"[a-z]+\d+", name):
        return
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    g = model.graph
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = pattern.sub(BATCH, d.dim_param)


def symbolic_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of a traced value (an FX node's ``meta["val"]``) whose size is symbolic."""
    return tuple(i for i, s in enumerate(t.shape) if isinstance(s, torch.SymInt))
