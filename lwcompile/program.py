"""The compiled program: the records the pipeline produced, the per-block optimizer state, and ``step``.

A Program is the compiled artifact, not the compiler: :mod:`lwcompile.pipeline` builds its records, the passes
emit its graphs, and the runtimes (local threads, torch.distributed, onnxruntime) drive it through the public
methods below (``compute_targets``, ``inner_jobs``, ``commit``, ``check_guards``, ``outer_state``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from lwcompile.config import Config
from lwcompile.errors import ConfigError, LwcompileError, NonFiniteError, describe_values, first_line
from lwcompile.guards import differences, layout_changes, snapshot
from lwcompile.ir import Block, TraceResult, as_tuple
from lwcompile.outer import OuterOptimizer
from lwcompile.passes.inner import build_inner_graph, inner_example, inner_key, inner_signature
from lwcompile.passes.inner_share import SharedInnerGraphs
from lwcompile.passes.optimizers import make_optimizer
from lwcompile.passes.partition import Partition
from lwcompile.passes.signatures import InnerSignature, TargetSignature
from lwcompile.passes.stages import Stage, build_layout
from lwcompile.passes.targets import build_target_graph, make_target_fn
from lwcompile.pipeline import compile_model
from lwcompile.program_tools import ProgramTools
from lwcompile.schedule import schedule_factor
from lwcompile import checkpoint, rollback
from lwcompile.runtime.compiled import CompiledGraphs
from lwcompile.passes.fuse import FusedGroups
from lwcompile.runtime.fused import FusedCache, run_fused
from lwcompile.runtime.local import Runner, check_runnable, run_jobs


def _block_layout(blocks: Sequence[Block]) -> tuple:
    return tuple((b.name, b.op, b.weight_shape, b.bias_shape, b.params) for b in blocks)


def _key(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else repr(t) for t in tensors)


class Program(ProgramTools):
    """A model compiled for layer-wise local-loss training. Made by :func:`lwcompile.transform`.

    Example:
        >>> import torch, lwcompile
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> prog = lwcompile.transform(model, torch.nn.functional.mse_loss, (torch.randn(16, 4),),
        ...                            lwcompile.Config(inner_optimizer="gd", inner_lr=0.01, steps=3))
        >>> loss = prog.step(torch.randn(16, 4), torch.randn(16, 1))
        >>> [b.name for b in prog.blocks], type(loss)
        (['0', '2'], <class 'float'>)
    """

    # labels to trace the target graph for at export (set by lwcompile.transform(..., example_labels=))
    example_labels: tuple | None = None

    def __init__(self, model: nn.Module, loss_fn: Callable, example_inputs: tuple, config: Config) -> None:
        self.model, self.loss_fn, self.config, self.example_inputs = model, loss_fn, config, example_inputs
        self._inner_lr = float(config.inner_lr)
        self._target_cache: dict[tuple, tuple[fx.GraphModule, TargetSignature]] = {}
        self._inner_cache: dict[tuple, fx.GraphModule] = {}
        self._shared_inner = SharedInnerGraphs(config)  # what step runs: one graph per conv kind, checked
        self._compiled_inner = CompiledGraphs() if config.compile_inner else None  # Config.compile_inner
        self._fused_cache = FusedCache(self._compiled_inner.get if self._compiled_inner is not None else None)
        self._last_target: tuple[fx.GraphModule, TargetSignature] | None = None
        self._compile()
        opt = make_optimizer(config.inner_optimizer, config.optimizer_options())
        self._inner_state: dict[str, tuple[torch.Tensor, ...]] = {
            b.name: tuple(s.detach().clone() for s in opt.init(tuple(self._param(p).detach() for p in b.params)))
            for b in self.blocks}
        self._outer = self._make_outer()
        self.last_timings: dict[str, float] = {}
        self.step_count = 0

    # ------------------------------------------------------------------ compile
    def _compile(self) -> None:
        """Run the pipeline; commit its records only if the blocks are the ones the optimizer state fits."""
        c = compile_model(self.model, self.loss_fn, self.example_inputs, self.config)
        old = getattr(self, "_compiled", None)
        if old is not None and _block_layout(old.partition.blocks) != _block_layout(c.partition.blocks):
            raise LwcompileError(
                "the model changed since lwcompile.transform so that its blocks differ (" +
                "; ".join(differences(old.guards, c.guards)) + "); call lwcompile.transform again.")
        self._compiled = c
        self._inner_sigs = {b.name: inner_signature(b, self.config) for b in c.partition.blocks}
        # (preact, offset) -> the variant's signature, per block (the two flags only rename and add inputs)
        self._sig_variants = {n: {(p, o): dataclasses.replace(s, preact=p, offset=o) for p in (False, True)
                                  for o in (False, True)} for n, s in self._inner_sigs.items()}
        self._blocks_by_name = {b.name: b for b in c.partition.blocks}
        self._inner_keys = {b.name: inner_key(b, self.config) for b in c.partition.blocks}
        self._target_cache.clear()
        self._last_target = None

    def check_guards(self) -> bool:
        """Re-trace when something the graphs froze changed (mode, attributes, parameters; see
        :mod:`lwcompile.guards`); True when it did. Refuses changes that no re-trace absorbs."""
        now = snapshot(self.model, self.loss_fn)
        if not differences(self._compiled.guards, now):
            return False
        moved = layout_changes(self._compiled.guards, now)
        if moved:
            raise LwcompileError("parameters or buffers changed shape, dtype or device since lwcompile.transform ("
                                 + "; ".join(moved) + "); call lwcompile.transform again on the converted model.")
        self._compile()
        previous, self._outer = self._outer, self._make_outer()
        if self._outer is not None:
            self._outer.adopt(previous)
        return True

    def _make_outer(self) -> OuterOptimizer | None:
        c = self.config
        return OuterOptimizer.build(c.outer_optimizer, {n: self._param(n) for n in self.nonblock}, c.outer_lr,
                                    dict(c.outer_options))

    def _param(self, name: str) -> torch.Tensor:
        return self.trace_result.graph_module.get_parameter(name)

    # ------------------------------------------------------------------ public records
    @property
    def trace_result(self) -> TraceResult:
        """The trace pass's record: the traced GraphModule (sharing the model's tensors) and its front end."""
        return self._compiled.trace

    @property
    def partition(self) -> Partition:
        """The partition pass's record: blocks, non-block parameters, block edges, notes."""
        return self._compiled.partition

    @property
    def tapped(self) -> fx.GraphModule:
        """The traced model, also returning every block's input, pre-activation and output."""
        return self._compiled.tapped

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.partition.blocks

    @property
    def nonblock(self) -> tuple[str, ...]:
        """Trainable parameters outside blocks (stepped by the outer optimizer)."""
        return self.partition.nonblock

    @property
    def frontend(self) -> str:
        """Which tracer captured the model: "torch.fx.symbolic_trace" or "torch.export"."""
        return self.trace_result.frontend

    @property
    def fusion(self) -> FusedGroups:
        """The fuse pass's record (``Config.fuse``): the groups of identical blocks whose inner loops ``step`` runs
        as one batched graph, and notes on blocks left unfused and why (see :mod:`lwcompile.passes.fuse`)."""
        f = self._compiled.fused
        return dataclasses.replace(f, notes=f.notes + tuple(self._fused_cache.notes))

    @property
    def warnings(self) -> tuple[str, ...]:
        """Notes from compiling: why a front end was passed over, ops treated as identity, tied weights."""
        return tuple(self.trace_result.notes) + tuple(self.partition.warnings)

    @property
    def inner_lr(self) -> float:
        """The base inner lr (``Config.inner_lr`` until set between steps); the schedule multiplies it."""
        return self._inner_lr

    @inner_lr.setter
    def inner_lr(self, lr: float) -> None:
        # 0 is allowed: a hand-written warm-up may run at lr 0 while optimizer slots fill.
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ConfigError(f"inner_lr={lr!r}: must be a finite number >= 0.")
        self._inner_lr = float(lr)

    @property
    def effective_inner_lr(self) -> float:
        """The next step's inner lr: ``inner_lr × schedule_factor(config, step_count)`` (:mod:`lwcompile.schedule`)."""
        return self._inner_lr * schedule_factor(self.config, self.step_count)

    @property
    def inner_state(self) -> Mapping[str, tuple[torch.Tensor, ...]]:
        """Each block's inner-optimizer state, kept across steps."""
        return dict(self._inner_state)

    # ------------------------------------------------------------------ graphs
    def _signature(self, n_inputs: int, n_labels: int) -> TargetSignature:
        c = self._compiled
        return TargetSignature(c.param_names, c.buffer_names, n_inputs, n_labels,
                               tuple(b.name for b in self.blocks), self.nonblock, self.config.reuse_preactivation,
                               offsets=True)  # the inner graphs step runs take each target's offset (full precision)

    def _target_for(self, inputs: tuple, labels: tuple) -> tuple[fx.GraphModule, TargetSignature]:
        key = (_key(inputs), _key(labels))
        if key not in self._target_cache:
            sig = self._signature(len(inputs), len(labels))
            fn = make_target_fn(self.tapped, self.blocks, self.loss_fn, sig, self.config.target,
                                self.config.gamma, self.trace_result.out_spec,
                                param_tensors=[self._param(n) for n in self._compiled.param_names])
            flat = self._flat_args(sig, inputs, labels)
            recurrent = any(isinstance(m, nn.RNNBase) for m in self.model.modules())
            self._target_cache[key] = (build_target_graph(fn, flat, recurrent=recurrent), sig)
        self._last_target = self._target_cache[key]
        return self._last_target

    def _flat_args(self, sig: TargetSignature, inputs: tuple, labels: tuple) -> list[torch.Tensor]:
        gm = self.trace_result.graph_module
        return sig.pack({n: gm.get_parameter(n) for n in sig.params}, {n: gm.get_buffer(n) for n in sig.buffers},
                        inputs, labels)

    @property
    def target_graph(self) -> fx.GraphModule:
        """The forward/target GraphModule: (params, buffers, inputs, labels) -> (loss, block inputs,
        block targets, non-block grads). Built for the shapes of the last ``step`` (call ``step`` or
        :meth:`build_target_graph` with example labels first)."""
        if self._last_target is None:
            raise LwcompileError("the target graph is traced for the labels' shape: call prog.step(x, y) once, "
                                 "or prog.build_target_graph(example_labels) first.")
        return self._last_target[0]

    @property
    def target_signature(self) -> TargetSignature:
        self.target_graph  # noqa: B018  (raises the helpful error when not built yet)
        return self._last_target[1]

    def build_target_graph(self, example_labels: Any, example_inputs: Any = None) -> fx.GraphModule:
        """Trace the target graph for these example labels (and inputs; default: the transform's)."""
        inputs = self.example_inputs if example_inputs is None else as_tuple(example_inputs)
        return self._target_for(inputs, as_tuple(example_labels))[0]

    def inner_graph(self, name: str, batch: int | None = None, dtype: torch.dtype | None = None,
                    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                    preact: bool | None = None, offset: bool = True) -> fx.GraphModule:
        """The inner-update GraphModule of block ``name`` for a batch size (default: the example's) and dtype
        (default: the block weight's); ``shapes`` = (input shape, target shape) overrides the batch size.
        ``preact``: whether the graph also takes the forward pass's pre-activation (see :meth:`inner_signature`);
        default ``Config.reuse_preactivation``, i.e. the graph ``step`` runs. ``offset`` (default True, what
        ``step`` runs): the graph takes the target's offset (``compute_targets(...)["offsets"]``); False: the
        target itself (less precise: see :func:`lwcompile.passes.inner.make_inner_fn`)."""
        preact = self.config.reuse_preactivation if preact is None else preact
        block = self._block(name)
        b = block.input_shape[0] if batch is None else batch
        dtype = self._param(block.weight).dtype if dtype is None else dtype
        xs, ts = shapes if shapes is not None else ((b, *block.input_shape[1:]), (b, *block.output_shape[1:]))
        # keyed by the block's structure, not its name: identical blocks share one traced graph
        key = (self._inner_keys[block.name], tuple(xs), tuple(ts), dtype, preact, offset)
        if key not in self._inner_cache:
            example = inner_example(block, self.config, dtype=dtype, x_shape=tuple(xs), target_shape=tuple(ts),
                                    preact=preact)
            self._inner_cache[key] = build_inner_graph(block, self.config, example, preact=preact, offset=offset)
        return self._inner_cache[key]

    @property
    def inner_graphs(self) -> Mapping[str, fx.GraphModule]:
        """Block name -> inner-update GraphModule: (weights, x, offset, lr, [â,] optimizer state) -> (new weights,
        state), traced for each block's shapes: the graphs ``step`` runs (â with ``Config.reuse_preactivation``;
        offset: the target's, see :meth:`inner_graph`), or for convolutions of one kind the same code traced once
        for another block's sizes (:mod:`lwcompile.passes.inner_share`)."""
        return {b.name: self.inner_graph(b.name) for b in self.blocks}

    def inner_signature(self, name: str, preact: bool | None = None, offset: bool = True) -> InnerSignature:
        """Block ``name``'s inner graph signature (inputs and outputs by name); ``preact`` (default
        ``Config.reuse_preactivation``): the variant that takes the pre-activation â after ``lr``; ``offset``
        (default True): the variant that takes the target's offset instead of the target (:meth:`inner_graph`)."""
        preact = self.config.reuse_preactivation if preact is None else preact
        self._block(name)  # the helpful KeyError
        return self._sig_variants[name][(bool(preact), bool(offset))]

    def _block(self, name: str) -> Block:
        b = self._blocks_by_name.get(name)
        if b is not None:
            return b
        raise KeyError(f"no block named {name!r}; blocks are {[b.name for b in self.blocks]}")

    # ------------------------------------------------------------------ the training step
    def compute_targets(self, x: Any, y: Any) -> dict[str, Any]:
        """Run the forward/target graph only: loss, and per block its input and target (nothing updated
        except BatchNorm-style running statistics)."""
        self.check_guards()
        inputs, labels = as_tuple(x), as_tuple(y)
        self._check_inputs(inputs)
        tg, sig = self._target_for(inputs, labels)
        with torch.no_grad():
            try:
                outs = tg(*self._flat_args(sig, inputs, labels))
            except (LwcompileError, torch.OutOfMemoryError):
                raise
            except RuntimeError as e:  # a real kernel refused what its fake (tracing) kernel let through
                raise LwcompileError(
                    f"the forward/target graph failed on this batch (inputs: {describe_values(inputs)}; labels: "
                    f"{describe_values(labels)}): {first_line(e)}. Check the labels' dtype and shape against what the "
                    "loss function expects (e.g. F.cross_entropy takes int64 class indices), and that the batch "
                    "is on the model's device.") from e
        res = sig.unpack(outs)
        return {"loss": res.loss, "inputs": dict(res.inputs), "targets": dict(res.targets), "grads": dict(res.grads),
                "preacts": dict(res.preacts), "offsets": dict(res.offsets)}

    def inner_jobs(self, inputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                   names: Sequence[str] | None = None,
                   preacts: Mapping[str, torch.Tensor] | None = None,
                   offsets: Mapping[str, torch.Tensor] | None = None) -> dict:
        """Block name -> (inner graph, its arguments) for one step (only the blocks in ``names``, when given).
        A block whose pre-activation is in ``preacts`` (``compute_targets(...)["preacts"]``) gets the graph that
        reuses it instead of recomputing it. A block whose target offset is in ``offsets``
        (``compute_targets(...)["offsets"]``, what ``step`` passes) gets the offset-form graph, exact to the
        precision of γ·g; without it, the target-form graph on ``targets`` (today's numbers: s(z) − t loses
        eps·|â| where γ·g is tiny next to â). With ``Config.compile_inner`` the graph's compiled callable
        (:mod:`lwcompile.runtime.compiled`) instead of the graph."""
        jobs = {}
        lrs: dict[tuple, torch.Tensor] = {}  # one lr tensor per dtype and device, not per block
        for b in self.blocks:
            if names is not None and b.name not in names:
                continue
            x = inputs[b.name].contiguous()  # the inner graphs are traced for contiguous inputs
            d = (offsets or {}).get(b.name)
            off = d is not None
            t = (d if off else targets[b.name]).contiguous()
            z = (preacts or {}).get(b.name)
            if z is not None and (z.shape != t.shape or z.dtype != t.dtype):
                z = None  # not the graph's input layout: recompute it rather than guess
            z = z.contiguous() if z is not None else None
            lr = lrs.get((x.dtype, x.device))
            if lr is None:
                lr = lrs[(x.dtype, x.device)] = torch.tensor(self.effective_inner_lr, dtype=x.dtype, device=x.device)
            sig = self.inner_signature(b.name, preact=z is not None, offset=off)
            args = sig.pack([self._param(p).detach() for p in b.params], x, t, lr, self._inner_state[b.name], z)
            shapes = (tuple(x.shape), tuple(t.shape))
            gm = self._shared_inner.get(
                b, x.dtype, *shapes, z is not None,
                own=lambda b=b, x=x, shapes=shapes, z=z, off=off: self.inner_graph(
                    b.name, dtype=x.dtype, shapes=shapes, preact=z is not None, offset=off), offset=off)
            jobs[b.name] = (gm if self._compiled_inner is None else self._compiled_inner.get(b.name, gm), args)
        return jobs

    def step(self, x: Any, y: Any, assignment: Mapping[str, Sequence[str]] | None = None,
             runner: Runner | None = None) -> float:
        """One training step on inputs ``x`` and labels ``y``; updates the model in place; returns the loss.

        The step is atomic: if anything fails (a non-finite loss, target, gradient or new value raises
        :class:`NonFiniteError`), parameters, buffers, inner and outer optimizer state and ``step_count`` are
        exactly as before. ``assignment`` (device -> block names, e.g. ``prog.plan(...).assignment``) runs
        blocks across devices; a ``runner`` (e.g. the distributed runtime's) runs the inner loops itself.
        """
        t0 = time.perf_counter()
        if assignment is not None and runner is not None:
            raise ConfigError("step() takes an assignment or a runner, not both.")
        if assignment is not None:
            check_runnable(assignment)  # a missing CUDA device is refused before anything runs
        journal = rollback.Journal(self.trace_result.graph_module, self._inner_state, self._outer, self.step_count)
        try:
            res = self.compute_targets(x, y)
            self._check_all_finite([("the task loss", res["loss"])]
                                   + [(f"the target of block {n!r}", t) for n, t in res["targets"].items()]
                                   + [(f"the gradient of non-block parameter {n!r}", g)
                                      for n, g in res["grads"].items()])
            t1 = time.perf_counter()
            jobs = self.inner_jobs(res["inputs"], res["targets"], preacts=res["preacts"], offsets=res["offsets"])
            if runner is not None:  # a runner (the distributed runtime) gets every block's own job
                outs = runner.run_jobs(jobs)
            elif self._compiled.fused.groups:  # Config.fuse: identical blocks as one batched job
                outs = run_fused(jobs, self._compiled.fused, assignment, self._fused_cache, run=run_jobs)
            else:
                outs = run_jobs(jobs, assignment)
            t2 = time.perf_counter()
            self.commit(outs, res["grads"], journal)
        except BaseException:
            self._inner_state, self._outer, self.step_count = journal.undo()
            raise
        t3 = time.perf_counter()
        self.last_timings = {"target": t1 - t0, "inner": t2 - t1, "update": t3 - t2, "total": t3 - t0}
        self.step_count += 1
        return float(res["loss"])

    def commit(self, outs: Mapping[str, Sequence[torch.Tensor]], grads: Mapping[str, torch.Tensor],
               journal: rollback.Journal | None = None) -> None:
        """Apply a step's results: each block in ``outs`` (block name -> its inner graph's outputs) gets its new
        weights and inner state, then the outer optimizer steps the non-block parameters named in ``grads`` (after
        the block weights, so a tied weight gets its block's update plus its other uses' step). Checks that every
        new value is finite first; not atomic by itself (``step`` is: it passes a ``journal`` that records what
        this replaces, see :mod:`lwcompile.rollback`)."""
        new = {name: self.inner_signature(name).unpack(o) for name, o in outs.items()}
        self._check_all_finite([(f"the new value of {p!r} (block {b.name!r})", v) for b in self.blocks
                                for p, v in zip(b.params, new[b.name][0] if b.name in new else ())])
        with torch.no_grad():
            for b in self.blocks:
                if b.name not in new:
                    continue
                values, state = new[b.name]
                for p, v in zip(b.params, values):
                    if p not in b.frozen:
                        if journal is not None:
                            journal.replace(self._param(p), v)
                        else:
                            self._param(p).copy_(v)
                self._inner_state[b.name] = tuple(state)
        if self._outer is not None and grads:
            if journal is not None:
                journal.before_outer_step(self._outer, {n: self._param(n) for n in grads})
            self._outer.step(grads)
            self._check_all_finite([(f"the new value of non-block parameter {n!r}", self._param(n)) for n in grads])

    def begin_step(self) -> rollback.Journal:
        """A journal of the training state before a step that a runtime drives itself (the data-parallel one):
        pass it to :meth:`commit`, and to :meth:`undo_step` if the step fails anywhere, even after committing."""
        return rollback.Journal(self.trace_result.graph_module, self._inner_state, self._outer, self.step_count)

    def undo_step(self, journal: rollback.Journal) -> None:
        """Put weights, buffers, inner and outer optimizer state and ``step_count`` back as ``journal`` found them."""
        self._inner_state, self._outer, self.step_count = journal.undo()

    def stage(self, block_rank: Mapping[str, int], rank: int) -> Stage:
        """Rank ``rank``'s part of the forward/target computation when block ``b`` runs on rank ``block_rank[b]``
        (the partitioned runtime's unit; see :mod:`lwcompile.passes.stages`)."""
        layout = build_layout(self.tapped, self.blocks, self.nonblock, block_rank)
        return Stage(self.tapped, layout, rank, self.blocks)

    def state_dict(self) -> dict[str, Any]:
        """A copy of the training state beyond ``model.state_dict()`` (optimizer states, ``step_count``, ``inner_lr``,
        a fingerprint): tensors and plain values, for ``torch.save`` (see :mod:`lwcompile.checkpoint`)."""
        return checkpoint.program_state(self, self._outer)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (and ``model.load_state_dict``): later steps are bit-identical to never
        stopping. Another program's state (blocks, shapes, Config) is refused, changing nothing."""
        self.check_guards()  # the fresh outer optimizer must step the tensors the graphs use now
        inner, outer, count, lr = checkpoint.read_state(self, state_dict, self._make_outer())
        self._inner_state, self._outer, self.step_count, self._inner_lr = inner, outer, count, lr

    def outer_state(self) -> dict[str, dict[str, Any]]:
        """The outer optimizer's slots by non-block parameter name (empty without an outer optimizer)."""
        return self._outer.state_by_name() if self._outer is not None else {}

    def _check_inputs(self, inputs: tuple) -> None:
        for i, (got, ex) in enumerate(zip(inputs, self.example_inputs)):
            if (isinstance(got, torch.Tensor) and isinstance(ex, torch.Tensor) and got.dtype != ex.dtype
                    and (got.is_floating_point() or ex.is_floating_point())):
                raise ConfigError(f"input {i} has dtype {got.dtype}, but the model was compiled for {ex.dtype} "
                                  f"(its example input); convert the batch (x.to({ex.dtype})) or transform the "
                                  "converted model again.")

    def _check_finite(self, what: str, t: torch.Tensor) -> None:
        self._check_all_finite([(what, t)])

    def _check_all_finite(self, items: Sequence[tuple[str, torch.Tensor]]) -> None:
        # One test settles the usual case for all tensors at once: a NaN/inf anywhere makes that tensor's sum
        # non-finite, and so the stacked sums' sum (one isfinite, one sync instead of one per tensor). Only a
        # non-finite total (a bad value, or finite values overflowing) looks at the tensors one by one.
        ts = [t for _, t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        if not ts:
            return
        by_type: dict[tuple, list[torch.Tensor]] = {}
        for t in ts:
            by_type.setdefault((t.dtype, t.device), []).append(t)
        ok = True
        for group in by_type.values():
            ok = ok and bool(torch.isfinite(torch.stack([t.sum() for t in group]).sum()))
        if ok:
            return
        for what, t in items:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteError(f"{what} has {bad} NaN/inf value(s); the model was left unchanged. Lower "
                                     "Config.gamma or the learning rates, or check the inputs and the loss.")
