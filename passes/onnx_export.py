"""Export emitted graphs to standalone ONNX files, and a compiled Program to a directory that trains from files alone.

Route (torch 2.13, onnx 1.17, onnxruntime-training 1.19.2):

1. :func:`lwcompile.passes.onnx_decomp.prepare_graph` re-traces the GraphModule (made by ``make_fx``: flat tensor
   inputs, a flat tuple of tensor outputs) functionalized and with the backward ops torchlib lacks decomposed. In-place
   input mutations (BatchNorm running statistics) become **extra outputs** named ``new__<input name>``
   (``MUTATED_PREFIX``), after the graph's own outputs, in input order. A runtime that wants torch's in-place
   semantics copies each ``new__X`` output into input ``X`` (``OrtGraph.run_torch(..., write_back=True)``).
2. The dynamo ONNX exporter translates it with onnxscript's torchlib (opset 18 by default, ≤ 21); the model is saved
   with IR version ≤ 10 (what onnxruntime 1.19 loads), to a temp file renamed into place, so a failed export never
   leaves a half-written file.
3. A whole Program is written to a directory by :mod:`lwcompile.export` (``prog.export_onnx(dir)``), with the
   directory rules of :mod:`lwcompile.passes.onnx_files`.

Any failure raises :class:`lwcompile.errors.ExportError` naming the graph and the unsupported op.

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(16, 4), steps=2)
    >>> man = prog.export_onnx("/tmp/lw_onnx", example_labels=torch.randn(16, 2))  # doctest: +SKIP
    >>> [f["file"] for f in man["files"]]                                          # doctest: +SKIP
    ['target.onnx', 'inner_0.onnx', 'inner_2.onnx']
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Sequence

import onnx
import torch

from lwcompile.errors import ExportError
from lwcompile.safe_paths import ordinary_mode
from lwcompile.passes.onnx_decomp import (MAX_IR_VERSION, GraphWrapper, dynamo_export, export_decompositions,
                                          UnsupportedOpsError, placeholder_names, prepare_graph,
                                          translate_prepared)
from lwcompile.passes.onnx_dynamic import name_batch_dims
from lwcompile.passes.onnx_files import FORMAT, GraphExport, TrainingExport, describe_model, export_onnx_dir
from lwcompile.passes.onnx_training import export_training_artifacts
from lwcompile.ir import MUTATED_PREFIX

__all__ = ["MAX_OPSET", "MAX_IR_VERSION", "MUTATED_PREFIX", "FORMAT", "graph_to_onnx", "export_graph_module",
           "examples_from_meta", "describe_model", "GraphExport", "TrainingExport", "export_onnx_dir",
           "export_training_artifacts"]

MAX_OPSET = 21


# ---------------------------------------------------------------------------------------------------------------
# One graph -> one file
# ---------------------------------------------------------------------------------------------------------------
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


def graph_to_onnx(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], input_names=None,
                  output_names=None, opset: int = 18, graph_name: str = "graph") -> onnx.ModelProto:
    """Convert ``gm`` to an in-memory ModelProto (see the module docstring for the route and naming).

    Fast route first (the exporter's decompositions applied in our re-trace, torchlib translating the result
    directly); if it fails for another reason than ops torchlib lacks, the public exporter's route, whose error is
    then the one reported.
    """
    if not 7 <= opset <= MAX_OPSET:
        raise ExportError(f"{graph_name}: opset {opset} not supported; use 18..{MAX_OPSET}")
    example_inputs = tuple(example_inputs) if example_inputs is not None else examples_from_meta(gm, graph_name)
    in_names = list(input_names) if input_names is not None else placeholder_names(gm)
    if len(in_names) != len(example_inputs):
        raise ExportError(f"{graph_name}: {len(in_names)} input names for {len(example_inputs)} example inputs")
    try:
        model, out_names = _lower(gm, example_inputs, in_names, output_names, opset, graph_name, fast=True)
    except ExportError as e:
        if isinstance(e.__cause__, UnsupportedOpsError):
            raise
        model, out_names = _lower(gm, example_inputs, in_names, output_names, opset, graph_name, fast=False)
    _pin_scalar_outputs(model)
    name_batch_dims(model, example_inputs)
    model.graph.name = re.sub(r"\W", "_", graph_name) or "graph"
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != in_names or got_out != out_names:
        raise ExportError(f"{graph_name}: exported names {got_in} -> {got_out} differ from the requested "
                          f"{in_names} -> {out_names}")
    return model


def _lower(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], in_names: list[str],
           output_names: Sequence[str] | None, opset: int, graph_name: str, fast: bool
           ) -> tuple[onnx.ModelProto, list[str]]:
    """Re-trace (functional, decomposed) and translate; returns the model and its output names."""
    try:
        prep = prepare_graph(gm, example_inputs, export_decompositions(full=fast))
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
        if fast:
            model = translate_prepared(prep.graph_module, example_inputs, in_names, out_names, opset)
        else:
            model = dynamo_export(GraphWrapper(prep.graph_module), example_inputs, in_names, out_names, opset)
    except Exception as e:  # noqa: BLE001
        op = _unsupported_op(e)
        what = (str(e) if isinstance(e, UnsupportedOpsError) else f"op {op} has no ONNX translation" if op
                else f"{type(e).__name__}: {str(e).splitlines()[0]}")
        raise ExportError(
            f"graph {graph_name!r} could not be exported to ONNX: {what}. Register a decomposition for each such op in "
            f"lwcompile.passes.onnx_decomp.EXTRA_DECOMPOSITIONS (aten op -> function of forward ops), or "
            f"rewrite the model so the op does not appear.") from e
    return model, out_names


def export_graph_module(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None, path: str,
                        input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                        opset: int = 18, graph_name: str | None = None) -> onnx.ModelProto:
    """Write ``gm`` to the standalone ONNX file ``path`` (atomically) and return the ModelProto.

    Inputs keep ``input_names`` (default: the placeholders' names); outputs are ``output_names`` (default
    ``out0, out1, ...``) followed by ``new__<input>`` for every input the graph mutates in place. Shapes are the
    example inputs': static, or symbolic where they are fake tensors with symbolic sizes
    (:func:`lwcompile.passes.onnx_dynamic.symbolic_examples`, the batch dimension named ``"batch"``).
    ``example_inputs=None`` uses zeros shaped like the placeholders' make_fx metadata.
    """
    name = graph_name or os.path.splitext(os.path.basename(path))[0]
    model = graph_to_onnx(gm, example_inputs, input_names, output_names, opset, name)
    try:
        _atomic_save(model, path)
    except OSError as e:
        raise ExportError(f"graph {name!r}: cannot write {path}: {e}") from e
    return model


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


def _atomic_save(model: onnx.ModelProto, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=d)
    os.close(fd)
    try:
        ordinary_mode(tmp)  # mkstemp's 0600 would stay with the graph: give it what open() gives any other file
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
