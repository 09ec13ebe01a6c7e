"""Export emitted graphs to standalone ONNX files, and a block's inner loop to onnxruntime-training artifacts.

Route (torch 2.13, onnx 1.17, onnxruntime-training 1.19.2):

1. The GraphModule (made by ``make_fx``, flat tensor inputs, flat tuple of tensor outputs) is **re-traced** with
   ``make_fx(functionalize(gm, remove="mutations"), decomposition_table=export_decompositions(), tracing_mode="fake")``.
   - ``functionalize`` turns in-place input mutations (BatchNorm running stats: ``add_``/``copy_`` on placeholders)
     into trailing ``copy_(input, value)`` nodes, which this pass removes and turns into **extra outputs** named
     ``new__<input name>`` (``MUTATED_PREFIX``), appended after the graph's own outputs in input order. A runtime
     that wants torch's in-place semantics copies each ``new__X`` output back into input ``X``
     (``OrtGraph.run_torch(..., write_back=True)``).
   - ``export_decompositions()`` = ``EXTRA_DECOMPOSITIONS`` (written here: ``convolution_backward``,
     ``_scaled_dot_product_flash_attention_for_cpu_backward``, ``avg_pool2d_backward``,
     ``_adaptive_avg_pool2d_backward``; torch's for ``native_batch_norm`` and ``nll_loss_*``, whose torchlib
     translations are wrong for training graphs) plus torch's decomposition of every ``*_backward`` op torchlib
     cannot translate (e.g. ``silu_backward``).
2. The result goes through the dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``; called through its
   internal entry point with a cached torchlib registry, which saves ~1.5 s a graph, falling back to the public
   call), which applies torch's ONNX-friendly decompositions (``tanh_backward``, ``native_batch_norm_backward``,
   ``threshold_backward``, ``_softmax_backward_data`` ... become core ops) and translates with onnxscript's
   torchlib. Plain ``torch.onnx.export(dynamo=True)`` on the raw graph fails on ``convolution_backward`` and the
   CPU flash-attention backward ("No ONNX function found ... No decompositions registered"); the legacy
   TorchScript exporter has no symbolic for any ``aten::*_backward`` op.
3. The model is saved with IR version ≤ 10 (what onnxruntime 1.19 loads), written to a temp file in the target
   directory and ``os.replace``d, so a failed export never leaves a half-written file.

Any failure raises :class:`lwcompile.errors.ExportError` naming the graph and the unsupported op.

Training artifacts (:func:`export_training_artifacts`): the block's linear transform z = op(x; W, b) is exported with
W, b as initializers ("weight", "bias"); a custom ``onnxblock`` loss appends the local loss of METHOD.md summed over
the batch plus (λ/2)(‖W − W0‖² + ‖b − b0‖²), with W0, b0 extra graph inputs ("weight_ref", "bias_ref", only when
λ > 0); ``generate_artifacts`` adds the gradient graph and an SGD / AdamW optimizer graph.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import onnx
import torch
import torch._decomp
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.errors import ExportError

MAX_OPSET = 21
MAX_IR_VERSION = 10  # onnxruntime 1.19 loads IR ≤ 10
MUTATED_PREFIX = "new__"  # output "new__X" is the value input X holds after the graph ran (in-place mutation)

aten = torch.ops.aten


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
# Graph export
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedGraph:
    """A functional, decomposed GraphModule and how its outputs map back to the original one."""

    graph_module: torch.fx.GraphModule
    n_outputs: int  # outputs of the original graph; the rest are mutated inputs
    mutated_inputs: list[int]  # indices of the inputs whose new values are the extra outputs, in order


_TABLE_CACHE: dict[str, dict] = {}


def export_decompositions() -> dict:
    """The retrace table: ``EXTRA_DECOMPOSITIONS`` plus torch's decomposition of every ``*_backward`` op that
    torchlib cannot translate (the dynamo exporter applies a similar table itself, but misses some, e.g.
    ``silu_backward``). Forward ops are left alone: some of torch's decompositions go to prims that the exporter
    cannot functionalize (``prims.broadcast_in_dim``).
    """
    if "t" not in _TABLE_CACHE:
        table = {}
        try:
            registry = _registry(18)
            for op, fn in torch._decomp.decomposition_table.items():
                if (isinstance(op, torch._ops.OpOverload) and "backward" in op.name()
                        and not registry.is_registered(op)):
                    table[op] = fn
        except Exception:  # noqa: BLE001  (private API moved: fall back to the explicit list)
            pass
        table.update(EXTRA_DECOMPOSITIONS)
        _TABLE_CACHE["t"] = table
    return _TABLE_CACHE["t"]


def examples_from_meta(gm, graph_name: str = "graph") -> tuple[torch.Tensor, ...]:
    """Zero tensors (on CPU) shaped like the placeholders' ``meta["val"]`` that make_fx records."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            raise ExportError(f"graph {graph_name!r}: input {n.target} has no recorded tensor value; "
                              "pass example_inputs")
        out.append(torch.zeros(tuple(int(d) for d in v.shape), dtype=v.dtype))
    return tuple(out)


def _placeholder_names(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def _flat_outputs(gm) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    a = out.args[0]
    return list(a) if isinstance(a, (tuple, list)) else [a]


def prepare_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> PreparedGraph:
    """Functionalize and decompose ``gm``; in-place input mutations become extra trailing outputs."""
    n_out = len(_flat_outputs(gm))
    fake_ok = all(isinstance(t, torch.Tensor) for t in example_inputs)
    f = torch.func.functionalize(gm, remove="mutations")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = make_fx(f, decomposition_table=export_decompositions(),
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


class _Wrapper(torch.nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        out = self.gm(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _unsupported_op(exc: BaseException) -> str | None:
    text = "".join(str(e) for e in _chain(exc))
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    m = re.search(r"call_function\[target=([\w.]+)\]", text)
    return m.group(1) if m else None


def _chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _pin_scalar_outputs(model: onnx.ModelProto) -> None:
    """Make every 0-d output really 0-d at run time.

    torchlib lowers ``aten.add(t0d, 1)`` to ``Add(t0d, const[1])``, whose result is [1] although the graph declares
    [] (seen for BatchNorm's ``num_batches_tracked += 1``); a trailing ``Reshape(·, [])`` fixes it.
    """
    g = model.graph
    for k, out in enumerate(g.output):
        tt = out.type.tensor_type
        if not tt.HasField("shape") or len(tt.shape.dim) != 0:
            continue
        pre = f"{out.name}__pre_reshape"
        producers = [n for n in g.node if out.name in n.output]
        if not producers:
            continue  # a graph input or initializer passed through: already 0-d
        for n in g.node:
            for lst in (n.input, n.output):
                for i, v in enumerate(lst):
                    if v == out.name:
                        lst[i] = pre
        shape_name = f"{out.name}__scalar_shape"
        g.initializer.append(onnx.helper.make_tensor(shape_name, onnx.TensorProto.INT64, [0], []))
        g.node.append(onnx.helper.make_node("Reshape", [pre, shape_name], [out.name],
                                            name=f"pin_scalar_{k}"))


def _fit_versions(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def _atomic_save(model: onnx.ModelProto, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=d)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress and warns about training mode; keep user output clean."""
    import io
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


def _registry(opset: int):
    """torchlib's ONNX registry, built once per opset (``torch.onnx.export`` rebuilds it, ~1.5 s, every call)."""
    key = f"registry{opset}"
    if key not in _TABLE_CACHE:
        from torch.onnx._internal.exporter import _constants, _registration
        with _quiet():
            _TABLE_CACHE[key] = _registration.ONNXRegistry.from_torchlib(
                opset_version=max(opset, _constants.TORCHLIB_OPSET))
    return _TABLE_CACHE[key]


def _dynamo_export(module, args, input_names, output_names, opset) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)``, through its internal entry point with a cached registry when available."""
    with _quiet():
        try:
            from torch.onnx._internal.exporter import _core
            registry = _registry(opset)
        except (ImportError, AttributeError):
            prog = torch.onnx.export(module, tuple(args), dynamo=True, opset_version=opset,
                                     input_names=list(input_names), output_names=list(output_names),
                                     optimize=True, verify=False, report=False, external_data=False)
        else:
            prog = _core.export(module, tuple(args), registry=registry, input_names=list(input_names),
                                output_names=list(output_names), optimize=True, verify=False, report=False,
                                opset_version=opset)
    return prog.model_proto


@contextlib.contextmanager
def _ort_log_level(level: int):
    """onnxruntime's C++ logger prints every graph transformer at INFO while generating artifacts."""
    import onnxruntime
    onnxruntime.set_default_logger_severity(level)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)


def graph_to_onnx(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], input_names=None,
                  output_names=None, opset: int = 18, graph_name: str = "graph") -> onnx.ModelProto:
    """Convert ``gm`` to an in-memory ModelProto (see the module docstring for the route and naming)."""
    if not 7 <= opset <= MAX_OPSET:
        raise ExportError(f"{graph_name}: opset {opset} not supported; use 18..{MAX_OPSET}")
    example_inputs = tuple(example_inputs) if example_inputs is not None else examples_from_meta(gm, graph_name)
    in_names = list(input_names) if input_names is not None else list(_placeholder_names(gm))
    if len(in_names) != len(example_inputs):
        raise ExportError(f"{graph_name}: {len(in_names)} input names for {len(example_inputs)} example inputs")
    try:
        prep = prepare_graph(gm, example_inputs)
    except ExportError as e:
        raise ExportError(f"graph {graph_name!r}: {e}") from e
    except NotImplementedError as e:
        raise ExportError(f"graph {graph_name!r} cannot be exported: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"graph {graph_name!r}: re-tracing for export failed: {type(e).__name__}: {e}") from e
    out_names = (list(output_names) if output_names is not None
                 else [f"out{i}" for i in range(prep.n_outputs)])
    if len(out_names) != prep.n_outputs:
        raise ExportError(f"{graph_name}: {len(out_names)} output names for {prep.n_outputs} outputs")
    out_names += [MUTATED_PREFIX + in_names[i] for i in prep.mutated_inputs]
    if len(set(in_names + out_names)) != len(in_names) + len(out_names):
        raise ExportError(f"{graph_name}: input/output names are not unique: {in_names + out_names}")
    try:
        model = _dynamo_export(_Wrapper(prep.graph_module), example_inputs, in_names, out_names, opset)
    except Exception as e:  # noqa: BLE001
        op = _unsupported_op(e)
        what = f"op {op} has no ONNX translation" if op else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise ExportError(
            f"graph {graph_name!r} could not be exported to ONNX: {what}. Register a decomposition for it in "
            f"lwcompile.passes.onnx_export.EXTRA_DECOMPOSITIONS (aten op -> function of forward ops), or "
            f"rewrite the model so the op does not appear.") from e
    model = _fit_versions(model)
    _pin_scalar_outputs(model)
    model.graph.name = re.sub(r"\W", "_", graph_name) or "graph"
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != in_names or got_out != out_names:
        raise ExportError(f"{graph_name}: exported names {got_in} -> {got_out} differ from the requested "
                          f"{in_names} -> {out_names}")
    return model


def export_graph_module(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None, path: str,
                        input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                        opset: int = 18, graph_name: str | None = None) -> onnx.ModelProto:
    """Write ``gm`` to the standalone ONNX file ``path`` (atomically) and return the ModelProto.

    Inputs keep ``input_names`` (default: the placeholders' names); outputs are ``output_names`` (default
    ``out0, out1, ...``) followed by ``new__<input>`` for every input the graph mutates in place. Shapes are the
    example inputs' (static). ``example_inputs=None`` uses zeros shaped like the placeholders' make_fx metadata.
    """
    name = graph_name or os.path.splitext(os.path.basename(path))[0]
    model = graph_to_onnx(gm, example_inputs, input_names, output_names, opset, name)
    try:
        _atomic_save(model, path)
    except OSError as e:
        raise ExportError(f"graph {name!r}: cannot write {path}: {e}") from e
    return model


# ---------------------------------------------------------------------------------------------------------------
# Manifest and directory export
# ---------------------------------------------------------------------------------------------------------------
_ELEM = {v: k for k, v in onnx.TensorProto.DataType.items()}


def _value_info(v) -> dict:
    t = v.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": v.name, "shape": shape, "dtype": _ELEM.get(t.elem_type, str(t.elem_type)).lower()}


def describe_model(model: onnx.ModelProto) -> dict:
    """Inputs and outputs (name, shape, dtype) and versions of a model, for the manifest."""
    return {
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "ir_version": model.ir_version,
    }


@dataclass
class GraphExport:
    """One graph to write with :func:`export_onnx_dir`. ``file`` defaults to ``<name>.onnx``."""

    name: str
    graph_module: torch.fx.GraphModule
    example_inputs: Sequence[torch.Tensor]
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    block: str | None = None
    device: str | None = None
    kind: str = "graph"  # "target" | "inner" | anything descriptive
    file: str | None = None


@dataclass
class TrainingExport:
    """One block's onnxruntime-training artifacts for :func:`export_onnx_dir` (kwargs of export_training_artifacts)."""

    block: str
    kwargs: dict = field(default_factory=dict)
    device: str | None = None
    subdir: str | None = None  # default training/<block>


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def export_onnx_dir(out_dir: str, graphs: Sequence[GraphExport], training: Sequence[TrainingExport] = (),
                    opset: int = 18, meta: dict | None = None, overwrite: bool = True) -> dict:
    """Write several graphs (and training artifacts) into ``out_dir`` atomically, with a ``manifest.json``.

    Everything is written into ``<out_dir>.tmp-XXXX`` first and renamed to ``out_dir`` at the end; on any failure the
    temp dir is removed and ``out_dir`` is left as it was. Returns the manifest (also in ``manifest.json``)::

        {"format": "lwcompile-onnx/1", "opset": 18, "mutated_output_prefix": "new__", "meta": {...},
         "files": [{"file": "target.onnx", "name": ..., "kind": ..., "block": ..., "device": ...,
                    "inputs": [{"name", "shape", "dtype"}], "outputs": [...], "mutates": {"new__X": "X"}}, ...],
         "training": [{"block": ..., "dir": "training/fc1", "files": [...], "inputs": [...], "params": [...], ...}]}
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists (pass overwrite=True to replace it)")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    manifest: dict[str, Any] = {"format": "lwcompile-onnx/1", "opset": opset, "mutated_output_prefix": MUTATED_PREFIX,
                                "meta": meta or {}, "files": [], "training": []}
    try:
        used = set()
        for ge in graphs:
            fname = ge.file or _safe(ge.name) + ".onnx"
            if fname in used:
                raise ExportError(f"two graphs write {fname}")
            used.add(fname)
            model = export_graph_module(ge.graph_module, ge.example_inputs, os.path.join(tmp, fname),
                                        ge.input_names, ge.output_names, opset, ge.name)
            desc = describe_model(model)
            mutates = {o["name"]: o["name"][len(MUTATED_PREFIX):] for o in desc["outputs"]
                       if o["name"].startswith(MUTATED_PREFIX)}
            manifest["files"].append({"file": fname, "name": ge.name, "kind": ge.kind, "block": ge.block,
                                      "device": ge.device, **desc, "mutates": mutates})
        for te in training:
            sub = te.subdir or os.path.join("training", _safe(te.block))
            info = export_training_artifacts(**te.kwargs, out_dir=os.path.join(tmp, sub))
            info.update({"block": te.block, "device": te.device, "dir": sub,
                         "files": [os.path.join(sub, f) for f in info["files"]]})
            manifest["training"].append(info)
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=2, default=str)
        if os.path.exists(out_dir):
            old = out_dir + ".old-" + os.path.basename(tmp).rsplit("-", 1)[-1]
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# onnxruntime-training artifacts for one block
# ---------------------------------------------------------------------------------------------------------------
LOCAL_LOSSES = ("squared_pre", "squared_post", "matching", "dual_bregman")
ARTIFACT_TRANSFERS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "softplus", "elu")


class _LinearTransform(torch.nn.Module):
    def __init__(self, op, weight, bias, attrs):
        super().__init__()
        from lwcompile.passes.linear_ops import LINEAR_OPS
        if op not in LINEAR_OPS:
            raise ExportError(f"training artifacts: unknown block op {op!r}; known: {sorted(LINEAR_OPS)}")
        self._apply = LINEAR_OPS[op].apply
        self._attrs = dict(attrs)
        self.weight = torch.nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone().float())

    def forward(self, x):
        return self._apply(x, self.weight, self.bias, self._attrs)


def _loss_block(local_loss: str, transfer: str, tkw: dict, prox: float, params: list[str]):
    """A custom onnxblock.Block: sum of the local loss over every element + (λ/2)‖θ − θ0‖² over ``params``.

    Built from plain ONNX ops whose gradients onnxruntime-training implements. Its value is
      squared_pre  ½Σ(z − a)²            squared_post ½Σ(f(z) − y)²
      matching     ΣF(z) − Σ y·z         dual_bregman Σ[f(z)(z − a) − F(z) + F(a)]
    whose z-gradients are those of METHOD.md's table.
    """
    from onnxruntime.training import onnxblock
    from onnx import helper, TensorProto

    class LocalLoss(onnxblock.Block):
        def build(self, z_name):
            g = self.base.graph
            counter = [0]

            def node(op, *ins, _out=None, **attrs):
                counter[0] += 1
                out = _out or f"lw_{op.lower()}_{counter[0]}"
                g.node.append(helper.make_node(op, list(ins), [out], name=f"lw_{op}_{counter[0]}", **attrs))
                return out

            def const(v):
                counter[0] += 1
                nm = f"lw_const_{counter[0]}"
                g.initializer.append(helper.make_tensor(nm, TensorProto.FLOAT, [], [float(v)]))
                return nm

            def relu(t):
                return node("Relu", t)

            def softplus(t):  # log(1 + e^t), stable: relu(t) + log(1 + e^{-|t|})
                return node("Add", relu(t), node("Log", node("Add", const(1.0), node("Exp", node("Neg", node("Abs", t))))))

            def f(t):
                if transfer == "identity":
                    return t
                if transfer == "relu":
                    return relu(t)
                if transfer == "leaky_relu":
                    s = tkw.get("negative_slope", 0.01)
                    return node("Sub", relu(t), node("Mul", const(s), relu(node("Neg", t))))
                if transfer == "tanh":
                    return node("Tanh", t)
                if transfer == "sigmoid":
                    return node("Sigmoid", t)
                if transfer == "softplus":
                    b = tkw.get("beta", 1.0)
                    return node("Div", softplus(node("Mul", const(b), t)), const(b))
                if transfer == "elu":
                    a = tkw.get("alpha", 1.0)
                    neg = node("Neg", relu(node("Neg", t)))  # min(t, 0)
                    return node("Add", relu(t), node("Mul", const(a), node("Sub", node("Exp", neg), const(1.0))))
                raise ExportError(f"training artifacts: transfer {transfer!r} not supported; "
                                  f"supported: {ARTIFACT_TRANSFERS}")

            def Fpot(t):  # element-wise F with F' = f
                if transfer == "identity":
                    return node("Mul", const(0.5), node("Mul", t, t))
                if transfer in ("relu", "leaky_relu"):
                    s = tkw.get("negative_slope", 0.01) if transfer == "leaky_relu" else 0.0
                    p, n = relu(t), relu(node("Neg", t))
                    return node("Mul", const(0.5), node("Add", node("Mul", p, p), node("Mul", const(s), node("Mul", n, n))))
                if transfer == "tanh":  # log cosh t = |t| + softplus(−2|t|) − log 2
                    a = node("Abs", t)
                    return node("Sub", node("Add", a, softplus(node("Mul", const(-2.0), a))), const(0.6931471805599453))
                if transfer == "sigmoid":  # t + softplus(−t)
                    return node("Add", t, softplus(node("Neg", t)))
                if transfer == "elu":
                    a = tkw.get("alpha", 1.0)
                    p = relu(t)
                    neg = node("Neg", relu(node("Neg", t)))
                    return node("Add", node("Mul", const(0.5), node("Mul", p, p)),
                                node("Mul", const(a), node("Sub", node("Sub", node("Exp", neg), const(1.0)), neg)))
                raise ExportError(f"training artifacts: the {local_loss} loss needs F for transfer {transfer!r}, "
                                  f"which is only provided for identity, relu, leaky_relu, tanh, sigmoid, elu")

            def total(t):
                return node("ReduceSum", t, keepdims=0)

            tgt = "target"
            if local_loss == "squared_pre":
                d = node("Sub", z_name, tgt)
                loss = node("Mul", const(0.5), total(node("Mul", d, d)))
            elif local_loss == "squared_post":
                d = node("Sub", f(z_name), tgt)
                loss = node("Mul", const(0.5), total(node("Mul", d, d)))
            elif local_loss == "matching":
                loss = node("Sub", total(Fpot(z_name)), total(node("Mul", tgt, z_name)))
            elif local_loss == "dual_bregman":
                e = node("Sub", node("Mul", f(z_name), node("Sub", z_name, tgt)), Fpot(z_name))
                loss = node("Add", total(e), total(Fpot(tgt)))
            else:
                raise ExportError(f"training artifacts: local loss {local_loss!r} unknown; known: {LOCAL_LOSSES}")
            if prox > 0:
                for p in params:
                    d = node("Sub", p, p + "_ref")
                    loss = node("Add", loss, node("Mul", const(prox / 2), total(node("Mul", d, d))))
            return node("Identity", loss, _out="loss")

    return LocalLoss()


def export_training_artifacts(block_op, weight: torch.Tensor, bias: torch.Tensor | None, x_example: torch.Tensor,
                              target_example: torch.Tensor, transfer: str = "identity",
                              local_loss: str = "squared_pre", prox: float = 0.0, optimizer: str = "sgd",
                              out_dir: str = "artifacts", attrs: dict | None = None,
                              transfer_kwargs: dict | None = None, opset: int = 18,
                              optimizer_options: dict | None = None) -> dict:
    """onnxruntime-training artifacts for one block's inner loop, written to ``out_dir`` (atomically).

    ``block_op`` is an op kind of ``LINEAR_OPS`` ("linear", "conv2d", ...) or an ``lwcompile.ir.Block`` (its op,
    attrs and transfer kwargs are used). Graph inputs of the training model: ``x``, ``target`` and, when
    ``prox > 0``, ``weight_ref`` (and ``bias_ref``) — the frozen W0 of the proximal term. Trainable parameters:
    ``weight`` (and ``bias``). The loss is summed over the batch (METHOD.md). ``optimizer``: "sgd" (W ← W − lr·g)
    or "adamw": onnxruntime's AdamWOptimizer in its Hugging Face mode (adam_mode=1): m, v as Adam,
    W ← W − lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε), then W ← W − lr·wd·W. ``optimizer_options``: betas (0.9, 0.999),
    eps (1e-8 here; onnxruntime's own default is 1e-6), weight_decay (0.0), bias_correction (True).
    The learning rate is not baked in: set it at run time (``OrtTrainingBlock.train(..., lr=)``).
    Files: training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint, lwblock.json (this description).
    Returns the description.
    """
    from onnxruntime.training import artifacts as ort_artifacts

    if hasattr(block_op, "op") and hasattr(block_op, "attrs"):  # an ir.Block
        attrs = dict(block_op.attrs) if attrs is None else attrs
        transfer_kwargs = dict(block_op.transfer_kwargs) if transfer_kwargs is None else transfer_kwargs
        block_op = block_op.op
    attrs = dict(attrs or {})
    tkw = dict(transfer_kwargs or {})
    if block_op.startswith("conv") and not attrs:
        nd = int(block_op[-2])
        attrs = {"stride": (1,) * nd, "padding": (0,) * nd, "dilation": (1,) * nd, "groups": 1,
                 "output_padding": (0,) * nd}
    if local_loss not in LOCAL_LOSSES:
        raise ExportError(f"training artifacts: local loss {local_loss!r} unknown; known: {LOCAL_LOSSES}")
    if local_loss != "squared_pre" and transfer not in ARTIFACT_TRANSFERS:  # squared_pre never applies f
        raise ExportError(f"training artifacts: transfer {transfer!r} not supported; supported: {ARTIFACT_TRANSFERS}")
    opts = dict(optimizer_options or {})
    if optimizer == "sgd":
        if opts:
            raise ExportError(f"training artifacts: SGD takes no options (got {sorted(opts)}); the lr is set at run time")
        optim = ort_artifacts.OptimType.SGD
    elif optimizer == "adamw":
        from onnxruntime.training import onnxblock
        bad = set(opts) - {"betas", "eps", "weight_decay", "bias_correction"}
        if bad:
            raise ExportError(f"training artifacts: unknown AdamW options {sorted(bad)}")
        opts.setdefault("eps", 1e-8)
        opts.setdefault("weight_decay", 0.0)
        optim = onnxblock.optim.AdamW(**{k: (tuple(v) if k == "betas" else v) for k, v in opts.items()})
    else:
        raise ExportError(f"training artifacts: optimizer {optimizer!r} unknown; use 'sgd' or 'adamw'")

    mod = _LinearTransform(block_op, weight, bias, attrs)
    params = ["weight"] + ([] if bias is None else ["bias"])
    try:
        base = _fit_versions(_dynamo_export(mod, (x_example.detach().float(),), ["x"], ["z"], opset))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"training artifacts: the {block_op} transform could not be exported: {e}") from e
    inits = {i.name for i in base.graph.initializer}
    if not set(params) <= inits:
        raise ExportError(f"training artifacts: exported {block_op} has initializers {sorted(inits)}, "
                          f"expected {params}")
    # graph inputs the loss reads: the target (shape of z) and the frozen W0 (shapes of the params)
    from onnx import helper, TensorProto
    z_shape = list(target_example.shape)
    base.graph.input.append(helper.make_tensor_value_info("target", TensorProto.FLOAT, z_shape))
    if prox > 0:
        shapes = {"weight": list(weight.shape), "bias": None if bias is None else list(bias.shape)}
        for p in params:
            base.graph.input.append(helper.make_tensor_value_info(p + "_ref", TensorProto.FLOAT, shapes[p]))
    loss = _loss_block(local_loss, transfer, tkw, prox, params)

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        with _quiet(), _ort_log_level(3):
            ort_artifacts.generate_artifacts(base, requires_grad=params, frozen_params=[], loss=loss,
                                             optimizer=optim, artifact_directory=tmp)
        files = sorted(f for f in os.listdir(tmp) if not f.startswith("temp"))
        for f in os.listdir(tmp):
            if f.startswith("temp"):
                os.remove(os.path.join(tmp, f))
        info = {"op": block_op, "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
                "transfer": transfer, "transfer_kwargs": tkw, "local_loss": local_loss, "prox": prox,
                "optimizer": optimizer, "optimizer_options": opts, "params": params,
                "inputs": ["x", "target"] + ([p + "_ref" for p in params] if prox > 0 else []),
                "x_shape": list(x_example.shape), "target_shape": z_shape,
                "files": files + ["lwblock.json"]}
        with open(os.path.join(tmp, "lwblock.json"), "w") as fh:
            json.dump(info, fh, indent=2, default=str)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except ExportError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"training artifacts for {block_op}/{transfer}/{local_loss} failed: "
                          f"{type(e).__name__}: {e}") from e
    return info


# ---------------------------------------------------------------------------------------------------------------
# A compiled Program -> a directory
# ---------------------------------------------------------------------------------------------------------------
def export_program(prog, out_dir: str, devices: Mapping[str, str] | None = None, training: bool = True,
                   optimizer: str = "sgd", opset: int = 18, example_labels: Any = None) -> dict:
    """``prog.export_onnx(out_dir)``: the target graph, every block's inner-update graph and (``training=True``)
    its onnxruntime-training artifacts, plus ``manifest.json`` (see :func:`export_onnx_dir`).

    ``devices`` maps block names to device strings for the manifest (e.g. from a plan). The target graph must have
    been built (``prog.step`` once, or ``example_labels`` given). Blocks whose (transfer, local loss) pair has no
    artifact loss (e.g. GELU with the matching loss) are listed under ``"training_skipped"`` with the reason.
    """
    devices = dict(devices or {})
    if example_labels is not None:
        prog.build_target_graph(example_labels)
    tg = prog.target_graph
    sig = prog.target_signature
    # ONNX names are SSA values, so an output may not reuse an input's name: the signature's block-input outputs
    # "input:<block>" collide with model inputs "input:<i>" when a block is named like an index ("0").
    t_ins = list(sig.input_names)
    t_outs = [("block_" + o if o in t_ins else o) for o in sig.output_names]
    graphs = [GraphExport("target", tg, None, t_ins, t_outs, kind="target")]
    train, skipped = [], {}
    cfg = prog.config
    for b in prog.blocks:
        ins, outs = prog.inner_io_names(b.name)
        graphs.append(GraphExport(f"inner/{b.name}", prog.inner_graph(b.name), None, ins, outs, block=b.name,
                                  device=devices.get(b.name), kind="inner"))
        if not training:
            continue
        if cfg.local_loss != "squared_pre" and b.transfer not in ARTIFACT_TRANSFERS:
            skipped[b.name] = f"transfer {b.transfer!r} has no artifact loss for {cfg.local_loss!r}"
            continue
        weight = prog.model.get_parameter(b.weight).detach().float().cpu()
        bias = None if b.bias is None else prog.model.get_parameter(b.bias).detach().float().cpu()
        train.append(TrainingExport(b.name, dict(
            block_op=b, weight=weight, bias=bias, x_example=torch.zeros(b.input_shape),
            target_example=torch.zeros(b.output_shape), transfer=b.transfer, local_loss=cfg.local_loss,
            prox=float(cfg.prox), optimizer=optimizer, opset=opset), device=devices.get(b.name)))
    return export_onnx_dir(out_dir, graphs, train, opset=opset,
                           meta={"config": {k: v for k, v in vars(cfg).items()} if hasattr(cfg, "__dict__") else {},
                                 "blocks": [b.name for b in prog.blocks], "training_skipped": skipped})
