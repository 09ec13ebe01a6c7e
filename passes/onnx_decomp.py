"""Lowering an FX graph to ONNX: decompositions, functionalization, and the call into torchlib.

torch 2.13's dynamo exporter (onnxscript's torchlib) cannot translate several backward ops that a training graph
holds, and some of its translations are wrong for training graphs. This module has them rewritten into forward ops
while it functionalizes and decomposes a graph, and translates the result:

- ``EXTRA_DECOMPOSITIONS`` (in :mod:`lwcompile.passes.onnx_backward_decomps`, importable from here): backward ops
  torchlib lacks or gets wrong, rewritten into forward ops (``convolution_backward``, the CPU flash-attention
  backward, ``avg_pool2d_backward``, ``_adaptive_avg_pool2d_backward``; torch's decompositions of
  ``native_batch_norm`` and ``nll_loss_*``).
- :func:`export_decompositions` adds the exporter's own ONNX-friendly table and torch's decomposition of every other
  ``*_backward`` op torchlib lacks.
- :func:`prepare_graph` re-traces a GraphModule with ``make_fx(functionalize(gm), decomposition_table=...)``: in-place
  input mutations (BatchNorm running statistics) become extra trailing outputs.
- :func:`translate_prepared` hands the result straight to torchlib (skipping the exporter's own ``torch.export`` and
  decomposition re-traces, ~2 s a graph); ops it lacks raise :class:`UnsupportedOpsError` naming them all.
  :func:`dynamo_export` is the public exporter's route (the fallback), with a torchlib registry built once per opset.
- Both run onnxscript's optimizer without its pattern rewrite rules (:func:`no_rewrite_rules`): slow, and they
  delete ``+ 1e-8``.

Example:
    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def f(x, w):
    ...     y = torch.nn.functional.conv2d(x, w)
    ...     return torch.autograd.grad(y.sum(), [x, w])
    >>> x, w = torch.randn(1, 2, 5, 5, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True)
    >>> gm = prepare_graph(make_fx(f)(x, w), (x.detach(), w.detach())).graph_module
    >>> any("convolution_backward" in str(n.target) for n in gm.graph.nodes)
    False
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import onnx
import torch
import torch._decomp
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.errors import ExportError
from lwcompile.passes.onnx_backward_decomps import EXTRA_DECOMPOSITIONS

aten = torch.ops.aten
MAX_IR_VERSION = 10  # onnxruntime 1.19 loads IR ≤ 10


# ---------------------------------------------------------------------------------------------------------------
# Functionalize + decompose
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedGraph:
    """A functional, decomposed GraphModule and how its outputs map back to the original one."""

    graph_module: torch.fx.GraphModule
    n_outputs: int  # outputs of the original graph; the rest are mutated inputs
    mutated_inputs: list[int]  # indices of the inputs whose new values are the extra outputs, in order


_TABLE_CACHE: dict[str, dict] = {}
_MUTATING_DECOMPOSITIONS = (aten.diagonal_scatter.default, aten.as_strided_scatter.default)


class UnsupportedOpsError(ExportError):
    """The graph holds ops that torchlib cannot translate and nothing decomposes (``ops``: their names)."""

    def __init__(self, ops: Sequence[str]) -> None:
        self.ops = list(ops)
        super().__init__(f"op(s) {', '.join(self.ops)} have no ONNX translation")


def export_decompositions(full: bool = True) -> dict:
    """The retrace table, so that every op left is one torchlib translates (``full=False``: the last two only):

    - the dynamo exporter's own ONNX-friendly table (torch's decompositions of the ops torchlib does not implement,
      e.g. ``rsub``; in-place ops excepted), which it would otherwise apply in a second full re-trace of its own;
    - torch's decomposition of every ``*_backward`` op torchlib cannot translate (e.g. ``silu_backward``);
    - ``EXTRA_DECOMPOSITIONS``, which win.
    """
    key = "full" if full else "backward"
    if key not in _TABLE_CACHE:
        table = {}
        try:
            from torch.onnx._internal.exporter import _decomp
            implemented = set(_decomp.get_onnx_implemented_overloads(torchlib_registry(18)))
            if full:  # in-place ops and view-scatters are left alone: their decompositions write with prims.copy_to
                table.update({op: fn for op, fn in _decomp.create_onnx_friendly_decomposition_table(implemented).items()
                              if isinstance(op, torch._ops.OpOverload) and not op._schema.is_mutable
                              and op not in _MUTATING_DECOMPOSITIONS})
            for op, fn in torch._decomp.decomposition_table.items():
                if isinstance(op, torch._ops.OpOverload) and "backward" in op.name() and op not in implemented:
                    table[op] = fn
        except Exception:  # noqa: BLE001  (private API moved: the exporter decomposes in its own pass)
            pass
        table.update(EXTRA_DECOMPOSITIONS)
        _TABLE_CACHE[key] = table
    return _TABLE_CACHE[key]


def placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def _flat_outputs(gm) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    a = out.args[0]
    return list(a) if isinstance(a, (tuple, list)) else [a]


def prepare_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                  table: dict | None = None) -> PreparedGraph:
    """Functionalize and decompose ``gm`` (with ``table``, default :func:`export_decompositions`); in-place input
    mutations become extra trailing outputs."""
    n_out = len(_flat_outputs(gm))
    fake_ok = all(isinstance(t, torch.Tensor) for t in example_inputs)
    f = torch.func.functionalize(gm, remove="mutations")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = make_fx(f, decomposition_table=export_decompositions() if table is None else table,
                      tracing_mode="fake" if fake_ok else "real")(*example_inputs)
    g = new.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    out_node = next(n for n in g.nodes if n.op == "output")
    outs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    new_vals: dict[int, Any] = {}
    for n in list(g.nodes):
        if n.op == "call_function" and n.target in (aten.copy_.default,) and n.args[0] in phs:
            idx = phs.index(n.args[0])
            new_vals[idx] = n.args[1]  # the last copy_ wins
            n.replace_all_uses_with(n.args[1])
            g.erase_node(n)
    bad = [n for n in g.nodes if n.op == "call_function" and getattr(n.target, "_schema", None) is not None
           and n.target._schema.is_mutable]
    if bad:
        raise ExportError(f"in-place op {bad[0].target} survived functionalization; "
                          "rewrite it out of place before exporting")
    mutated = sorted(new_vals)
    out_node.args = (tuple(outs) + tuple(new_vals[i] for i in mutated),)
    g.lint()
    new.recompile()
    return PreparedGraph(new, n_out, mutated)


class GraphWrapper(torch.nn.Module):
    """A GraphModule as an nn.Module that always returns a tuple (what the exporter wants)."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        out = self.gm(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ---------------------------------------------------------------------------------------------------------------
# The torchlib exporter
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_rewrite_rules() -> Iterator[None]:
    """Run onnxscript's optimizer (function inlining, constant folding, dead-code removal, CSE) without its pattern
    rewrite rules. They are optional speed-ups that cost about a third of an export, and their no-op rules
    (``x + 0``, ``x * 1``) match constants within 1e-8 of 0 or 1 (onnxscript 0.7: ``abs_tol=1e-8``), so they delete
    ``+ eps`` for eps = 1e-8, Adam's and RMSprop's default (0/0 = NaN where a gradient is exactly zero)."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter import pattern
        default = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        yield
        return
    # (a rule set may not be empty: one rule for an op that never occurs)
    never = pattern.RewriteRule(lambda op, x: op.NoSuchOp(x, _domain="lwcompile.none"), lambda op, x: op.Identity(x))
    rewriter._DEFAULT_REWRITE_RULES = pattern.RewriteRuleSet([never])
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default


@contextlib.contextmanager
def quiet():
    """The dynamo exporter prints progress and warns about training mode; keep user output clean."""
    buf_out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf_out):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def torchlib_registry(opset: int):
    """torchlib's ONNX registry, built once per opset (``torch.onnx.export`` rebuilds it, ~1.5 s, every call)."""
    key = f"registry{opset}"
    if key not in _TABLE_CACHE:
        from torch.onnx._internal.exporter import _constants, _registration
        with quiet():
            _TABLE_CACHE[key] = _registration.ONNXRegistry.from_torchlib(
                opset_version=max(opset, _constants.TORCHLIB_OPSET))
    return _TABLE_CACHE[key]


def dynamo_export(module: torch.nn.Module, args: Sequence[torch.Tensor], input_names: Sequence[str] | None,
                  output_names: Sequence[str] | None, opset: int) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)``, through its internal entry point with a cached registry when available;
    the model's IR version is capped at ``MAX_IR_VERSION``."""
    names = {"input_names": None if input_names is None else list(input_names),
             "output_names": None if output_names is None else list(output_names)}
    with quiet(), no_rewrite_rules():
        try:
            from torch.onnx._internal.exporter import _core
            registry = torchlib_registry(opset)
        except (ImportError, AttributeError):
            prog = torch.onnx.export(module, tuple(args), dynamo=True, opset_version=opset, **names,
                                     optimize=True, verify=False, report=False, external_data=False)
        else:
            prog = _core.export(module, tuple(args), registry=registry, **names, optimize=True, verify=False,
                                report=False, opset_version=opset)
    model = prog.model_proto
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def translate_prepared(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], input_names: Sequence[str],
                       output_names: Sequence[str], opset: int) -> onnx.ModelProto:
    """ONNX for a graph made by :func:`prepare_graph`: torchlib translates it as it is.

    The public exporter would run ``torch.export`` and a decomposition re-trace on it first (~2 s a graph), both
    no-ops here: the graph is already functional and decomposed with the exporter's own table. Uses private
    exporter functions; if they moved, falls back to :func:`dynamo_export` (same result, slower). Ops torchlib
    lacks raise :class:`UnsupportedOpsError` naming them all.
    """
    try:
        from torch.export import ExportedProgram
        from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                                  TensorArgument)
        from torch.onnx._internal._lazy_import import onnxscript_apis
        from torch.onnx._internal.exporter import _core, _fx_passes, _ir_passes
    except ImportError:
        return dynamo_export(GraphWrapper(gm), example_inputs, input_names, output_names, opset)
    from lwcompile.passes.onnx_dynamic import lower_sym_numel  # (symbolic batch: x.numel() as a product of sizes)
    lower_sym_numel(gm)
    g = gm.graph
    if any(n.op == "get_attr" for n in g.nodes):  # constants would need lifting: let torch.export do it
        return dynamo_export(GraphWrapper(gm), example_inputs, input_names, output_names, opset)
    registry = torchlib_registry(opset)
    missing = sorted({str(n.target) for n in g.nodes if n.op == "call_function"
                      and isinstance(n.target, torch._ops.OpOverload) and not registry.is_registered(n.target)})
    if missing:
        raise UnsupportedOpsError(missing)
    outs = g.output_node().args[0]
    sig = ExportGraphSignature(
        [InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None) for n in g.nodes if n.op == "placeholder"],
        [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(a.name), None) for a in outs])
    with quiet(), no_rewrite_rules():
        ep = ExportedProgram(gm, g, sig, {}, {}, [], verifiers=[])
        _fx_passes.insert_type_promotion_nodes(ep.graph_module)
        prog = _core._exported_program_to_onnx_program(ep, registry=registry)
        if opset < 18:  # the registry is built for max(opset, 18)
            prog.model = onnxscript_apis.convert_version(prog.model, opset)
        prog.optimize()
        _ir_passes.rename_inputs(prog.model, list(input_names))
        _ir_passes.rename_outputs(prog.model, list(output_names))
        model = prog.model_proto
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model
