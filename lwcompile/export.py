"""Serialize a compiled Program to a directory that trains from files alone (``prog.export_onnx(dir)``).

It reads the Program through its public surface only (graphs, signatures, blocks, states) and writes, through
:mod:`lwcompile.passes.onnx_files` (which refuses a file, a non-empty directory that is not a previous export, and a
previous export without ``overwrite=True`` or holding files it did not write; it never deletes or renames a file
lwcompile did not write): ``target.onnx``; ``inner_<block>.onnx`` per block; ``training/<block>/``
(onnxruntime-training artifacts, see :mod:`lwcompile.passes.onnx_training`); ``params.npz`` and ``buffers.npz``
(current values by FQN); ``inner_state.npz`` (``<block>/state<i>``); ``outer_state.npz`` (``<param FQN>/<slot>``:
the outer torch.optim state, when it has any); and ``manifest.json``, whose ``"program"`` section names
everything a runtime needs (see :func:`program_manifest`). :class:`lwcompile.runtime.ort.OrtProgram` trains from
the directory with onnxruntime alone, at any batch size: every graph is traced again for the export with a
symbolic batch (:mod:`lwcompile.passes.onnx_dynamic`). Graph-level export is :mod:`lwcompile.passes.onnx_export`.

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

from lwcompile.errors import ConfigError, ExportError, LwcompileError
from lwcompile.ir import as_tuple
from lwcompile.labels import infer_example_labels
from lwcompile.passes.inner import build_inner_graph, inner_example, inner_lr_factor
from lwcompile.passes.onnx_dynamic import check_batch_dynamic, symbolic_dims, symbolic_examples
from lwcompile.passes.onnx_export import examples_from_meta, graph_to_onnx
from lwcompile.passes.onnx_files import GraphExport, TrainingExport, check_out_dir, export_onnx_dir, safe_name
from lwcompile.passes.onnx_training import artifact_supported
from lwcompile.passes.targets import build_target_graph, make_target_fn
from lwcompile.runtime.ort import EXACT_ARTIFACT_OPTIMIZER


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


def export_program(prog, out_dir: str, devices: Any = None, training: bool = True, optimizer: str = "auto",
                   opset: int = 18, example_labels: Any = None, overwrite: bool = False) -> dict:
    """``prog.export_onnx(out_dir)``: the target graph, every block's inner-update graph, (``training=True``) its
    onnxruntime-training artifacts, the current parameters, buffers and optimizer states, and ``manifest.json``.

    ``devices``: a plan (``prog.plan(...)``), or a mapping device -> block names, or block name -> device; recorded
    per block in the manifest. The graphs are traced for example labels (:func:`export_examples`: given here or to
    ``lwcompile.transform``, the last step's, or inferred from a standard loss) with a symbolic batch size: every
    file runs any batch (:func:`dynamic_target_graph`). Blocks whose (transfer, local loss) pair has no
    artifact loss (e.g. GELU with the matching loss) are listed under ``"training_skipped"`` with the reason.
    ``optimizer``: the artifacts' optimizer (the lr is set at run time): "auto" (default) reproduces the inner
    optimizer where onnxruntime-training has it (:data:`ARTIFACT_OPTIMIZER`: gd as "sgd", adam as "adam") and
    uses "sgd" otherwise; "sgd"; "adam" (onnxruntime's AdamW in torch mode without weight decay: torch.optim.Adam,
    the config's betas and eps); "adamw" (onnxruntime's Hugging Face AdamW, see ``export_training_artifacts``).
    ``out_dir`` must be missing or empty, or (``overwrite=True``) a previous export holding nothing else: anything
    else raises :class:`ExportError` before the program or the directory is touched.

    Example:
        >>> import torch, lwcompile
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(16, 4), steps=2)
        >>> man = prog.export_onnx("/tmp/lw_prog")   # labels inferred from mse_loss      # doctest: +SKIP
        >>> [b["file"] for b in man["program"]["blocks"]]                                # doctest: +SKIP
        ['inner_0.onnx', 'inner_2.onnx']
    """
    check_out_dir(out_dir, overwrite)  # refuse before building graphs (slow, and it changes prog); rechecked later
    inputs, labels = export_examples(prog, example_labels)
    tg = prog.build_target_graph(labels, inputs)  # checks the labels; gives the signature and example batch
    sig = prog.target_signature  # with Config.reuse_preactivation it returns each â, which the inner graphs take
    where = _device_map(devices, [b.name for b in prog.blocks])
    batch = _batch_sizes(tg, sig)
    dyn_tg, tex = dynamic_target_graph(prog, sig, inputs, labels, tg)
    shapes = block_shapes(tg, dyn_tg, sig)
    graphs = [GraphExport("target", dyn_tg, tex, sig.input_names, sig.output_names, kind="target",
                          file="target.onnx")]
    train, skipped = [], {}
    cfg = prog.config
    art_opt, art_opts, mode = artifact_optimizer(cfg, optimizer)
    for b in prog.blocks:
        ins, outs = prog.inner_signature(b.name, preact=sig.preacts).names()
        gm, ex = dynamic_inner_graph(prog, b, shapes[b.name], preact=sig.preacts)
        graphs.append(GraphExport(f"inner/{b.name}", gm, ex, ins, outs, block=b.name, device=where.get(b.name),
                                  kind="inner", file=_inner_file(b.name)))
        if not training:
            continue
        if not artifact_supported(cfg.local_loss, b.transfer):
            skipped[b.name] = f"transfer {b.transfer!r} has no artifact loss for {cfg.local_loss!r}"
            continue
        weight = _value(prog, b.weight).float()
        bias = None if b.bias is None else _value(prog, b.bias).float()
        (x_shape, x_dyn), (t_shape, t_dyn) = shapes[b.name]
        xt = symbolic_examples([torch.zeros(x_shape), torch.zeros(t_shape)], [x_dyn, t_dyn]).tensors
        train.append(TrainingExport(b.name, dict(
            block_op=b, weight=weight, bias=bias, x_example=xt[0], target_example=xt[1], transfer=b.transfer,
            local_loss=cfg.local_loss, prox=float(cfg.prox), optimizer=art_opt, optimizer_options=dict(art_opts),
            opset=opset), device=where.get(b.name), subdir=_training_dir(b.name), adam_mode=mode))
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


# inner optimizer -> the artifacts' optimizer that reproduces it exactly (onnxruntime-training has SGD and AdamW;
# AdamW in torch mode without weight decay is torch.optim.Adam, which the inner "adam" is); the runtime's table
ARTIFACT_OPTIMIZER = EXACT_ARTIFACT_OPTIMIZER


def artifact_optimizer(cfg, optimizer: str) -> tuple[str, dict, int | None]:
    """(optimizer, options, adam_mode) for ``export_training_artifacts``: "adam" is AdamW with the config's betas
    and eps, no weight decay, and onnxruntime's torch mode (adam_mode 0, set on the written optimizer graph)."""
    name = ARTIFACT_OPTIMIZER.get(cfg.inner_optimizer, "sgd") if optimizer == "auto" else optimizer
    if name == "adam":
        opts = cfg.optimizer_options() if cfg.inner_optimizer == "adam" else {"betas": (0.9, 0.999), "eps": 1e-8}
        return "adamw", {"betas": tuple(opts["betas"]), "eps": float(opts["eps"]), "weight_decay": 0.0}, 0
    if name not in ("sgd", "adamw"):
        raise ConfigError(f"export optimizer={optimizer!r}: use 'auto', 'sgd', 'adam' or 'adamw'.")
    return name, {}, None


def export_examples(prog, example_labels: Any = None) -> tuple[tuple, tuple]:
    """The example inputs and labels the exported graphs are traced for (only shapes and dtypes matter; the
    graphs run any batch size). Labels: ``example_labels``, else ``prog.example_labels`` (given to
    ``lwcompile.transform``), else those of the last step's target graph (with its inputs), else inferred from a
    standard loss (:mod:`lwcompile.labels`); else :class:`ExportError`."""
    if example_labels is not None:
        return prog.example_inputs, as_tuple(example_labels)
    if prog.example_labels is not None:
        return prog.example_inputs, prog.example_labels
    try:
        tg, sig = prog.target_graph, prog.target_signature
    except LwcompileError:
        pass
    else:
        ex = examples_from_meta(tg, "target")
        first = len(sig.params) + len(sig.buffers)
        return ex[first:first + sig.n_inputs], ex[first + sig.n_inputs:]
    labels = infer_example_labels(prog.model, prog.example_inputs, prog.loss_fn)
    if labels is None:
        name = getattr(prog.loss_fn, "__name__", type(prog.loss_fn).__name__)
        raise ExportError(f"export needs example labels for the loss {name!r} (the target graph is traced for "
                          "their shape and dtype): pass export_onnx(dir, example_labels=...) or "
                          "lwcompile.transform(..., example_labels=...), or call prog.step once. Standard losses "
                          "(MSE, L1, SmoothL1, Huber, BCE, cross-entropy, NLL) need none.")
    return prog.example_inputs, labels


def dynamic_target_graph(prog, sig, inputs: tuple, labels: tuple, static: torch.fx.GraphModule
                         ) -> tuple[torch.fx.GraphModule, tuple]:
    """The target graph traced again with a symbolic batch (the first dimension of every input and label), and
    the fake examples it was traced on; :class:`ExportError` when the model or loss fixes the batch size, or the
    symbolic trace fails (then the static graph's export error, which names the op, when it has one)."""
    gm0 = prog.trace_result.graph_module
    params = [gm0.get_parameter(n) for n in sig.params]
    fn = make_target_fn(prog.tapped, prog.blocks, prog.loss_fn, sig, prog.config.target, prog.config.gamma,
                        prog.trace_result.out_spec, param_tensors=params)
    flat = sig.pack(dict(zip(sig.params, params)), {n: gm0.get_buffer(n) for n in sig.buffers}, inputs, labels)
    fixed = len(sig.params) + len(sig.buffers)
    ex = symbolic_examples(flat, [i >= fixed and t.dim() > 0 for i, t in enumerate(flat)])
    recurrent = any(isinstance(m, torch.nn.RNNBase) for m in prog.model.modules())
    try:
        gm = build_target_graph(fn, ex.tensors, recurrent=recurrent)
    except LwcompileError as e:
        graph_to_onnx(static, None, sig.input_names, sig.output_names, graph_name="target")  # names an op it lacks
        raise ExportError(f"graph 'target' cannot be made batch-dynamic: tracing it with a symbolic batch size "
                          f"failed ({str(e.__cause__ or e).splitlines()[0]}). Use sizes computed from the input "
                          "(x.shape[0], or -1 in view/reshape) in the model and loss.") from e
    try:
        check_batch_dynamic(ex, "target")
    except ExportError as e:
        raise ExportError(f"{e}{literal_batch_nodes(prog.tapped, inputs)}") from None
    return gm, ex.tensors


def literal_batch_nodes(gm: torch.fx.GraphModule, inputs: tuple) -> str:
    """A hint naming the model graph's nodes that take the example batch size as a literal argument."""
    batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    hits = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        leaves = torch.utils._pytree.tree_leaves((n.args, n.kwargs))
        if batch is not None and any(type(a) is int and a == batch for a in leaves):
            hits.append(f"{n.name!r} ({n.format_node()})")
    if not hits:
        return ""
    return f" The model's graph passes the example batch size {batch} as a literal to: {'; '.join(hits[:3])}."


def block_shapes(static: torch.fx.GraphModule, dynamic: torch.fx.GraphModule, sig) -> dict:
    """Per block, ((input shape, its symbolic dims), (target shape, its symbolic dims)): the example's shapes from
    the static target graph, and which of their sizes follow the batch in the batch-dynamic one (the batch need not
    be first: an attention projection sees (sequence, batch, features))."""
    def outs(gm: torch.fx.GraphModule) -> dict:
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        return {name: n.meta["val"] for name, n in zip(sig.output_names, out)}

    st, dy = outs(static), outs(dynamic)
    return {b: tuple((tuple(st[k].shape), symbolic_dims(dy[k])) for k in (f"block_input:{b}", f"target:{b}"))
            for b in sig.blocks}


def dynamic_inner_graph(prog, block, shapes, preact: bool = False) -> tuple[torch.fx.GraphModule, tuple]:
    """Block ``block``'s inner-update graph traced with a symbolic batch: ``shapes`` (from :func:`block_shapes`)
    give x's and the target's example shapes and which of their dimensions follow the batch; ``preact``: the
    variant that takes the forward pass's pre-activation (shaped like the target, after ``lr``). The graph takes
    the target's offset (the target graph's ``offset:<block>`` output), as the program's own graphs do."""
    (x_shape, x_dyn), (t_shape, t_dyn) = shapes
    dtype = _value(prog, block.weight).dtype
    example = list(inner_example(block, prog.config, x_shape[0], dtype=dtype, preact=preact))
    n = len(prog.inner_signature(block.name).params)  # x and target follow the parameters
    example[n:n + 2] = torch.zeros(x_shape, dtype=dtype), torch.zeros(t_shape, dtype=dtype)
    dyn = {n: x_dyn, n + 1: t_dyn}
    if preact:
        example[n + 3] = torch.zeros(t_shape, dtype=dtype)
        dyn[n + 3] = t_dyn
    ex = symbolic_examples(example, [dyn.get(i, ()) for i in range(len(example))])
    gm = build_inner_graph(block, prog.config, ex.tensors, preact=preact, offset=True)  # as Program.step runs it
    check_batch_dynamic(ex, f"inner/{block.name}")
    return gm, ex.tensors


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
        i_names, o_names = prog.inner_signature(b.name, preact=sig.preacts).names()
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
                   "grads": {p: f"grad:{p}" for p in sig.nonblock},
                   "preacts": {b: f"preact:{b}" for b in sig.blocks} if sig.preacts else {},
                   # what each inner graph's "offset" input takes (training artifacts take the targets)
                   "offsets": {b: f"offset:{b}" for b in sig.blocks} if sig.offsets else {}},
        "params": list(sig.params), "buffers": list(sig.buffers), "nonblock": list(sig.nonblock),
        "blocks": blocks, "params_file": "params.npz", "buffers_file": "buffers.npz",
    }
