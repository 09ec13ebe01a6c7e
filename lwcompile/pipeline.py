"""The compile pipeline: model → trace → partition → tap → fuse, one list a newcomer can read.

Each stage is a :class:`Stage` in the manner of ``torch.fx.passes.infra``'s ``PassBase``: ``requires`` checks its
pre-conditions, ``call`` does the work, ``ensures`` checks what it promised; each returns a small frozen record
(``TraceResult``, ``Partition``, the tapped ``GraphModule``, ``FusedGroups``). :func:`compile_model` runs
:data:`PIPELINE` in order
and returns a :class:`Compiled` record; the target and inner graphs are emitted later, per batch shape, by the
Program (:mod:`lwcompile.passes.targets`, :mod:`lwcompile.passes.inner`).

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> c = compile_model(m, torch.nn.functional.mse_loss, (torch.randn(5, 3),), lwcompile.Config())
    >>> [s.name for s in PIPELINE], [b.name for b in c.partition.blocks]
    (['trace', 'partition', 'tap', 'fuse'], ['0', '2'])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from lwcompile.config import Config
from lwcompile.errors import PartitionError, TraceError
from lwcompile.guards import Guards, snapshot
from lwcompile.ir import TraceResult
from lwcompile.passes.checks import ensures_partition, ensures_tap
from lwcompile.passes.fuse import FusedGroups, ensures_fuse, fuse_groups, requires_fuse
from lwcompile.passes.partition import Partition, partition
from lwcompile.passes.targets import is_cumulative_batch_norm, tap
from lwcompile.passes.trace import EXPORT, trace


@dataclass(frozen=True)
class Compiled:
    """What the pipeline produced: the records every later stage reads."""

    guards: Guards  # what the trace froze (checked before every step)
    trace: TraceResult
    partition: Partition
    tapped: fx.GraphModule  # the traced model, also returning every block's x, â, [ŷ]
    param_names: tuple[str, ...]  # one name per parameter tensor, the target graph's order
    buffer_names: tuple[str, ...]
    fused: FusedGroups = FusedGroups()  # identical blocks whose inner loops run as one batched graph


@dataclass(frozen=True)
class Stage:
    """One pass: ``call(env) -> record``; ``requires(env)`` and ``ensures(env, record)`` raise on violation."""

    name: str
    call: Callable[[dict[str, Any]], Any]
    requires: Callable[[dict[str, Any]], None] = lambda env: None
    ensures: Callable[[dict[str, Any], Any], None] = lambda env, out: None


def _trace(env: dict[str, Any]) -> TraceResult:
    try:
        res = trace(env["model"], env["example_inputs"], env["config"].frontend)
    except TraceError as e:
        refuse_unsupported_modules(env["model"], e)  # the clearer reason, when it is one
        raise
    if res.frontend == EXPORT:  # the tap pass rewrites only call_module BatchNorms (torch.fx front end)
        refuse_unsupported_modules(env["model"])
    return res


def _requires_module(env: dict[str, Any]) -> None:
    if not isinstance(env["model"], nn.Module):
        raise TraceError(f"the model must be an nn.Module, got {type(env['model']).__name__}")


PIPELINE: tuple[Stage, ...] = (
    Stage("trace", _trace, requires=_requires_module),
    Stage("partition", lambda env: partition(env["trace"].graph_module, env["example_inputs"], env["config"].skip),
          ensures=lambda env, part: ensures_partition(env["trace"].graph_module, part)),
    Stage("tap", lambda env: tap(env["trace"].graph_module, env["partition"].blocks),
          ensures=lambda env, tapped: ensures_tap(tapped, env["partition"].blocks)),
    Stage("fuse", lambda env: fuse_groups(env["partition"].blocks, env["config"]),
          requires=lambda env: requires_fuse(env["partition"].blocks),
          ensures=lambda env, fused: ensures_fuse(env["partition"].blocks, env["config"], fused)),
)


def compile_model(model: nn.Module, loss_fn: Any, example_inputs: tuple, config: Config) -> Compiled:
    """Run :data:`PIPELINE` on ``model``; every stage's post-condition is checked before the next one runs."""
    env: dict[str, Any] = {"model": model, "example_inputs": example_inputs, "config": config,
                           "guards": snapshot(model, loss_fn)}
    for stage in PIPELINE:
        stage.requires(env)
        out = stage.call(env)
        stage.ensures(env, out)
        env[stage.name] = out
    gm = env["trace"].graph_module
    return Compiled(env["guards"], env["trace"], env["partition"], env["tap"],
                    tuple(n for n, _ in gm.named_parameters()), tuple(n for n, _ in gm.named_buffers()), env["fuse"])


def refuse_unsupported_modules(model: nn.Module, cause: BaseException | None = None) -> None:
    """Modules whose training-mode semantics the graphs cannot reproduce exactly: refused by name."""
    for name, m in model.named_modules():
        if is_cumulative_batch_norm(m):
            raise PartitionError(
                f"module {name!r} ({type(m).__name__}) uses momentum=None (a cumulative average whose factor "
                "1/num_batches_tracked is data-dependent): supported with the torch.fx front end only, and this "
                "model needs torch.export; give it a momentum (e.g. 0.1), or put it in eval() mode.") from cause
