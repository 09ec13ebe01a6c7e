"""The ``lwcompile`` command line: one subcommand per job, each a small ``add_*`` + ``run_*`` pair.

    lwcompile train MODULE:FACTORY [--epochs N | --steps N] [--eval-every N] [--checkpoint-every N] [--resume F]
    lwcompile plan MODULE:FACTORY --devices N --mode replicated|partitioned [--json F] [--dot F] [--png F]
    lwcompile export MODULE:FACTORY OUT_DIR
    lwcompile --version            (also: python -m lwcompile ...)

``MODULE`` is an importable module (``mypkg.models``) or a file (``path/to/models.py``). For ``train``,
``FACTORY()`` returns a :class:`lwcompile.TrainJob`; for ``plan`` and ``export`` it returns ``(model,
example_inputs)`` or ``(model, example_inputs, loss_fn)``. New subcommands register themselves by adding an
``add_<name>_command(subparsers)`` function to :data:`COMMANDS`; it sets ``func`` to the function to run.

Example:
    >>> main(["plan", "lwcompile.cli:demo_factory", "--devices", "2"])  # doctest: +ELLIPSIS
    replicated plan: 3 blocks on 2 devices...
    0
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lwcompile import cli_export, factory
from lwcompile.factory import parse_devices
from lwcompile.errors import ConfigError, LwcompileError


# ----------------------------------------------------------------------------------------------- shared helpers
def load_factory(spec: str) -> tuple[nn.Module, tuple, Callable | None]:
    """Import ``MODULE:FACTORY``, call the factory, and check what it returns: (model, example inputs, loss or None).

    Example:
        >>> model, inputs, loss = load_factory("lwcompile.cli:demo_factory")
        >>> type(model).__name__, inputs[0].shape, loss
        ('Sequential', torch.Size([32, 8]), None)
    """
    return factory.load_factory(spec)[:3]


def _no_loss(*_: Any) -> torch.Tensor:
    raise ConfigError("the factory returned no loss_fn; return (model, example_inputs, loss_fn) to train.")


def program_from(spec: str, **config: Any):
    """The compiled program of ``MODULE:FACTORY`` (no loss needed to plan or export the forward)."""
    import lwcompile

    model, inputs, loss = load_factory(spec)
    return lwcompile.transform(model, loss or _no_loss, inputs, **config)


def demo_factory() -> tuple[nn.Module, torch.Tensor]:
    """A tiny MLP for examples and smoke tests: ``lwcompile plan lwcompile.cli:demo_factory``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.randn(32, 8)




# ---------------------------------------------------------------------------------------------------- plan
def add_plan_command(sub: Any) -> None:
    p = sub.add_parser("plan", help="place a model's blocks on devices and print the plan",
                       description="Compile MODULE:FACTORY, place its blocks' inner loops on devices and print the "
                                   "plan table (device, blocks, predicted inner-phase time, memory, share).")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="FACTORY() returns (model, example_inputs) or (model, example_inputs, loss_fn)")
    p.add_argument("--devices", type=parse_devices, default=1, help="a count of simulated devices, or cuda:0,cuda:1,...")
    p.add_argument("--mode", choices=("replicated", "partitioned"), default="replicated")
    p.add_argument("--steps", type=int, default=None, help="inner iterations T (default: Config's)")
    p.add_argument("--device-rate", type=float, default=None, help="FLOP/s per device (default: measured)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.add_argument("--dot", metavar="FILE", help="also write the plan as Graphviz DOT")
    p.add_argument("--png", metavar="FILE", help="also draw the plan as a PNG")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    overrides = {} if args.steps is None else {"steps": args.steps}
    prog = program_from(args.factory, **overrides)
    plan = prog.plan(devices=args.devices, mode=args.mode, device_rate=args.device_rate)
    print(plan)
    outputs = ((args.json, lambda f: _write(f, plan.to_json())), (args.dot, lambda f: _write(f, plan.to_dot())),
               (args.png, plan.draw))
    for path, write in outputs:
        if path:
            write(path)
            print(f"wrote {path}")
    return 0


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------------- train
TRAIN_EPILOG = """\
MODULE:FACTORY
  MODULE is an importable module (mypkg.jobs, found on sys.path or in the current directory) or a path to a .py
  file (path/to/jobs.py). FACTORY is a callable in it that returns an lwcompile.TrainJob(model, loss_fn,
  train_data, batch_size=None, eval_data=None, eval_fn=None, config=None, seed=0);
  see help(lwcompile.TrainJob). --arg KEY=VALUE passes keyword arguments to it.

outputs (in --out)
  curve.csv       one row per step: step, epoch, batch, loss (the step's batch loss), inner_lr, and eval_loss /
                  eval_* metrics on the steps that were evaluated (step 0 is the evaluation before training)
  curve.png       the same curve, plotted
  checkpoint.pt   torch.save({"model", "program", "loop"}): resume with --resume; a resumed run's curve equals
                  the uninterrupted run's exactly
  Ctrl-C finishes the current step, writes all three and exits with status 130; a second Ctrl-C abandons the
  step instead (a step is atomic). Existing outputs are never replaced unless --resume or --overwrite.
  An --out that cannot be written, or a --resume file that is not an intact checkpoint of this job, is refused
  before the first step with exit status 2 (other errors: 1).

examples
  lwcompile train lwcompile.experiments.jobs:digits_classifier --epochs 5
  lwcompile train lwcompile.experiments.jobs:mnist_autoencoder --arg data_dir=../shared/data/mnist
  lwcompile train path/to/jobs.py:build --steps 1000 --eval-every 100 --checkpoint-every 200 --config inner_lr=1e-4
  lwcompile train path/to/jobs.py:build --resume runs/build/checkpoint.pt
"""


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value read as a Python literal (``1e-4``, ``True``, ``(1, 2)``) or else kept as text."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. inner_lr=1e-4")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def add_train_command(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model from a TrainJob factory (progress bar, checkpoints, curve)",
                       description="Compile the model of MODULE:FACTORY with lwcompile (LocoProp) and train it:\n"
                                   "a progress bar (loss, inner lr, steps/s), evaluation, checkpoints you can resume\n"
                                   "exactly, and the loss curve as CSV and PNG.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", metavar="MODULE:FACTORY", help="a callable returning an lwcompile.TrainJob (see below)")
    p.add_argument("-a", "--arg", dest="factory_args", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="a keyword argument for FACTORY (repeatable; VALUE is a Python literal "
                                             "or text)")
    p.add_argument("-c", "--config", dest="config", type=_key_value, action="append", default=[],
                   metavar="FIELD=VALUE", help="override a field of the job's lwcompile.Config (repeatable), e.g. "
                                               "--config inner_lr=1e-4 --config steps=5; see help(lwcompile.Config)")
    p.add_argument("--epochs", type=int, default=None, help="passes over train_data (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="total training steps, across epochs; overrides --epochs (default: --epochs × batches per "
                        "epoch)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="also evaluate every N steps (default 0: only before training, at each epoch's end and at "
                        "the last step)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also write checkpoint.pt every N steps (default 0: at the end and on Ctrl-C only)")
    p.add_argument("--resume", metavar="CHECKPOINT", default=None,
                   help="continue the run saved in CHECKPOINT (a checkpoint.pt); --epochs, --steps, --eval-every "
                        "and --checkpoint-every default to that run's")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: the --resume checkpoint's directory, else runs/FACTORY)")
    p.add_argument("--overwrite", action="store_true", help="replace curve.csv, curve.png and checkpoint.pt in --out")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and random before FACTORY runs (default 0)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: torch's choice, one per core; 1 is much faster when other processes "
                        "share the cores, see README)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a tqdm bar on stderr showing the loss, inner lr and steps/s)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop as Ctrl-C would
    p.set_defaults(func=run_train)


def _call_factory(spec: str, kwargs: dict[str, Any]) -> Any:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r}: expected MODULE:FACTORY, e.g. mypkg.jobs:build or path/to/jobs.py:build.")
    fn = getattr(factory.import_module_or_file(module_name), attr, None)
    if not callable(fn):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}; FACTORY must be a function returning an "
                          "lwcompile.TrainJob.")
    try:
        return fn(**kwargs)
    except TypeError as e:
        if kwargs and "argument" in str(e):
            raise ConfigError(f"{spec}(**{kwargs}) failed: {e}; check the --arg names against the factory's "
                              "parameters.") from e
        raise


def run_train(args: argparse.Namespace) -> int:
    import random

    import numpy as np

    from lwcompile.train import TrainJob, TrainOptions, saved_options, train

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    job = _call_factory(args.factory, dict(args.factory_args))
    if not isinstance(job, TrainJob):
        raise ConfigError(f"{args.factory}() returned a {type(job).__name__}; for `lwcompile train` it must return an "
                          "lwcompile.TrainJob(model, loss_fn, train_data, ...).")
    saved = saved_options(args.resume) if args.resume else {}
    name = args.factory.rpartition(":")[2]
    options = TrainOptions(
        out_dir=args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume
                             else os.path.join("runs", name)),
        **{k: v for k, v in saved.items() if getattr(args, k) is None},
        **{k: getattr(args, k) for k in ("epochs", "steps", "eval_every", "checkpoint_every")
           if getattr(args, k) is not None},
        resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, progress=not args.no_progress,
        title=f"{name}", config_overrides=dict(args.config))
    result = train(job, options)
    print(f"wrote {result.csv}, {result.png} and {result.checkpoint}")
    if result.interrupted:
        print(f"stopped after step {result.steps}; continue with: lwcompile train {args.factory} --resume "
              f"{result.checkpoint}", file=sys.stderr)
        return 130
    last = next((r for r in reversed(result.curve) if r.get("eval_loss") is not None), result.curve[-1])
    print(f"done: {result.steps} steps; " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                     if (k == "loss" or k.startswith("eval")) and v is not None))
    return 0


# ---------------------------------------------------------------------------------------------------- main
COMMANDS: list[Callable[[Any], Any]] = [add_train_command, add_plan_command, cli_export.add_parser]


def version() -> str:
    """The installed package's version (its metadata), or the source tree's when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("lwcompile")
    except PackageNotFoundError:
        import lwcompile

        return lwcompile.__version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="lwcompile", description="Compile PyTorch models for layer-wise "
                                     "local-loss training (LocoProp): train, plan and export them.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 1 on an lwcompile error, 2 on an unusable file
    or argument)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LwcompileError as e:
        print(f"lwcompile {args.command}: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_status", 1))


if __name__ == "__main__":
    sys.exit(main())
