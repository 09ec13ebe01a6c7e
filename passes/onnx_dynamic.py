"""A symbolic batch dimension for exported graphs, so the ONNX files run any batch size (a last partial batch too).

A graph traced for one batch size bakes it in: ``view`` / ``reshape`` / ``expand`` sizes, and the ``1/N`` of a
mean over the batch. Exported graphs are therefore traced from their Python functions again, on fake tensors
whose first dimension is a symbol (:func:`symbolic_examples`): every size computed from it stays an expression
(``sym_size``, ``operator.mul``, ...) that the ONNX graph computes from its inputs' shapes at run time.

- ``SYM_DECOMPOSITIONS``: ``aten.sym_numel`` (what ``mean`` and ``mse_loss``'s backward divide by) as the product
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
    >>> ex.batch_name()
    's0'
"""
from __future__ import annotations

import math
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


def symbolic_examples(tensors: Sequence[torch.Tensor], dynamic: Sequence[bool]) -> SymbolicExamples:
    """Fake copies of ``tensors`` (values never read) in one new fake mode; where ``dynamic[i]``, tensor i's first
    dimension is symbolic. Sizes are not duck-typed: equal sizes are only the same symbol when the trace proves it
    (an example batch equal to a feature width stays two symbols)."""
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    out, batch = [], None
    for i, (t, dyn) in enumerate(zip(tensors, dynamic)):
        t = t.detach()
        sizes = [DimDynamic.DYNAMIC if dyn and d == 0 else DimDynamic.STATIC for d in range(t.dim())]
        f = mode.from_tensor(t, source=ConstantSource(f"example{i}"),
                             symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
        if batch is None and dyn and t.dim() > 0 and isinstance(f.shape[0], torch.SymInt):
            batch = f.shape[0]
        out.append(f)
    return SymbolicExamples(mode, tuple(out), batch)


def _sym_numel(x: torch.Tensor):
    return math.prod(x.shape)  # SymInt products are traced as operator.mul of sym_size nodes


SYM_DECOMPOSITIONS = {aten.sym_numel.default: _sym_numel}


def _mentions(expr, symbol) -> bool:
    return symbol in getattr(expr, "free_symbols", ())


def check_batch_dynamic(ex: SymbolicExamples, graph_name: str) -> None:
    """Refuse when the trace fixed or bounded the batch size: a guard on the batch symbol other than the trivial
    ones (equal to another symbol, or ``> 1`` / ``!= 1``, which every batch of two or more meets)."""
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
        e = g.expr
        if not _mentions(e, sym) or _trivial(e, sym):
            continue
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
    """Rename the batch symbol (the first symbolic first dimension among ``examples``) to ``"batch"`` in the
    model's inputs, outputs and value infos (expressions such as ``5*s0`` too)."""
    name = None
    for t in examples:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and isinstance(t.shape[0], torch.SymInt):
            env = t.shape[0].node.shape_env
            name = str(env.replace(t.shape[0].node.expr))
            break
    if name is None or not re.fullmatch(r"[a-z]+\d+", name):
        return
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    g = model.graph
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = pattern.sub(BATCH, d.dim_param)


def is_symbolic(examples: Sequence[torch.Tensor]) -> bool:
    """Whether any example has a symbolic size (a batch-dynamic trace)."""
    return any(isinstance(s, torch.SymInt) for t in examples if isinstance(t, torch.Tensor) for s in t.shape)
