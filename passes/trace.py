"""Trace pass: capture a model as a plain ``torch.fx.GraphModule`` that shares the model's parameters.

Front ends, in order: ``torch.fx.symbolic_trace`` (through attention and transformer modules, so their
projections become visible), then ``torch.export`` when symbolic tracing fails or its graph does not
reproduce the model (Python control flow on shapes or values). The result says which one was used.

Example:
    >>> import torch
    >>> res = trace(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh()), (torch.randn(4, 3),))
    >>> res.frontend
    'torch.fx.symbolic_trace'
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lwcompile.errors import TraceError, first_line
from lwcompile.ir import TraceResult
from lwcompile.passes import registry
from lwcompile.passes.functionalize import functionalize_inplace
from lwcompile.passes.grad_reach import output_grads
from lwcompile.passes.state import preserved_state
from lwcompile.passes.trace_hooks import (
    call_with_hooks, has_forward_hooks, no_grad_marks, cut_no_grad_regions, refuse_unsupported_hooks)

SYMBOLIC = "torch.fx.symbolic_trace"
EXPORT = "torch.export"

# torch.nn modules that hold block weights inside: trace into them instead of keeping them as leaves.
_TRACE_THROUGH = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
    nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _TRACE_THROUGH):
            return False
        if has_forward_hooks(m):  # traced through, so its hooks become graph nodes (see trace_hooks)
            return False
        if type(m) in registry.TRANSFER_MODULES:  # a user-registered transfer module stays one call_module node
            return True
        return super().is_leaf_module(m, qualname)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # noqa: ANN001, ANN201
        return no_grad_marks(super().create_node(kind, target, args, kwargs, name, type_expr))

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # noqa: ANN001, ANN201
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module and has_forward_hooks(self.root):  # fx calls type(root).forward, skipping root's hooks
            return call_with_hooks(self.root, fn), args
        return fn, args


def _symbolic(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    with torch.enable_grad():  # grad mode seen while tracing marks torch.no_grad() regions (trace_hooks)
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _export(model: nn.Module, example_inputs: tuple) -> tuple[fx.GraphModule, Any, Any]:
    """torch.export's graph as a plain GraphModule, functionalized (see :mod:`lwcompile.passes.functionalize`)."""
    dyn = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
                for a in example_inputs)
    try:
        ep = torch.export.export(model, example_inputs, dynamic_shapes=dyn, strict=False)
    except Exception:  # a batch dimension that cannot be dynamic: fall back to static shapes
        ep = torch.export.export(model, example_inputs, strict=False)
    leaves = pytree.tree_leaves(example_inputs)
    try:
        # The training IR keeps in-place ops (silu_, add_) and BatchNorm's in-op statistics update; rewriting
        # the former out of place keeps the latter as it is.
        gm = functionalize_inplace(_plain(ep, model), leaves)
    except TraceError:
        # A write through a view: torch's own functionalization (an empty decomposition table) expresses it,
        # at the price of explicit buffer copies that a train-mode BatchNorm's backward cannot sit beside.
        gm = functionalize_inplace(_plain(ep.run_decompositions({}), model), leaves)
    return gm, ep.call_spec.in_spec, ep.call_spec.out_spec


def _plain(ep: Any, model: nn.Module) -> fx.GraphModule:
    gm = ep.module()
    graph = gm.graph
    # The exported module checks its input guards and (un)flattens pytrees in generated code; our passes
    # want flat positional inputs and outputs, so drop the guard call and use the plain code generator.
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    leaves = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    out.args = (tuple(leaves),)
    plain = fx.GraphModule(gm, graph, model.__class__.__name__)
    _rebind_parameters(plain, model)
    return plain


def _rebind_parameters(gm: fx.GraphModule, model: nn.Module) -> None:
    # The traced module must train the user's own tensors, never copies of them.
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in own and own[name] is not t:
            mod_path, _, attr = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            if isinstance(own[name], nn.Parameter):
                mod.register_parameter(attr, own[name])
            else:
                mod.register_buffer(attr, own[name])


def run_traced(res: TraceResult, inputs: tuple) -> Any:
    """Call a traced module with the model's own calling convention (pytree in and out)."""
    if res.in_spec is None:
        return res.graph_module(*inputs)
    flat = pytree.tree_leaves((inputs, {}))
    out = res.graph_module(*flat)
    return pytree.tree_unflatten(list(out), res.out_spec)


def _same(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or not torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True)):
            return False
    return True


def _reproduces(res: TraceResult, model: nn.Module, example_inputs: tuple) -> bool:
    with torch.no_grad(), preserved_state(model):
        torch.manual_seed(0)
        ref = model(*example_inputs)
    with torch.no_grad(), preserved_state(model):
        torch.manual_seed(0)
        got = run_traced(res, example_inputs)
    return _same(ref, got)


def _grads_differ(res: TraceResult, model: nn.Module, example_inputs: tuple) -> str | None:
    """Why the traced graph's gradients differ from eager PyTorch's, or None when they agree.

    A probe loss of the output is differentiated in both; the parameters that get no gradient must be the same
    ones (``torch.no_grad()``, ``.detach()``) and the others must agree in value. This catches what a front end
    cannot see: grad-mode changes, in-place writes under ``no_grad``, custom autograd Functions, tensor hooks.
    When eager PyTorch itself cannot differentiate the model on the example, there is nothing to compare.
    """
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        with preserved_state(model):
            torch.manual_seed(0)
            ref = output_grads(lambda: model(*example_inputs), params)
    except Exception:
        return None
    try:
        with preserved_state(res.graph_module):
            torch.manual_seed(0)
            got = output_grads(lambda: run_traced(res, example_inputs), params)
    except Exception as e:
        return f"its backward failed ({first_line(e)})"
    for p, r, g in zip(params, ref, got):
        if (r is None) != (g is None):
            return (f"parameter {names[id(p)]!r} gets {'no' if r is None else 'a'} gradient in eager PyTorch but "
                    f"{'a' if r is None else 'no'} gradient in the traced graph")
        if r is not None and not torch.allclose(r, g, rtol=1e-3, atol=1e-5 * (1 + float(r.abs().max())),
                                                equal_nan=True):
            return f"the gradient of parameter {names[id(p)]!r} differs from eager PyTorch's"
    return None


def trace(model: nn.Module, example_inputs: tuple, frontend: str = "auto") -> TraceResult:
    """Capture ``model`` called on ``example_inputs``; ``frontend`` is "auto", "fx" or "export".

    The graph is functionalized (:mod:`lwcompile.passes.functionalize`). Why a front end was passed over is
    kept in the result's ``notes`` (torch.fx prints failing generated code to stderr: that is captured too).
    """
    refuse_unsupported_hooks(model)
    errors: list[str] = []
    if frontend in ("auto", "fx"):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                gm = cut_no_grad_regions(functionalize_inplace(_symbolic(model), example_inputs))
                res = TraceResult(gm, SYMBOLIC)
                ok = _reproduces(res, model, example_inputs)
                why = _grads_differ(res, model, example_inputs) if ok else None
            if ok and why is None:
                return res
            errors.append(f"{SYMBOLIC}: the traced graph does not reproduce {type(model).__name__}'s output "
                          "(Python control flow was frozen during tracing)" if not ok else
                          f"{SYMBOLIC}: the traced graph's gradients differ from eager PyTorch's: {why}")
        except Exception as e:  # any failure (or refusal) of the symbolic graph sends us to torch.export
            errors.append(f"{SYMBOLIC}: {first_line(e)}")
    if frontend in ("auto", "export"):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                gm, in_spec, out_spec = _export(model, example_inputs)
                res = TraceResult(gm, EXPORT, in_spec, out_spec, notes=tuple(errors))
                ok = _reproduces(res, model, example_inputs)
                why = _grads_differ(res, model, example_inputs) if ok else None
            if ok and why is None:
                return res
            errors.append(f"{EXPORT}: the exported graph does not reproduce the model's output" if not ok else
                          f"{EXPORT}: the exported graph's gradients differ from eager PyTorch's: {why}")
        except TraceError:
            raise
        except Exception as e:
            errors.append(f"{EXPORT}: {first_line(e)}")
    raise TraceError(
        f"could not trace {type(model).__name__}:\n  " + "\n  ".join(errors) +
        "\nMake the forward traceable (avoid Python control flow on tensor values), or wrap the untraceable "
        "part in a leaf module."
    )
