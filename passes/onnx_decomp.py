"""Lowering an FX graph to ONNX: decompositions, functionalization, and the call into torchlib.

torch 2.13's dynamo exporter (onnxscript's torchlib) cannot translate several backward ops that a training graph
holds, and some of its translations are wrong for training graphs. This module rewrites them into forward ops and
translates the result:

- ``EXTRA_DECOMPOSITIONS`` (written here): ``convolution_backward`` (a transposed convolution for the input, a
  convolution of x by the output gradient for the weight), the CPU flash-attention backward
  (``_scaled_dot_product_flash_attention_for_cpu_backward``: softmax recomputed), ``avg_pool2d_backward`` and
  ``_adaptive_avg_pool2d_backward``; plus torch's own decompositions of ``native_batch_norm`` (its running-stat
  updates become explicit) and ``nll_loss_*`` (torchlib's ``total_weight`` is wrong).
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

aten = torch.ops.aten
MAX_IR_VERSION = 10  # onnxruntime 1.19 loads IR ≤ 10


# ---------------------------------------------------------------------------------------------------------------
# Decompositions of backward ops that ONNX (torchlib) and torch._decomp leave alone.
# ---------------------------------------------------------------------------------------------------------------
def _conv(x, w, stride, padding, dilation, transposed=False, output_padding=None, groups=1):
    nd = x.dim() - 2
    return aten.convolution.default(x, w, None, list(stride), list(padding), list(dilation), transposed,
                                    list(output_padding or [0] * nd), groups)


def _conv_weight_grad(x, gy, k, stride, padding, dilation, groups):
    """∂/∂W of Σ gy·conv(x, W): a convolution of x by gy (batch and channel axes swapped, stride ↔ dilation)."""
    nd = x.dim() - 2
    cin, cout = x.shape[1] // groups, gy.shape[1] // groups
    parts = []
    for g in range(groups):
        xg = x[:, g * cin:(g + 1) * cin].transpose(0, 1)
        gg = gy[:, g * cout:(g + 1) * cout].transpose(0, 1)
        dw = _conv(xg, gg, dilation, padding, stride)  # (Cin_g, Cout_g, *k')
        for d in range(nd):
            dw = dw.narrow(2 + d, 0, k[d])
        parts.append(dw.transpose(0, 1))
    return parts[0] if groups == 1 else torch.cat(parts, 0)


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    nd = input.dim() - 2
    k = list(weight.shape[2:])
    gi = gw = gb = None
    if not transposed:
        if output_mask[0]:
            # adjoint of conv in its input is conv_transpose; output_padding restores the trailing positions
            op = []
            for d in range(nd):
                full = (grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k[d] - 1) + 1
                op.append(input.shape[2 + d] - full)
            gi = _conv(grad_output, weight, stride, padding, dilation, True, op, groups)
        if output_mask[1]:
            gw = _conv_weight_grad(input, grad_output, k, stride, padding, dilation, groups)
    else:
        if output_mask[0]:
            gi = _conv(grad_output, weight, stride, padding, dilation, False, None, groups)
        if output_mask[1]:
            # conv_transpose is the adjoint of conv: its weight gradient is conv's with x and gy exchanged
            gw = _conv_weight_grad(grad_output, input, k, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = grad_output.sum(dim=[0] + list(range(2, grad_output.dim())))
    return gi, gw, gb


def _sdpa_cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask=None,
                       scale=None):
    if dropout_p != 0.0:
        raise NotImplementedError("scaled_dot_product_attention backward with dropout_p > 0 (its random mask is "
                                  "not recoverable); trace with dropout=0.0")
    if key.shape[-3] != query.shape[-3]:
        raise NotImplementedError("scaled_dot_product_attention backward with grouped-query heads")
    e = query.shape[-1]
    s = (1.0 / e ** 0.5) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * s
    if is_causal:
        lq, lk = query.shape[-2], key.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    p = torch.softmax(scores, dim=-1)
    gv = p.transpose(-2, -1) @ grad_out
    gp = grad_out @ value.transpose(-2, -1)
    gs = p * (gp - (gp * p).sum(-1, keepdim=True))
    gq = (gs @ key) * s
    gk = (gs.transpose(-2, -1) @ query) * s
    return gq, gk, gv


def _avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    if ceil_mode:
        raise NotImplementedError("avg_pool2d backward with ceil_mode=True")
    kh, kw = (list(kernel_size) * 2)[:2] if len(kernel_size) == 1 else list(kernel_size)
    stride = list(stride) or [kh, kw]
    stride = (stride * 2)[:2] if len(stride) == 1 else stride
    padding = (list(padding) * 2)[:2] if len(padding) == 1 else list(padding)
    c = input.shape[1]
    ones_k = torch.ones(c, 1, kh, kw, dtype=grad_output.dtype, device=grad_output.device)
    if divisor_override:
        g = grad_output / divisor_override
    elif count_include_pad:
        g = grad_output / (kh * kw)
    else:
        cnt = _conv(torch.ones_like(input[:1, :1]), ones_k[:1], stride, padding, [1, 1])
        g = grad_output / cnt
    op = []
    for d, kk in enumerate((kh, kw)):
        full = (grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + kk
        op.append(input.shape[2 + d] - full)
    return _conv(g, ones_k, stride, padding, [1, 1], True, op, c)


def _adaptive_matrix(n_in, n_out, like):
    """A (n_out, n_in) with A[i, j] = 1/len_i for j in window i = [⌊i·n/m⌋, ⌈(i+1)·n/m⌉)."""
    i = torch.arange(n_out, device=like.device)
    j = torch.arange(n_in, device=like.device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def _adaptive_avg_pool2d_backward(grad_output, input):
    ah = _adaptive_matrix(input.shape[-2], grad_output.shape[-2], grad_output)
    aw = _adaptive_matrix(input.shape[-1], grad_output.shape[-1], grad_output)
    return ah.transpose(0, 1) @ grad_output @ aw


EXTRA_DECOMPOSITIONS: dict[Any, Any] = {
    aten.convolution_backward.default: _convolution_backward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _sdpa_cpu_backward,
    aten.avg_pool2d_backward.default: _avg_pool2d_backward,
    aten._adaptive_avg_pool2d_backward.default: _adaptive_avg_pool2d_backward,
}
# native_batch_norm's schema says "functional" but it updates running_mean/var in place; torch's decomposition
# routes it through _native_batch_norm_legit (declared mutable), which functionalize then makes explicit.
# nll_loss_forward: torchlib's translation returns a wrong total_weight (its second output), which
# nll_loss_backward divides by; torch's decomposition computes it.
for _op in (aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
            aten._native_batch_norm_legit.no_stats, aten.nll_loss_forward.default, aten.nll_loss2d_forward.default,
            aten.nll_loss_backward.default, aten.nll_loss2d_backward.default):
    if _op in torch._decomp.decomposition_table:
        EXTRA_DECOMPOSITIONS[_op] = torch._decomp.decomposition_table[_op]


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
