"""Serialize a compiled Program to a directory that trains from files alone (``prog.export_onnx(dir)``).

It reads the Program through its public surface only (graphs, signatures, blocks, states) and writes, through
:mod:`lwcompile.passes.onnx_files` (which refuses a file, a non-empty directory that is not a previous export, and a
previous export without ``overwrite=True`` or holding files it did not write; it never deletes or renames a file
lwcompile did not write): ``target.onnx``; ``inner_<block>.onnx`` per block; ``training/<block>/``
(onnxruntime-training artifacts, see :mod:`lwcompile.passes.onnx_training`); ``params.npz`` and ``buffers.npz``
(current values by FQN); ``inner_state.npz`` (``<block>/state<i>``); ``outer_state.npz`` (``<param FQN>/<slot>``:
the outer torch.optim state, when it has any); and ``manifest.json``, whose ``"program"`` section names
everything a runtime needs (see :func:`program_manifest`). :class:`lwcompile.runtime.ort.OrtProgram` trains from
the directory with onnxruntime alone. Graph-level export is :mod:`lwcompile.passes.onnx_export`.

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(16, 4), steps=2)
    >>> refuse_unexportable(prog, training=True)   # nothing the files could not express
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lwcompile.errors import ConfigError, ExportError
from lwcompile.passes.inner import inner_lr_factor
from lwcompile.passes.onnx_files import GraphExport, TrainingExport, check_out_dir, export_onnx_dir, safe_name
from lwcompile.passes.onnx_training import artifact_supported


def refuse_unexportable(prog, training: bool) -> None:
    """Patterns the torch runtime compiles exactly but the exported files would not reproduce."""
    if prog.config.inner_optimizer == "exact":
        raise ExportError("Config(inner_optimizer='exact'): the inner graphs' Cholesky solve "
                          "(torch.ops.lwcompile.spd_solve) has no ONNX translation; train with prog.step, or export a "
                          "program compiled with an iterative inner optimizer.")
    gm = prog.trace_result.graph_module
    names = {n for n, _ in gm.named_parameters()}
    nonblock = {id(gm.get_parameter(n)) for n in prog.nonblock}
    for b in prog.blocks:
        tied = [p for p in b.params if p not in names or id(gm.get_parameter(p)) in nonblock]
        if tied:
            raise ExportError(f"block {b.name!r}: parameter {tied[0]!r} is tied to another use (shared weights); "
                              "the ONNX files store and update each parameter name separately, so they cannot "
                              "express it. Train it with prog.step, or untie the weights to export.")
        if b.frozen and training:
            raise ExportError(f"block {b.name!r}: parameter {b.frozen[0]!r} has requires_grad=False, which the "
                              "onnxruntime-training artifacts would train; export with training=False (the "
                              "inner-update graphs keep it fixed).")


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
    state = {f"{p}/{slot}": np_of(v) for p, slots in prog.outer_state().items() for slot, v in slots.items()
             if isinstance(v, torch.Tensor)}
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
                  "lr_factors": [inner_lr_factor(k, cfg.steps, cfg.inner_lr_decay) for k in range(cfg.steps)],
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
