"""``lwcompile export MODULE:FACTORY OUT_DIR``: compile a model and write everything needed to train it from ONNX files.

    lwcompile export mypkg.models:build out/ --steps 5 --inner-optimizer adam --devices 2
    lwcompile export mypkg.models:build out/ --overwrite     # replace a previous export in out/

OUT_DIR must be new or empty, or hold a previous lwcompile export and nothing else (with ``--overwrite``); anything
else is refused with exit status 1 and left as it was.

The factory contract: ``FACTORY()`` (no arguments) returns one of

- ``(model, example_inputs)``
- ``(model, example_inputs, loss_fn)``
- ``(model, example_inputs, loss_fn, example_labels)``

``example_inputs`` is a tensor or a tuple of tensors (the model's positional inputs); ``loss_fn(output, *labels)``
returns the scalar task loss and may be ``None``. ``--loss`` overrides it (default, when neither gives one: MSE).
The labels fix the target graph's label shapes and dtypes: the factory's ``example_labels``, else zeros of
``--labels-shape`` (and ``--labels-dtype``), else what the loss takes (:mod:`lwcompile.labels`: class indices for
cross-entropy and NLL, output-shaped floats for MSE, L1, BCE, ...), else zeros shaped like the model's output. Every
exported graph runs any batch size (its first dimension is dynamic). ``MODULE`` is an importable module or a path
to a ``.py`` file.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="lwcompile"); sub = parser.add_subparsers(dest="command")
    >>> add_parser(sub)  # doctest: +ELLIPSIS
    ArgumentParser(...)
    >>> args = parser.parse_args(["export", "lwcompile.cli_export:demo_factory", "/tmp/lw_cli", "--steps", "2"])
    >>> run(args)  # doctest: +SKIP
    0
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.config import INNER_OPTIMIZERS, LOCAL_LOSSES, OUTER_OPTIMIZERS, TARGETS
from lwcompile.errors import ConfigError, LwcompileError
from lwcompile.factory import import_module_or_file, load_factory, parse_devices

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": F.mse_loss, "cross_entropy": F.cross_entropy, "bce_logits": F.binary_cross_entropy_with_logits,
    "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "nll": F.nll_loss,
}


def demo_factory() -> tuple[nn.Module, torch.Tensor]:
    """A tiny MLP: ``lwcompile export lwcompile.cli_export:demo_factory out/``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), torch.randn(32, 8)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on an ``argparse`` subparsers object; it sets ``func=run``."""
    p = subparsers.add_parser(
        "export", help="compile a model and export its graphs, state and manifest to ONNX",
        description="Compile MODULE:FACTORY and write the target graph, every block's inner-update graph, "
                    "onnxruntime-training artifacts, the parameters and optimizer states and manifest.json to "
                    "OUT_DIR (lwcompile.runtime.ort.OrtProgram(OUT_DIR) trains from them).",
        epilog="FACTORY() returns (model, example_inputs), (model, example_inputs, loss_fn) or (model, "
               "example_inputs, loss_fn, example_labels).")
    p.add_argument("factory", metavar="MODULE:FACTORY", help="importable module or .py file, and a function in it")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="directory to write: a new or empty one, or a previous export with --overwrite (a directory "
                        "holding anything else is refused; lwcompile never deletes files it did not write)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a previous lwcompile export and nothing else")
    p.add_argument("--target", choices=TARGETS, help="target kind (default: Config's)")
    p.add_argument("--local-loss", choices=LOCAL_LOSSES, help="local loss (default: the target's METHOD.md pair)")
    p.add_argument("--loss", help=f"task loss: one of {sorted(LOSSES)} or MODULE:FUNCTION (default: the factory's, "
                                  "else mse)")
    p.add_argument("--gamma", type=float, help="activation learning rate γ")
    p.add_argument("--steps", type=int, help="inner iterations T")
    p.add_argument("--inner-optimizer", choices=INNER_OPTIMIZERS)
    p.add_argument("--inner-lr", type=float)
    p.add_argument("--prox", type=float, help="proximal weight λ")
    p.add_argument("--outer-optimizer", choices=OUTER_OPTIMIZERS)
    p.add_argument("--outer-lr", type=float)
    p.add_argument("--devices", type=parse_devices, help="place the blocks on N simulated devices or on cuda:0,cuda:1,... "
                                                     "(recorded per block in the manifest)")
    p.add_argument("--mode", choices=("replicated", "partitioned"), default="replicated", help="placement mode")
    p.add_argument("--labels-shape", type=_shape,
                   help="example labels' shape, e.g. 32,4 (default: what the loss takes: class indices for "
                        "cross_entropy and nll, else the output's shape)")
    p.add_argument("--labels-dtype", choices=("float32", "float64", "int64"), default=None,
                   help="example labels' dtype (default: the loss's; float32 for an unknown loss)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-training", action="store_true", help="skip the onnxruntime-training artifacts")
    p.add_argument("--artifact-optimizer", choices=("auto", "sgd", "adam", "adamw"), default="auto",
                   help="optimizer of the training artifacts (auto: sgd for inner_optimizer=gd and adam for adam, "
                        "which reproduce them exactly; sgd otherwise)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Do the export described by ``args`` (from :func:`add_parser`); 0 on success, 1 on an lwcompile error."""
    try:
        return _run(args)
    except LwcompileError as e:
        print(f"lwcompile export: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import lwcompile

    from lwcompile.passes.onnx_files import check_out_dir

    overwrite = bool(getattr(args, "overwrite", False))  # a Namespace built by hand may predate --overwrite
    check_out_dir(args.out_dir, overwrite)  # refuse before importing and compiling the model (slow)
    model, inputs, loss_fn, labels = load_export_factory(args.factory)
    if args.loss:
        loss_fn = _loss(args.loss)
    loss_fn = loss_fn or F.mse_loss
    if labels is None:
        labels = _default_labels(model, inputs, args.labels_shape, args.labels_dtype, loss_fn)
    names = ("target", "local_loss", "gamma", "steps", "inner_optimizer", "inner_lr", "prox", "outer_optimizer",
             "outer_lr")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if "target" in overrides and "local_loss" not in overrides:
        from lwcompile.config import PAIRS
        overrides["local_loss"] = PAIRS[overrides["target"]]
    prog = lwcompile.transform(model, loss_fn, inputs, **overrides)
    plan = prog.plan(devices=args.devices, mode=args.mode) if args.devices is not None else None
    man = prog.export_onnx(args.out_dir, devices=plan, training=not args.no_training,
                           optimizer=args.artifact_optimizer, opset=args.opset, example_labels=labels,
                           overwrite=overwrite)
    blocks = man["program"]["blocks"]
    where = "" if plan is None else " on " + ", ".join(f"{b['name']}->{b['device']}" for b in blocks)
    print(f"wrote {args.out_dir}: {len(man['files'])} graphs, {len(man['training'])} training artifact sets, "
          f"{len(blocks)} blocks{where}")
    for name, why in man["meta"].get("training_skipped", {}).items():
        print(f"  note: no training artifacts for block {name!r}: {why}")
    return 0


load_export_factory = load_factory  # (model, inputs, loss_fn or None, labels or None)


def _loss(name: str) -> Callable[..., torch.Tensor]:
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        module_name, _, attr = name.rpartition(":")
        fn = getattr(import_module_or_file(module_name), attr, None)
        if callable(fn):
            return fn
    hint = " (for Config.local_loss use --local-loss)" if name in LOCAL_LOSSES else ""
    raise ConfigError(f"--loss {name!r}: use one of {sorted(LOSSES)} or MODULE:FUNCTION{hint}.")


def _default_labels(model: nn.Module, inputs: tuple, shape: tuple[int, ...] | None, dtype: str | None,
                    loss_fn: Callable[..., torch.Tensor] | None = None) -> tuple:
    dt = getattr(torch, dtype or "float32")
    if shape is not None:
        return (torch.zeros(shape, dtype=dt),)
    from lwcompile.labels import infer_example_labels
    from lwcompile.passes.state import preserved_state

    labels = None if loss_fn is None or dtype else infer_example_labels(model, inputs, loss_fn)
    if labels is not None:
        return labels

    with preserved_state(model), torch.no_grad():  # a forward for the output's shape; BatchNorm stats put back
        out = model(*inputs)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the model returns {type(out).__name__}, not one tensor: pass example labels from the "
                          "factory (its 4th item) or --labels-shape.")
    return (torch.zeros(out.shape, dtype=dt if dtype else out.dtype),)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a shape such as 32,4") from None
    if not dims or any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: a shape such as 32,4")
    return dims
