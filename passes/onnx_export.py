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
3. :func:`export_program` (``prog.export_onnx(dir)``) writes, through :mod:`lwcompile.passes.onnx_files` (which
   refuses a file, a non-empty directory that is not a previous export, and a previous export without
   ``overwrite=True`` or holding files it did not write; it never deletes or renames a file lwcompile did not write):
   ``target.onnx``; ``inner_<block>.onnx`` per block; ``training/<block>/`` (onnxruntime-training artifacts, see
   :mod:`lwcompile.passes.onnx_training`); ``params.npz`` and ``buffers.npz`` (current values by FQN);
   ``inner_state.npz`` (``<block>/state<i>``: each block's inner-optimizer state); ``outer_state.npz``
   (``<param FQN>/<slot>``: the outer torch.optim state, when it has any); and ``manifest.json``, whose
   ``"program"`` section names everything a runtime needs (see :func:`program_manifest`).
   :class:`lwcompile.runtime.ort.OrtProgram` trains from the directory with onnxruntime alone.

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
import dataclasses
import os
import re
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch

from lwcompile.errors import ConfigError, ExportError
from lwcompile.passes.onnx_decomp import (MAX_IR_VERSION, GraphWrapper, dynamo_export, export_decompositions,
                                          UnsupportedOpsError, placeholder_names, prepare_graph,
                                          translate_prepared)
from lwcompile.passes.onnx_files import (FORMAT, GraphExport, TrainingExport, check_out_dir, describe_model,
                                         export_onnx_dir, safe_name)
from lwcompile.passes.onnx_training import artifact_supported, export_training_artifacts

__all__ = ["MAX_OPSET", "MAX_IR_VERSION", "MUTATED_PREFIX", "FORMAT", "graph_to_onnx", "export_graph_module",
           "examples_from_meta", "describe_model", "GraphExport", "TrainingExport", "export_onnx_dir",
           "export_program", "program_manifest", "export_training_artifacts"]

MAX_OPSET = 21
MUTATED_PREFIX = "new__"  # output "new__X" is the value input X holds after the graph ran (in-place mutation)


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
    example inputs' (static). ``example_inputs=None`` uses zeros shaped like the placeholders' make_fx metadata.
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
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------
# A compiled Program -> a directory that trains from files alone
# ---------------------------------------------------------------------------------------------------------------
def export_program(prog, out_dir: str, devices: Any = None, training: bool = True, optimizer: str = "sgd",
                   opset: int = 18, example_labels: Any = None, overwrite: bool = False) -> dict:
    """``prog.export_onnx(out_dir)``: the target graph, every block's inner-update graph, (``training=True``) its
    onnxruntime-training artifacts, the current parameters, buffers and optimizer states, and ``manifest.json``.

    ``devices``: a plan (``prog.plan(...)``), or a mapping device -> block names, or block name -> device; recorded
    per block in the manifest. The target graph must have been built (``prog.step`` once, or ``example_labels``
    given); every graph has the static shapes of that batch. Blocks whose (transfer, local loss) pair has no
    artifact loss (e.g. GELU with the matching loss) are listed under ``"training_skipped"`` with the reason.
    ``optimizer``: the artifacts' optimizer, "sgd" or "adamw" (the lr is set at run time). ``out_dir`` must be
    missing or empty, or (``overwrite=True``) a previous export holding nothing else: anything else raises
    :class:`ExportError` before the program or the directory is touched.

    Example:
        >>> import torch, lwcompile
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(16, 4), steps=2)
        >>> man = prog.export_onnx("/tmp/lw_prog", example_labels=torch.randn(16, 2))   # doctest: +SKIP
        >>> [b["file"] for b in man["program"]["blocks"]]                                # doctest: +SKIP
        ['inner_0.onnx', 'inner_2.onnx']
    """
    check_out_dir(out_dir, overwrite)  # refuse before building graphs (slow, and it changes prog); rechecked later
    if example_labels is not None:
        prog.build_target_graph(example_labels)
    tg, sig = prog.target_graph, prog.target_signature
    where = _device_map(devices, [b.name for b in prog.blocks])
    batch = _batch_sizes(tg, sig)
    graphs = [GraphExport("target", tg, None, sig.input_names, sig.output_names, kind="target", file="target.onnx")]
    train, skipped = [], {}
    cfg = prog.config
    for b in prog.blocks:
        ins, outs = prog.inner_io_names(b.name)
        graphs.append(GraphExport(f"inner/{b.name}", prog.inner_graph(b.name, batch[b.name]), None, ins, outs,
                                  block=b.name, device=where.get(b.name), kind="inner", file=_inner_file(b.name)))
        if not training:
            continue
        if not artifact_supported(cfg.local_loss, b.transfer):
            skipped[b.name] = f"transfer {b.transfer!r} has no artifact loss for {cfg.local_loss!r}"
            continue
        weight = _value(prog, b.weight).float()
        bias = None if b.bias is None else _value(prog, b.bias).float()
        shape = lambda s: (batch[b.name], *s[1:])  # noqa: E731
        train.append(TrainingExport(b.name, dict(
            block_op=b, weight=weight, bias=bias, x_example=torch.zeros(shape(b.input_shape)),
            target_example=torch.zeros(shape(b.output_shape)), transfer=b.transfer, local_loss=cfg.local_loss,
            prox=float(cfg.prox), optimizer=optimizer, opset=opset), device=where.get(b.name),
            subdir=_training_dir(b.name)))
    arrays = program_arrays(prog)
    program = program_manifest(prog, where, batch, {t.block for t in train}, arrays)
    meta = {"blocks": [b.name for b in prog.blocks], "training_skipped": skipped}
    try:
        return export_onnx_dir(out_dir, graphs, train, opset=opset, meta=meta, arrays=arrays, program=program,
                               overwrite=overwrite)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"exporting the program to {out_dir} failed: {type(e).__name__}: {e}") from e


def _inner_file(block: str) -> str:
    return f"inner_{safe_name(block)}.onnx"


def _training_dir(block: str) -> str:
    return f"training/{safe_name(block)}"


def _value(prog, name: str) -> torch.Tensor:
    gm = prog.trace_result.graph_module
    try:
        return gm.get_parameter(name).detach().cpu()
    except AttributeError:
        return gm.get_buffer(name).detach().cpu()


def _device_map(devices: Any, blocks: Sequence[str]) -> dict[str, str]:
    """Block -> device from a Plan, a mapping device -> blocks, or a mapping block -> device."""
    if devices is None:
        return {}
    items = dict(getattr(devices, "assignment", devices))
    if all(isinstance(v, (list, tuple)) for v in items.values()):
        items = {b: d for d, bs in items.items() for b in bs}
    unknown = sorted(set(items) - set(blocks))
    if unknown:
        raise ConfigError(f"export devices name unknown block(s) {unknown}; blocks are {list(blocks)}. Pass a plan "
                          "(prog.plan(...)), {device: [blocks]} or {block: device}.")
    return {b: str(d) for b, d in items.items()}


def _batch_sizes(tg: torch.fx.GraphModule, sig) -> dict[str, int]:
    """Each block's batch in the target graph (its input's first dimension), from make_fx's metadata."""
    out = next(n for n in tg.graph.nodes if n.op == "output").args[0]
    vals = dict(zip(sig.output_names, out))
    res = {}
    for b in sig.blocks:
        v = vals[f"block_input:{b}"].meta.get("val")
        if v is None or v.dim() == 0:
            raise ExportError(f"target graph: block {b!r}'s input has no recorded shape; rebuild the target graph")
        res[b] = int(v.shape[0])
    return res


def program_arrays(prog) -> dict[str, dict[str, np.ndarray]]:
    """The program's state as named numpy arrays, by file: params.npz and buffers.npz (by FQN), inner_state.npz
    (``<block>/state<i>``) and, when the outer optimizer has state, outer_state.npz (``<param FQN>/<slot>``)."""
    sig = prog.target_signature
    np_of = lambda t: t.detach().cpu().numpy().copy()  # noqa: E731
    out = {"params.npz": {p: np_of(_value(prog, p)) for p in sig.params},
           "buffers.npz": {b: np_of(_value(prog, b)) for b in sig.buffers},
           "inner_state.npz": {f"{b}/state{i}": np_of(s) for b, st in prog.inner_state.items()
                               for i, s in enumerate(st)}}
    outer = getattr(prog, "_outer", None)  # the Program's torch.optim optimizer over the non-block parameters
    state = {}
    if outer is not None:
        for p in sig.nonblock:
            for slot, v in outer.state.get(prog.trace_result.graph_module.get_parameter(p), {}).items():
                if isinstance(v, torch.Tensor):
                    state[f"{p}/{slot}"] = np_of(v)
    if state:
        out["outer_state.npz"] = state
    return out


def program_manifest(prog, devices: Mapping[str, str], batch: Mapping[str, int], trained: set[str],
                     arrays: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """The manifest's ``"program"`` section: everything :class:`lwcompile.runtime.ort.OrtProgram` needs.

    ``config`` (``lwcompile.Config(**config)`` rebuilds it); ``inner`` (optimizer, options with defaults, the current
    lr, T, decay, prox); ``outer`` (optimizer, lr, options, the non-block params, its state file); ``target`` (file,
    names of its inputs by role and of its outputs by meaning); ``blocks`` (per block: params FQNs, inner-graph file,
    its input/output names, state keys, device, training-artifact dir, batch); ``params``/``buffers`` files.
    """
    cfg, sig = prog.config, prog.target_signature
    config = dataclasses.asdict(cfg)
    config["outer_options"] = dict(cfg.outer_options)
    n_p, n_b = len(sig.params), len(sig.buffers)
    ins = sig.input_names
    blocks = []
    for b in prog.blocks:
        i_names, o_names = prog.inner_io_names(b.name)
        state = [n for n in i_names if n.startswith("state")]
        blocks.append({"name": b.name, "op": b.op, "transfer": b.transfer, "weight": b.weight, "bias": b.bias,
                       "params": list(b.params), "file": _inner_file(b.name), "inputs": i_names, "outputs": o_names,
                       "state": [f"{b.name}/{s}" for s in state], "device": devices.get(b.name),
                       "training": _training_dir(b.name) if b.name in trained else None, "batch": batch[b.name]})
    return {
        "frontend": prog.frontend, "step_count": prog.step_count, "config": config,
        "inner": {"optimizer": cfg.inner_optimizer, "options": cfg.optimizer_options(), "lr": prog.inner_lr,
                  "steps": cfg.steps, "lr_decay": cfg.inner_lr_decay, "prox": cfg.prox,
                  "local_loss": cfg.local_loss, "state_file": "inner_state.npz"},
        "outer": {"optimizer": cfg.outer_optimizer, "lr": cfg.outer_lr, "options": dict(cfg.outer_options),
                  "params": list(sig.nonblock),
                  "state_file": "outer_state.npz" if "outer_state.npz" in arrays else None},
        "target": {"file": "target.onnx", "params": ins[:n_p], "buffers": ins[n_p:n_p + n_b],
                   "inputs": ins[n_p + n_b:n_p + n_b + sig.n_inputs], "labels": ins[n_p + n_b + sig.n_inputs:],
                   "loss": "loss", "block_inputs": {b: f"block_input:{b}" for b in sig.blocks},
                   "targets": {b: f"target:{b}" for b in sig.blocks},
                   "grads": {p: f"grad:{p}" for p in sig.nonblock}},
        "params": list(sig.params), "buffers": list(sig.buffers), "nonblock": list(sig.nonblock),
        "blocks": blocks, "params_file": "params.npz", "buffers_file": "buffers.npz",
    }
