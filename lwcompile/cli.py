"""The ``lwcompile`` command line: one subcommand per job, each a small ``add_*`` + ``run_*`` pair.

    lwcompile plan MODULE:FACTORY --devices N --mode replicated|partitioned [--json F] [--dot F] [--png F]

``MODULE`` is an importable module (``mypkg.models``) or a file (``path/to/models.py``); ``FACTORY()`` returns
``(model, example_inputs)`` or ``(model, example_inputs, loss_fn)``. New subcommands register themselves by adding
an ``add_<name>_command(subparsers)`` function to :data:`COMMANDS`; it sets ``func`` to the function to run.

Example:
    >>> main(["plan", "lwcompile.cli:demo_factory", "--devices", "2"])  # doctest: +ELLIPSIS
    replicated plan: 3 blocks on 2 devices...
    0
"""
from __future__ import annotations

import argparse
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


# ---------------------------------------------------------------------------------------------------- main
COMMANDS: list[Callable[[Any], Any]] = [add_plan_command, cli_export.add_parser]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="lwcompile", description="Compile PyTorch models for layer-wise "
                                     "local-loss training (LocoProp): plan and export them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 1 on an lwcompile error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LwcompileError as e:
        print(f"lwcompile {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
