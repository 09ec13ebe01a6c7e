"""onnxruntime-training artifacts for one block's inner loop (a local loss + proximal term, SGD or AdamW).

The block's linear transform z = op(x; W, b) is exported with W, b as initializers ("weight", "bias"); a custom
``onnxblock`` loss appends the local loss of METHOD.md summed over the batch plus (λ/2)(‖W − W0‖² + ‖b − b0‖²),
with W0, b0 extra graph inputs ("weight_ref", "bias_ref", only when λ > 0); ``generate_artifacts`` adds the
gradient graph and an SGD / AdamW optimizer graph. :class:`lwcompile.runtime.ort.OrtTrainingBlock` runs them.
The losses are tables of ONNX node builders (``TRANSFER_OF``: f, ``POTENTIAL_OF``: F with F' = f);
:func:`artifact_supported` says which (local loss, transfer) pairs they cover.

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
from typing import Any, Callable, Iterator

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.errors import ExportError
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.onnx_decomp import prepare_graph, quiet, translate_prepared
from lwcompile.passes.transfer import SELU_ALPHA, SELU_SCALE

LOCAL_LOSSES = ("squared_pre", "squared_post", "matching", "dual_bregman")


class _Graph:
    """Appends plain ONNX nodes (whose gradients onnxruntime-training implements) to a graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph, self.count = graph, 0

    def __call__(self, op: str, *ins: str, _out: str | None = None, **attrs: Any) -> str:
        self.count += 1
        out = _out or f"lw_{op.lower()}_{self.count}"
        self.graph.node.append(helper.make_node(op, list(ins), [out], name=f"lw_{op}_{self.count}", **attrs))
        return out

    def const(self, v: float) -> str:
        self.count += 1
        name = f"lw_const_{self.count}"
        self.graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [float(v)]))
        return name

    def softplus(self, t: str) -> str:  # log(1 + e^t), stable: relu(t) + log(1 + e^{-|t|})
        e = self("Exp", self("Neg", self("Abs", t)))
        return self("Add", self("Relu", t), self("Log", self("Add", self.const(1.0), e)))

    def neg_part(self, t: str) -> str:  # min(t, 0)
        return self("Neg", self("Relu", self("Neg", t)))

    def total(self, t: str) -> str:
        return self("ReduceSum", t, keepdims=0)

    def shift(self, t: str, c: float) -> str:  # t + c
        return self("Add", t, self.const(c))

    def scale(self, t: str, c: float) -> str:  # c·t
        return self("Mul", self.const(c), t)

    def clamp(self, t: str, lo: float, hi: float) -> str:
        # lo + relu(t − lo) − relu(t − hi): Relu's gradient is one every onnxruntime-training build has
        return self("Sub", self.shift(self("Relu", self.shift(t, -lo)), lo), self("Relu", self.shift(t, -hi)))


Builder = Callable[[_Graph, str, dict], str]


def _hardtanh_range(kw: dict) -> tuple[float, float]:
    return float(kw.get("min_val", -1.0)), float(kw.get("max_val", 1.0))


def _exp_linear(g: _Graph, t: str, alpha: float, k: float) -> str:
    """relu(t) + α(e^{k·min(t, 0)} − 1): ELU-shaped; SELU (times its scale) and CELU (k = 1/α)."""
    return g("Add", g("Relu", t), g.scale(g.shift(g("Exp", g.scale(g.neg_part(t), k)), -1.0), alpha))


# f(t) of each transfer, as ONNX nodes
TRANSFER_OF: dict[str, Builder] = {
    "identity": lambda g, t, kw: t,
    "relu": lambda g, t, kw: g("Relu", t),
    "leaky_relu": lambda g, t, kw: g("Add", g("Relu", t), g("Mul", g.const(kw.get("negative_slope", 0.01)),
                                                            g.neg_part(t))),
    "tanh": lambda g, t, kw: g("Tanh", t),
    "sigmoid": lambda g, t, kw: g("Sigmoid", t),
    "softplus": lambda g, t, kw: g("Div", g.softplus(g("Mul", g.const(kw.get("beta", 1.0)), t)),
                                   g.const(kw.get("beta", 1.0))),
    "elu": lambda g, t, kw: g("Add", g("Relu", t), g("Mul", g.const(kw.get("alpha", 1.0)),
                                                     g("Sub", g("Exp", g.neg_part(t)), g.const(1.0)))),
    "hardtanh": lambda g, t, kw: g.clamp(t, *_hardtanh_range(kw)),
    "relu6": lambda g, t, kw: g.clamp(t, 0.0, 6.0),
    "hardsigmoid": lambda g, t, kw: g.scale(g.clamp(g.shift(t, 3.0), 0.0, 6.0), 1 / 6),
    "hardswish": lambda g, t, kw: g("Mul", t, g.scale(g.clamp(g.shift(t, 3.0), 0.0, 6.0), 1 / 6)),
    "selu": lambda g, t, kw: g.scale(_exp_linear(g, t, SELU_ALPHA, 1.0), SELU_SCALE),
    "celu": lambda g, t, kw: _exp_linear(g, t, kw.get("alpha", 1.0), 1 / kw.get("alpha", 1.0)),
    "mish": lambda g, t, kw: g("Mul", t, g("Tanh", g.softplus(t))),
    "logsigmoid": lambda g, t, kw: g("Neg", g.softplus(g("Neg", t))),
    "softsign": lambda g, t, kw: g("Div", t, g.shift(g("Abs", t), 1.0)),
}


def _half_square(g: _Graph, t: str) -> str:
    return g("Mul", g.const(0.5), g("Mul", t, t))


def _clamp_potential(g: _Graph, t: str, lo: float, hi: float) -> str:
    """∫₀ᵗ clamp(s, lo, hi) ds = lo·t + ½relu(t − lo)² − ½relu(t − hi)² + const (as transfer._clamp_F)."""
    c = -0.5 * max(-lo, 0.0) ** 2 + 0.5 * max(-hi, 0.0) ** 2
    quad = g("Sub", _half_square(g, g("Relu", g.shift(t, -lo))), _half_square(g, g("Relu", g.shift(t, -hi))))
    return g.shift(g("Add", g.scale(t, lo), quad), c)


def _hardswish_potential(g: _Graph, t: str) -> str:
    """c³/18 + c²/4 + ½relu(t − 3)(t + 3) with c = clamp(t, −3, 3) (as transfer._hardswish_F)."""
    c = g.clamp(t, -3.0, 3.0)
    c2 = g("Mul", c, c)
    inner = g("Add", g.scale(g("Mul", c2, c), 1 / 18), g.scale(c2, 0.25))
    return g("Add", inner, g.scale(g("Mul", g("Relu", g.shift(t, -3.0)), g.shift(t, 3.0)), 0.5))


def _exp_linear_potential(g: _Graph, t: str, alpha: float, k: float) -> str:
    """½relu(t)² + α((e^{k·m} − 1)/k − m), m = min(t, 0): the integral of :func:`_exp_linear`."""
    m = g.neg_part(t)
    neg = g("Sub", g.scale(g.shift(g("Exp", g.scale(m, k)), -1.0), 1 / k), m)
    return g("Add", _half_square(g, g("Relu", t)), g.scale(neg, alpha))


# the potential F(t) (F' = f) of each transfer, for the matching and dual Bregman losses
POTENTIAL_OF: dict[str, Builder] = {
    "identity": lambda g, t, kw: _half_square(g, t),
    "relu": lambda g, t, kw: _half_square(g, g("Relu", t)),
    "leaky_relu": lambda g, t, kw: g("Add", _half_square(g, g("Relu", t)),
                                     g("Mul", g.const(kw.get("negative_slope", 0.01)), _half_square(g, g.neg_part(t)))),
    # log cosh t = |t| + softplus(−2|t|) − log 2
    "tanh": lambda g, t, kw: g("Sub", g("Add", g("Abs", t), g.softplus(g("Mul", g.const(-2.0), g("Abs", t)))),
                               g.const(0.6931471805599453)),
    "sigmoid": lambda g, t, kw: g("Add", t, g.softplus(g("Neg", t))),  # t + softplus(−t) = log(1 + e^t)
    "elu": lambda g, t, kw: g("Add", _half_square(g, g("Relu", t)),
                              g("Mul", g.const(kw.get("alpha", 1.0)),
                                g("Sub", g("Sub", g("Exp", g.neg_part(t)), g.const(1.0)), g.neg_part(t)))),
    "hardtanh": lambda g, t, kw: _clamp_potential(g, t, *_hardtanh_range(kw)),
    "relu6": lambda g, t, kw: _clamp_potential(g, t, 0.0, 6.0),
    "hardsigmoid": lambda g, t, kw: g.scale(g.shift(_clamp_potential(g, g.shift(t, 3.0), 0.0, 6.0), -4.5), 1 / 6),
    "hardswish": lambda g, t, kw: _hardswish_potential(g, t),
    "selu": lambda g, t, kw: g.scale(_exp_linear_potential(g, t, SELU_ALPHA, 1.0), SELU_SCALE),
    "celu": lambda g, t, kw: _exp_linear_potential(g, t, kw.get("alpha", 1.0), 1 / kw.get("alpha", 1.0)),
    # |t| − log(1 + |t|)
    "softsign": lambda g, t, kw: g("Sub", g("Abs", t), g("Log", g.shift(g("Abs", t), 1.0))),
    # no rows for mish (its F is a quadrature), logsigmoid and softplus (theirs need the dilogarithm), gelu, silu
}
# what each local loss needs of the transfer
_NEEDS = {"squared_pre": (), "squared_post": (TRANSFER_OF,), "matching": (POTENTIAL_OF,),
          "dual_bregman": (TRANSFER_OF, POTENTIAL_OF)}


def artifact_supported(local_loss: str, transfer: str) -> bool:
    """Whether training artifacts can express ``local_loss`` for blocks with ``transfer``."""
    return local_loss in _NEEDS and all(transfer in table for table in _NEEDS[local_loss])


# One ONNX builder per local loss: (graph, f, F, z, a) -> the loss summed over every element; its z-gradient is
# METHOD.md's residual (the same rows as lwcompile.passes.local_losses.LOSS_RULES).
_ONNX_LOSSES = {
    "squared_pre": lambda g, f, F, z, a: g.total(_half_square(g, g("Sub", z, a))),  # ½Σ(z − a)²
    "squared_post": lambda g, f, F, z, a: g.total(_half_square(g, g("Sub", f(z), a))),  # ½Σ(f(z) − a)²
    "matching": lambda g, f, F, z, a: g("Sub", g.total(F(z)), g.total(g("Mul", a, z))),  # ΣF(z) − Σ a·z
    "dual_bregman": lambda g, f, F, z, a: g("Add", g.total(g("Sub", g("Mul", f(z), g("Sub", z, a)), F(z))),
                                            g.total(F(a))),  # Σ[f(z)(z − a) − F(z) + F(a)]
}


def _local_loss(g: _Graph, local_loss: str, transfer: str, kw: dict, z: str, a: str) -> str:
    """The local loss ``local_loss`` of ``z`` against target ``a``, as ONNX nodes in ``g``."""
    f = lambda t: TRANSFER_OF[transfer](g, t, kw)  # noqa: E731
    F = lambda t: POTENTIAL_OF[transfer](g, t, kw)  # noqa: E731
    return _ONNX_LOSSES[local_loss](g, f, F, z, a)


def _loss_block(local_loss: str, transfer: str, tkw: dict, prox: float, params: list[str]):
    """A custom onnxblock.Block: the local loss (:func:`_local_loss`) of z against the graph input "target", plus
    (λ/2)‖θ − θ0‖² over ``params`` (θ0: the graph inputs "<param>_ref")."""
    from onnxruntime.training import onnxblock

    class LocalLoss(onnxblock.Block):
        def build(self, z_name: str) -> str:
            g = _Graph(self.base.graph)
            loss = _local_loss(g, local_loss, transfer, tkw, z_name, "target")
            if prox > 0:
                for p in params:
                    loss = g("Add", loss, g("Mul", g.const(prox), g.total(_half_square(g, g("Sub", p, p + "_ref")))))
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
    if block_op.startswith("conv") and not attrs:
        nd = int(block_op[-2])
        attrs = {"stride": (1,) * nd, "padding": (0,) * nd, "dilation": (1,) * nd, "groups": 1,
                 "output_padding": (0,) * nd}
    if local_loss not in LOCAL_LOSSES:
        raise ExportError(f"training artifacts: local loss {local_loss!r} unknown; known: {LOCAL_LOSSES}")
    if not artifact_supported(local_loss, transfer):
        known = sorted(TRANSFER_OF if local_loss == "squared_post" else POTENTIAL_OF)
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
