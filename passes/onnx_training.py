"""onnxruntime-training artifacts for one block's inner loop (a local loss + proximal term, SGD or AdamW).

The block's linear transform z = op(x; W, b) is exported with W, b as initializers ("weight", "bias"); a custom
``onnxblock`` loss appends the local loss of METHOD.md summed over the batch plus (λ/2)(‖W − W0‖² + ‖b − b0‖²),
with W0, b0 extra graph inputs ("weight_ref", "bias_ref", only when λ > 0); ``generate_artifacts`` adds the
gradient graph and an SGD / AdamW optimizer graph. :class:`lwcompile.runtime.ort.OrtTrainingBlock` runs them.
The losses are the ``onnx`` forms of :data:`lwcompile.passes.local_losses.LOSS_RULES`, written with each transfer
row's ONNX node builders (``onnx_f``: f, ``onnx_F``: F with F' = f; see
:mod:`lwcompile.passes.transfer_rows`); :func:`artifact_supported` says which (local loss, transfer) pairs they cover.

With SGD, T training steps at learning rates lr·max(1 − k/T, 0.25) (or lr when the decay is off) are exactly the
inner-update graph of ``Config(inner_optimizer="gd")``: both take the gradient of the same loss.

Example:
    >>> import torch
    >>> info = export_training_artifacts("linear", torch.randn(3, 4), torch.randn(3), torch.randn(5, 4),
    ...                                  torch.randn(5, 3), "tanh", "matching", out_dir="/tmp/lw_art")  # doctest: +SKIP
    >>> info["inputs"], info["params"]                                                           # doctest: +SKIP
    (['x', 'target'], ['weight', 'bias'])
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.errors import ExportError
from lwcompile.safe_paths import ordinary_mode
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.local_losses import LOSS_RULES
from lwcompile.passes.onnx_decomp import prepare_graph, quiet, translate_prepared
from lwcompile.passes.onnx_nodes import OnnxNodes
from lwcompile.passes.transfer import TRANSFERS

LOCAL_LOSSES = tuple(LOSS_RULES)


def artifact_supported(local_loss: str, transfer: str) -> bool:
    """Whether training artifacts can express ``local_loss`` for blocks with ``transfer`` (its row has the ONNX
    builders the loss needs)."""
    if local_loss not in LOSS_RULES:
        return False
    row = TRANSFERS.get(transfer)
    return all(row is not None and getattr(row, b) is not None for b in LOSS_RULES[local_loss].onnx_needs)


def _local_loss(g: OnnxNodes, local_loss: str, transfer: str, kw: dict, z: str, a: str) -> str:
    """The local loss ``local_loss`` of ``z`` against target ``a``, as ONNX nodes in ``g``."""
    row = TRANSFERS.get(transfer)
    f = lambda t: row.onnx_f(g, t, kw)  # noqa: E731
    F = lambda t: row.onnx_F(g, t, kw)  # noqa: E731
    return LOSS_RULES[local_loss].onnx(g, f, F, z, a)  # summed over every element


def _loss_block(local_loss: str, transfer: str, tkw: dict, prox: float, params: list[str]):
    """A custom onnxblock.Block: the local loss (:func:`_local_loss`) of z against the graph input "target", plus
    (λ/2)‖θ − θ0‖² over ``params`` (θ0: the graph inputs "<param>_ref")."""
    from onnxruntime.training import onnxblock

    class LocalLoss(onnxblock.Block):
        def build(self, z_name: str) -> str:
            g = OnnxNodes(self.base.graph)
            loss = _local_loss(g, local_loss, transfer, tkw, z_name, "target")
            if prox > 0:
                for p in params:
                    loss = g("Add", loss, g("Mul", g.const(prox), g.total(g.half_square(g("Sub", p, p + "_ref")))))
            return g("Identity", loss, _out="loss")

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
    W ← W − lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε), then W ← W − lr·wd·W. ``optimizer_options``: betas
    (0.9, 0.999), eps (1e-8 here; onnxruntime's own default is 1e-6), weight_decay (0.0), bias_correction (True).
    The learning rate is not baked in: set it at run time (``OrtTrainingBlock.train(..., lr=)``).
    Files: training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint, lwblock.json (this description).
    Returns the description.
    """
    if hasattr(block_op, "op") and hasattr(block_op, "attrs"):  # an ir.Block
        attrs = dict(block_op.attrs) if attrs is None else attrs
        transfer_kwargs = dict(block_op.transfer_kwargs) if transfer_kwargs is None else transfer_kwargs
        block_op = block_op.op
    attrs = dict(attrs or {})
    tkw = dict(transfer_kwargs or {})
    if not attrs and block_op in LINEAR_OPS:
        attrs = dict(LINEAR_OPS[block_op].default_attrs)
    if local_loss not in LOCAL_LOSSES:
        raise ExportError(f"training artifacts: local loss {local_loss!r} unknown; known: {LOCAL_LOSSES}")
    if not artifact_supported(local_loss, transfer):
        known = sorted(n for n in TRANSFERS if artifact_supported(local_loss, n))
        raise ExportError(f"training artifacts: transfer {transfer!r} not supported with the {local_loss} loss; "
                          f"supported: {known}. Export with training=False, or use local_loss='squared_pre'.")
    opts = dict(optimizer_options or {})
    optim = _optimizer(optimizer, opts)
    params = ["weight"] + ([] if bias is None else ["bias"])
    base = _base_model(block_op, weight, bias, attrs, x_example, target_example, prox, opset)
    loss = _loss_block(local_loss, transfer, tkw, prox, params)
    info = {"op": block_op, "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
            "transfer": transfer, "transfer_kwargs": tkw, "local_loss": local_loss, "prox": prox,
            "optimizer": optimizer, "optimizer_options": opts, "params": params,
            "inputs": ["x", "target"] + ([p + "_ref" for p in params] if prox > 0 else []),
            "x_shape": list(x_example.shape), "target_shape": list(target_example.shape)}
    try:
        return _generate(base, params, loss, optim, out_dir, info)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"training artifacts for {block_op}/{transfer}/{local_loss} failed: "
                          f"{type(e).__name__}: {e}") from e


def _optimizer(optimizer: str, opts: dict):
    """onnxblock's optimizer for "sgd" or "adamw" (``opts`` gets AdamW's defaults filled in)."""
    from onnxruntime.training import artifacts as ort_artifacts
    if optimizer == "sgd":
        if opts:
            raise ExportError(f"training artifacts: SGD takes no options (got {sorted(opts)}); "
                              "the lr is set at run time")
        return ort_artifacts.OptimType.SGD
    if optimizer == "adamw":
        from onnxruntime.training import onnxblock
        bad = set(opts) - {"betas", "eps", "weight_decay", "bias_correction"}
        if bad:
            raise ExportError(f"training artifacts: unknown AdamW options {sorted(bad)}")
        opts.setdefault("eps", 1e-8)
        opts.setdefault("weight_decay", 0.0)
        return onnxblock.optim.AdamW(**{k: (tuple(v) if k == "betas" else v) for k, v in opts.items()})
    raise ExportError(f"training artifacts: optimizer {optimizer!r} unknown; use 'sgd' or 'adamw'")


def _base_model(block_op: str, weight: torch.Tensor, bias: torch.Tensor | None, attrs: dict, x_example: torch.Tensor,
                target_example: torch.Tensor, prox: float, opset: int) -> onnx.ModelProto:
    """z = op(x; W, b) with W, b as initializers, plus the graph inputs the loss reads (target, W0, b0).

    Traced with W and b as graph inputs (so no optimizer pass folds them into other constants) and translated like
    every other graph; then they become initializers holding the block's values.
    """
    if block_op not in LINEAR_OPS:
        raise ExportError(f"training artifacts: unknown block op {block_op!r}; known: {sorted(LINEAR_OPS)}")
    apply = LINEAR_OPS[block_op].apply
    values = {"weight": weight.detach().float()} | ({} if bias is None else {"bias": bias.detach().float()})

    def transform(x: torch.Tensor, w: torch.Tensor, *b: torch.Tensor) -> tuple[torch.Tensor]:
        return (apply(x, w, b[0] if b else None, attrs),)

    example = (x_example.detach().float(), *values.values())
    try:
        gm = prepare_graph(make_fx(transform, tracing_mode="fake")(*example), example).graph_module
        base = translate_prepared(gm, example, ["x", *values], ["z"], opset)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"training artifacts: the {block_op} transform could not be exported: {e}") from e
    inputs = [i for i in base.graph.input if i.name not in values]
    del base.graph.input[:]
    base.graph.input.extend(inputs)
    base.graph.initializer.extend(numpy_helper.from_array(v.cpu().numpy(), k) for k, v in values.items())
    base.graph.input.append(helper.make_tensor_value_info(  # a symbolic (batch) size becomes a named dimension
        "target", TensorProto.FLOAT, [d if isinstance(d, int) else str(d) for d in target_example.shape]))
    if prox > 0:
        for p, v in values.items():
            base.graph.input.append(helper.make_tensor_value_info(p + "_ref", TensorProto.FLOAT, list(v.shape)))
    return base


def _generate(base: onnx.ModelProto, params: list[str], loss, optim, out_dir: str, info: dict) -> dict:
    """``generate_artifacts`` into a temp dir beside ``out_dir``, then rename it; nothing is left on failure."""
    from onnxruntime.training import artifacts as ort_artifacts
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        # lwcompile never deletes or renames what it did not write
        raise ExportError(f"{out_dir} exists and is not an empty directory; training artifacts go to a new or "
                          "empty directory (nothing was changed).")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        ordinary_mode(tmp)  # it becomes out_dir: mkdtemp's 0700 would make the artifacts private
        with quiet(), _ort_log_level(3):
            ort_artifacts.generate_artifacts(base, requires_grad=params, frozen_params=[], loss=loss,
                                             optimizer=optim, artifact_directory=tmp)
        for f in os.listdir(tmp):
            if f.startswith("temp"):
                os.remove(os.path.join(tmp, f))
        info = dict(info, files=sorted(os.listdir(tmp)) + ["lwblock.json"])
        with open(os.path.join(tmp, "lwblock.json"), "w") as fh:
            json.dump(info, fh, indent=2, default=str)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above: only an empty directory is ever replaced
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


@contextlib.contextmanager
def _ort_log_level(level: int) -> Iterator[None]:
    """Silence onnxruntime while generating artifacts: its graph optimizer logs every transformer at INFO through
    the SessionOptions that onnxblock creates (whose severity the default logger's setting does not reach)."""
    import onnxruntime
    from onnxruntime.training.onnxblock import _training_graph_utils as tgu

    made = tgu.SessionOptions

    def quiet_options() -> onnxruntime.SessionOptions:
        opts = made()
        opts.log_severity_level = level
        return opts

    onnxruntime.set_default_logger_severity(level)
    tgu.SessionOptions = quiet_options
    try:
        yield
    finally:
        tgu.SessionOptions = made
        onnxruntime.set_default_logger_severity(2)
