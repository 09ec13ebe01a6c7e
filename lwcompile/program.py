"""The compiled program: graphs, blocks, per-block optimizer state, and ``step``."""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from lwcompile.config import Config
from lwcompile.errors import ConfigError, ExportError, LwcompileError, NonFiniteError, PartitionError, TraceError
from lwcompile.guards import differences, layout_changes, snapshot
from lwcompile.ir import Block, TraceResult
from lwcompile.passes.checks import ensures_partition, ensures_tap
from lwcompile.passes.inner import build_inner_graph, inner_example, inner_io_names
from lwcompile.passes.optimizers import make_optimizer
from lwcompile.passes.partition import Partition, partition
from lwcompile.passes.targets import TargetSignature, build_target_graph, make_target_fn, tap
from lwcompile.passes.state import preserved_state
from lwcompile.passes.trace import EXPORT, trace
from lwcompile.runtime.local import check_runnable, run_jobs

_OUTER = {
    "sgd": lambda ps, lr, kw: torch.optim.SGD(ps, lr=lr, **kw),
    "momentum": lambda ps, lr, kw: torch.optim.SGD(ps, lr=lr, **({"momentum": 0.9} | kw)),
    "adam": lambda ps, lr, kw: torch.optim.Adam(ps, lr=lr, **kw),
    "adamw": lambda ps, lr, kw: torch.optim.AdamW(ps, lr=lr, **kw),
    "rmsprop": lambda ps, lr, kw: torch.optim.RMSprop(ps, lr=lr, **kw),
}


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _block_layout(blocks: Sequence[Block]) -> tuple:
    return tuple((b.name, b.op, b.weight_shape, b.bias_shape, b.params) for b in blocks)


def _refuse_unsupported_modules(model: nn.Module, cause: BaseException | None = None) -> None:
    """Modules whose training-mode semantics the graphs cannot reproduce exactly: refused by name."""
    for name, m in model.named_modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.momentum is None
                and m.track_running_stats):
            raise PartitionError(
                f"module {name!r} ({type(m).__name__}) uses momentum=None (a cumulative average whose factor "
                "1/num_batches_tracked is data-dependent): supported with the torch.fx front end only, and this "
                "model needs torch.export; give it a momentum (e.g. 0.1), or put it in eval() mode.") from cause


def _describe(values: Sequence[Any]) -> str:
    return ", ".join(f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor)
                     else type(v).__name__ for v in values) or "none"


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _key(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else repr(t) for t in tensors)


class Program:
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

    def __init__(self, model: nn.Module, loss_fn: Callable, example_inputs: tuple, config: Config) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.example_inputs = example_inputs
        self._inner_lr = float(config.inner_lr)
        self._target_cache: dict[tuple, tuple[fx.GraphModule, TargetSignature]] = {}
        self._inner_cache: dict[tuple, fx.GraphModule] = {}
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
        """Trace → partition → tap, committed only when every pass succeeded."""
        guards = snapshot(self.model, self.loss_fn)
        try:
            trace_result = trace(self.model, self.example_inputs, self.config.frontend)
        except TraceError as e:
            _refuse_unsupported_modules(self.model, e)  # the clearer reason, when it is one
            raise
        if trace_result.frontend == EXPORT:  # tap rewrites only call_module BatchNorms (torch.fx front end)
            _refuse_unsupported_modules(self.model)
        part = partition(trace_result.graph_module, self.example_inputs, self.config.skip)
        ensures_partition(trace_result.graph_module, part)
        tapped = tap(trace_result.graph_module, part.blocks)
        ensures_tap(tapped, part.blocks)
        old = getattr(self, "partition", None)
        if old is not None and _block_layout(old.blocks) != _block_layout(part.blocks):
            raise LwcompileError(
                "the model changed since lwcompile.transform so that its blocks differ (" +
                "; ".join(differences(self._guards, guards)) + "); call lwcompile.transform again.")
        self._guards, self.trace_result, self.partition, self.tapped = guards, trace_result, part, tapped
        gm = trace_result.graph_module
        self._param_names = tuple(n for n, _ in gm.named_parameters())
        self._buffer_names = tuple(n for n, _ in gm.named_buffers())
        self._target_cache.clear()
        self._last_target = None

    def _check_guards(self) -> None:
        """Re-trace when something the graphs froze changed (mode, attributes, parameters); see
        :mod:`lwcompile.guards`. Refuses changes that no re-trace absorbs."""
        now = snapshot(self.model, self.loss_fn)
        changed = differences(self._guards, now)
        if not changed:
            return
        moved = layout_changes(self._guards, now)
        if moved:
            raise LwcompileError("parameters or buffers changed shape, dtype or device since lwcompile.transform ("
                                 + "; ".join(moved) + "); call lwcompile.transform again on the converted model.")
        self._compile()
        self._rebuild_outer()

    _recompile_if_mode_changed = _check_guards  # the distributed runtime's name for it

    def _make_outer(self) -> torch.optim.Optimizer | None:
        self._outer_names = tuple(self.nonblock)
        params = [self._param(n) for n in self.nonblock]
        if not params or self.config.outer_optimizer == "none":
            return None
        try:
            return _OUTER[self.config.outer_optimizer](params, self.config.outer_lr, dict(self.config.outer_options))
        except TypeError as e:
            raise ConfigError(f"Config.outer_options={dict(self.config.outer_options)!r} rejected by "
                              f"{self.config.outer_optimizer!r}: {e}") from e

    def _rebuild_outer(self) -> None:
        """A new outer optimizer over the current non-block tensors, keeping the state of those it already had
        (by parameter name: a replaced tensor keeps its predecessor's state)."""
        old, old_names = self._outer, getattr(self, "_outer_names", ())
        self._outer = self._make_outer()
        if old is None or self._outer is None:
            return
        by_name = {n: old.state[p] for n, p in zip(old_names, old.param_groups[0]["params"]) if p in old.state}
        for n, p in zip(self.nonblock, self._outer.param_groups[0]["params"]):
            if n in by_name:
                self._outer.state[p] = by_name[n]

    def _param(self, name: str) -> torch.Tensor:
        return self.trace_result.graph_module.get_parameter(name)

    # ------------------------------------------------------------------ public records
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
    def warnings(self) -> tuple[str, ...]:
        """Notes from compiling: why a front end was passed over, ops treated as identity, tied weights."""
        return tuple(self.trace_result.notes) + tuple(self.partition.warnings)

    @property
    def inner_lr(self) -> float:
        return self._inner_lr

    @inner_lr.setter
    def inner_lr(self, lr: float) -> None:
        """Change the inner learning rate between steps (schedules); the graphs take it as an input."""
        # 0 is allowed: the official schedule's first warm-up epoch runs at lr 0 while optimizer slots fill.
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ConfigError(f"inner_lr={lr!r}: must be a finite number >= 0.")
        self._inner_lr = float(lr)

    @property
    def inner_state(self) -> Mapping[str, tuple[torch.Tensor, ...]]:
        """Each block's inner-optimizer state, kept across steps."""
        return dict(self._inner_state)

    # ------------------------------------------------------------------ graphs
    def _signature(self, n_inputs: int, n_labels: int) -> TargetSignature:
        return TargetSignature(self._param_names, self._buffer_names, n_inputs, n_labels,
                               tuple(b.name for b in self.blocks), self.nonblock)

    def _target_for(self, inputs: tuple, labels: tuple) -> tuple[fx.GraphModule, TargetSignature]:
        key = (_key(inputs), _key(labels))
        if key not in self._target_cache:
            sig = self._signature(len(inputs), len(labels))
            fn = make_target_fn(self.tapped, self.blocks, self.loss_fn, sig, self.config.target,
                                self.config.gamma, self.trace_result.out_spec,
                                param_tensors=[self._param(n) for n in self._param_names])
            flat = self._flat_args(inputs, labels)
            recurrent = any(isinstance(m, nn.RNNBase) for m in self.model.modules())
            self._target_cache[key] = (build_target_graph(fn, flat, recurrent=recurrent), sig)
        self._last_target = self._target_cache[key]
        return self._last_target

    def _flat_args(self, inputs: tuple, labels: tuple) -> list[torch.Tensor]:
        gm = self.trace_result.graph_module
        return ([gm.get_parameter(n) for n in self._param_names] + [gm.get_buffer(n) for n in self._buffer_names]
                + list(inputs) + list(labels))

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
        inputs = self.example_inputs if example_inputs is None else _as_tuple(example_inputs)
        return self._target_for(inputs, _as_tuple(example_labels))[0]

    def inner_graph(self, name: str, batch: int | None = None, dtype: torch.dtype | None = None) -> fx.GraphModule:
        """The inner-update GraphModule of block ``name`` for a batch size (default: the example's) and dtype
        (default: the block weight's)."""
        block = self._block(name)
        b = block.input_shape[0] if batch is None else batch
        dtype = self._param(block.weight).dtype if dtype is None else dtype
        key = (name, b, dtype)
        if key not in self._inner_cache:
            example = inner_example(block, self.config, b, dtype=dtype)
            self._inner_cache[key] = build_inner_graph(block, self.config, example)
        return self._inner_cache[key]

    @property
    def inner_graphs(self) -> Mapping[str, fx.GraphModule]:
        """Block name -> inner-update GraphModule: (weights, x, target, lr, optimizer state) -> (new weights, state)."""
        return {b.name: self.inner_graph(b.name) for b in self.blocks}

    def inner_io_names(self, name: str) -> tuple[list[str], list[str]]:
        return inner_io_names(self._block(name), self.config)

    def _block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block named {name!r}; blocks are {[b.name for b in self.blocks]}")

    # ------------------------------------------------------------------ the training step
    def compute_targets(self, x: Any, y: Any) -> dict[str, Any]:
        """Run the forward/target graph only: loss, and per block its input and target (nothing updated
        except BatchNorm-style running statistics)."""
        self._check_guards()
        inputs, labels = _as_tuple(x), _as_tuple(y)
        self._check_inputs(inputs)
        tg, sig = self._target_for(inputs, labels)
        with torch.no_grad():
            try:
                outs = tg(*self._flat_args(inputs, labels))
            except (LwcompileError, torch.OutOfMemoryError):
                raise
            except RuntimeError as e:  # a real kernel refused what its fake (tracing) kernel let through
                raise LwcompileError(
                    f"the forward/target graph failed on this batch (inputs: {_describe(inputs)}; labels: "
                    f"{_describe(labels)}): {_first_line(e)}. Check the labels' dtype and shape against what the "
                    "loss function expects (e.g. F.cross_entropy takes int64 class indices), and that the batch "
                    "is on the model's device.") from e
        m = len(self.blocks)
        return {
            "loss": outs[0],
            "inputs": dict(zip(sig.blocks, outs[1:1 + m])),
            "targets": dict(zip(sig.blocks, outs[1 + m:1 + 2 * m])),
            "grads": dict(zip(sig.nonblock, outs[1 + 2 * m:])),
        }

    def inner_jobs(self, inputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                   names: Sequence[str] | None = None) -> dict:
        """Block name -> (inner graph, its arguments) for one step (only the blocks in ``names``, when given)."""
        jobs = {}
        for b in self.blocks:
            if names is not None and b.name not in names:
                continue
            x = inputs[b.name].contiguous()  # the inner graphs are traced for contiguous inputs
            lr = torch.tensor(self._inner_lr, dtype=x.dtype, device=x.device)
            args = [self._param(p).detach() for p in b.params] + [x, targets[b.name].contiguous(), lr, *self._inner_state[b.name]]
            jobs[b.name] = (self.inner_graph(b.name, x.shape[0], x.dtype), args)
        return jobs

    def step(self, x: Any, y: Any, assignment: Mapping[str, Sequence[str]] | None = None) -> float:
        """One training step on inputs ``x`` and labels ``y``; updates the model in place; returns the loss.

        The step is atomic: if anything fails (a non-finite loss, target, gradient or new value raises
        :class:`NonFiniteError`), parameters, buffers, inner and outer optimizer state and ``step_count`` are
        exactly as before. ``assignment`` (device -> block names, e.g. ``prog.plan(...).assignment``) runs
        blocks across devices.
        """
        t0 = time.perf_counter()
        if isinstance(assignment, Mapping):
            check_runnable(assignment)  # a missing CUDA device is refused before anything runs
        undo = self._snapshot_state()
        try:
            res = self.compute_targets(x, y)
            self._check_finite("the task loss", res["loss"])
            for name, t in res["targets"].items():
                self._check_finite(f"the target of block {name!r}", t)
            for name, g in res["grads"].items():
                self._check_finite(f"the gradient of non-block parameter {name!r}", g)
            t1 = time.perf_counter()
            outs = run_jobs(self.inner_jobs(res["inputs"], res["targets"]), assignment)
            t2 = time.perf_counter()
            for b in self.blocks:
                for p, new in zip(b.params, outs[b.name]):
                    self._check_finite(f"the new value of {p!r} (block {b.name!r})", new)
            self._commit(outs, res["grads"])
        except BaseException:
            self._restore_state(undo)
            raise
        t3 = time.perf_counter()
        self.last_timings = {"target": t1 - t0, "inner": t2 - t1, "update": t3 - t2, "total": t3 - t0}
        self.step_count += 1
        return float(res["loss"])

    def _commit(self, outs: Mapping[str, tuple], grads: Mapping[str, torch.Tensor]) -> None:
        """Write new block weights and inner state, then step the non-block parameters (after the block
        weights, so a tied weight gets its block's update plus its other uses' step)."""
        with torch.no_grad():
            for b in self.blocks:
                k = len(b.params)
                for p, new in zip(b.params, outs[b.name][:k]):
                    if p not in b.frozen:
                        self._param(p).copy_(new)
                self._inner_state[b.name] = tuple(outs[b.name][k:])
        if self._outer is not None:
            for name, g in grads.items():
                self._param(name).grad = g
            try:
                self._outer.step()
            finally:
                self._outer.zero_grad(set_to_none=True)
            for name in grads:
                self._check_finite(f"the new value of non-block parameter {name!r}", self._param(name))

    def _snapshot_state(self) -> dict[str, Any]:
        """Everything a step may change, to put back if it fails."""
        gm = self.trace_result.graph_module
        return {
            "params": {n: p.detach().clone() for n, p in gm.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in gm.named_buffers()},
            "inner": dict(self._inner_state),
            "outer": copy.deepcopy(self._outer.state_dict()) if self._outer is not None else None,
            "outer_obj": self._outer,
            "step_count": self.step_count,
        }

    def _restore_state(self, undo: Mapping[str, Any]) -> None:
        gm = self.trace_result.graph_module
        with torch.no_grad():
            for n, p in gm.named_parameters():
                if n in undo["params"]:
                    p.copy_(undo["params"][n])
            for n, b in gm.named_buffers():
                if n in undo["buffers"]:
                    b.copy_(undo["buffers"][n])
        self._inner_state = dict(undo["inner"])
        self._outer = undo["outer_obj"]
        if self._outer is not None:
            self._outer.load_state_dict(undo["outer"])
            self._outer.zero_grad(set_to_none=True)
        self.step_count = undo["step_count"]

    def _check_inputs(self, inputs: tuple) -> None:
        for i, (got, ex) in enumerate(zip(inputs, self.example_inputs)):
            if (isinstance(got, torch.Tensor) and isinstance(ex, torch.Tensor) and got.dtype != ex.dtype
                    and (got.is_floating_point() or ex.is_floating_point())):
                raise ConfigError(f"input {i} has dtype {got.dtype}, but the model was compiled for {ex.dtype} "
                                  f"(its example input); convert the batch (x.to({ex.dtype})) or transform the "
                                  "converted model again.")

    def _check_finite(self, what: str, t: torch.Tensor) -> None:
        if self.config.check_finite and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{what} has {bad} NaN/inf value(s); the model was left unchanged. Lower "
                                 "Config.gamma or the learning rates, or check the inputs and the loss.")

    def profile(self, x: Any, y: Any, repeats: int = 3) -> dict[str, float]:
        """Measured seconds of each block's inner loop on this batch (median of ``repeats``); pass the result
        to :meth:`plan` as ``profile=`` to replace the FLOP estimate. Nothing in the model changes."""
        with preserved_state(self.model):  # the forward would move BatchNorm statistics
            res = self.compute_targets(x, y)
        jobs = self.inner_jobs(res["inputs"], res["targets"])
        out = {}
        with torch.no_grad():
            for name, (fn, args) in jobs.items():
                fn(*args)  # warm-up
                times = []
                for _ in range(max(1, repeats)):
                    t0 = time.perf_counter()
                    fn(*args)
                    times.append(time.perf_counter() - t0)
                out[name] = sorted(times)[len(times) // 2]
        return out

    # ------------------------------------------------------------------ placement and export
    def plan(self, devices: Sequence[str] | int = 1, mode: str = "replicated", profile: Mapping[str, float] | None = None,
             device_rate: float | None = None):
        """Place the blocks' inner loops on devices (see :mod:`lwcompile.runtime.placement`)."""
        from lwcompile.runtime.placement import make_plan

        slots = make_optimizer(self.config.inner_optimizer, self.config.optimizer_options()).slots
        return make_plan(self.blocks, self.partition.edges, self.config.steps, devices, mode,
                         profile=profile, device_rate=device_rate, optimizer_slots=slots)

    def export_onnx(self, out_dir: str, **kwargs: Any):
        """Write every graph to ONNX in ``out_dir`` with a manifest (see :mod:`lwcompile.passes.onnx_export`)."""
        from lwcompile.passes.onnx_export import export_program

        self._refuse_unexportable(training=kwargs.get("training", True))
        return export_program(self, out_dir, **kwargs)

    def _refuse_unexportable(self, training: bool) -> None:
        """Patterns the torch runtime compiles exactly but the exported files would not reproduce."""
        nonblock = {id(self._param(n)) for n in self.nonblock}
        for b in self.blocks:
            tied = [p for p in b.params if p not in self._param_names or id(self._param(p)) in nonblock]
            if tied:
                raise ExportError(f"block {b.name!r}: parameter {tied[0]!r} is tied to another use (shared weights); "
                                  "the ONNX files store and update each parameter name separately, so they cannot "
                                  "express it. Train it with prog.step, or untie the weights to export.")
            if b.frozen and training:
                raise ExportError(f"block {b.name!r}: parameter {b.frozen[0]!r} has requires_grad=False, which the "
                                  "onnxruntime-training artifacts would train; export with training=False (the "
                                  "inner-update graphs keep it fixed).")

    # ------------------------------------------------------------------ printing
    def __str__(self) -> str:
        c = self.config
        head = (f"lwcompile.Program({type(self.model).__name__}, front end: {self.frontend})\n"
                f"  target={c.target} local_loss={c.local_loss} gamma={c.gamma} T={c.steps} "
                f"inner={c.inner_optimizer}(lr={self._inner_lr:g}) prox={c.prox} outer={c.outer_optimizer}(lr={c.outer_lr:g})\n")
        rows = [("block", "op", "transfer", "weight shape", "bias", "FLOPs/example")]
        for b in self.blocks:
            tf = b.transfer + ("(" + ", ".join(f"{k}={v}" for k, v in b.transfer_kwargs) + ")" if b.transfer_kwargs else "")
            rows.append((b.name, b.op, tf, "x".join(map(str, b.weight_shape)), "yes" if b.bias else "no",
                         f"{b.flops_per_example:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  " + "  ".join(v.ljust(w) if i < 5 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  " + "  ".join("-" * w for w in widths))
        n_nb = sum(self._param(n).numel() for n in self.nonblock)
        tail = f"\n  {len(self.blocks)} blocks; {len(self.nonblock)} non-block parameter tensors ({n_nb:,} values) -> outer optimizer"
        notes = "".join(f"\n  note: {w}" for w in self.warnings)
        return head + "\n".join(lines) + tail + notes

    __repr__ = __str__
