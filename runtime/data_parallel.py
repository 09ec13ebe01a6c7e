"""Data-parallel LocoProp under torch.distributed: every rank holds the whole model and steps on its shard.

Each rank passes ``step`` its own shard (x_r, y_r) of the global batch (B = Σ_r n_r examples). After the step every
rank holds the same weights, inner-optimizer state and outer-optimizer state, equal (to float rounding) to one
process stepping on the whole batch.

**The batch-mean convention.** The task loss is a batch mean, L = (1/B) Σ_i ℓ_i, so one process's targets are
t_i = base_i − γ ∂L/∂â_i = base_i − (γ/B) ∂ℓ_i/∂â_i (base = â or ŷ by ``Config.target``). A rank's shard loss
L_r = (1/n_r) Σ_{i∈r} ℓ_i has ∂L_r/∂â_i = (1/n_r) ∂ℓ_i/∂â_i: B/n_r (= N for equal shards) times too large.
So each rank scales its shard's gradients by w_r = n_r / B (it is the gradient of w_r · L_r, and Σ_r w_r L_r = L):

* targets: t_i = base_i − γ w_r ∂L_r/∂â_i, exactly the one-process target of example i;
* non-block gradients: Σ_r w_r ∂L_r/∂θ = ∂L/∂θ: all-reduced (summed) once per step, as DDP, then every rank
  steps the outer optimizer on the same gradient;
* the reported loss is Σ_r w_r L_r = L.

B comes from the same all-reduce (each rank sends n_r · its gradients and n_r; the sums divided by B).

**Inner loops.** The local losses are sums over examples (no 1/N), so a block's inner gradient is a sum of
per-rank sums. Iterative optimizers run their T iterations in Python (the pure ``init``/``update`` pairs of
``passes/optimizers.py`` via :mod:`lwcompile.dp_math`), with one all-reduce per iteration of all blocks' local
gradients (before the proximal term, which is added once after the sum); every rank then applies the same update.
``inner_optimizer="exact"`` all-reduces the solve's sums (XᵀX, XᵀR, Xᵀ1, 1ᵀR, rows; R = A − Z at the current
weights) once per step, then every rank solves the same system. :func:`allreduce_bytes` predicts what travels;
``trainer.last_bytes`` counts it.

**Hybrid.** ``plan=prog.plan(devices=L, mode="replicated")`` makes the job a grid (:mod:`lwcompile.runtime.dp_grid`):
world / L shards × L ranks per shard. The ranks of a shard run the same forward and split the blocks' inner loops
as the plan says; a block's sums are all-reduced only among its owners (one per shard), and each owner then
broadcasts the block's new weights and inner state to the other ranks of its shard. Partitioned (pipeline) plans
are refused.

**Limits.** BatchNorm-style buffers are updated from each rank's shard (like DDP), then rank 0's are broadcast so
all ranks agree (``broadcast_buffers=True`` in DDP terms): in train mode both the normalization and the running
statistics are the shard's, not the full batch's, so a model with train-mode BatchNorm does not equal one process
(eval-mode BatchNorm does). SyncBatchNorm and tied weights (a block weight also used elsewhere) are refused with
a ConfigError. The loss must be a batch mean (``reduction="mean"``).

**Faults.** A rank that raises makes every other rank raise a DistributedError naming it (its failure rides on the
next all-reduce; in a hybrid grid the other shards learn it at the next weight broadcast, at worst after the
timeout); a rank that dies or hangs makes the others raise after ``timeout`` seconds. A step is atomic: each rank
commits into a journal (:meth:`Program.begin_step`) and the step's last message is an agreement; a failure
anywhere before it, including in another rank's commit, undoes the step on every rank.

**Checkpoints.** ``trainer.save(path)`` (rank 0 writes) and ``trainer.load(path)`` (every rank reads) hold the
model and the program's state; the state does not depend on the number of ranks, so a run resumes with any.

Example (``torchrun --nproc-per-node 2 train.py``)::

    prog = lwcompile.transform(model, loss_fn, example_x)       # same seed on every rank
    trainer = DataParallelTrainer(prog, timeout=60)             # joins the torchrun job (gloo on CPU)
    for x, y in batches:                                        # the same global batches on every rank
        loss = trainer.step(*trainer.shard((x, y)))              # this rank's rows
"""
from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from datetime import timedelta

from lwcompile import dp_math
from lwcompile.errors import ConfigError, NonFiniteError
from lwcompile.ir import as_tuple
from lwcompile.train_output import write_checkpoint
from lwcompile.runtime.comm import Comm, DistributedError
from lwcompile.runtime.distributed import init_from_env
from lwcompile.runtime.dp_costs import allreduce_bytes
from lwcompile.runtime.dp_grid import Grid, make_grid, shard
from lwcompile.runtime.plan import Plan

__all__ = ["DataParallelTrainer", "DistributedError", "Grid", "allreduce_bytes", "make_grid", "shard"]


class DataParallelTrainer:
    """Train ``prog`` data-parallel across the ranks of ``group`` (default: the torchrun job).

    Every rank builds the same program (same seed and config); rank 0's initial model is broadcast. ``timeout``
    (seconds) bounds every wait on another rank. With a replicated ``plan`` of L devices the job is a grid
    (:mod:`lwcompile.runtime.dp_grid`): world / L data-parallel shards, each shared by L ranks that split the
    blocks' inner loops as the plan says (``shard_index`` / ``shards`` tell a rank which rows to pass).

    Example (two processes)::

        trainer = DataParallelTrainer(prog, timeout=30)
        loss = trainer.step(*trainer.shard((x, y)))   # the whole batch's loss, the same float on every rank
    """

    def __init__(self, prog: Any, group: dist.ProcessGroup | None = None, timeout: float = 60.0,
                 sync_initial: bool = True, plan: Plan | None = None) -> None:
        if not timeout or timeout <= 0:
            raise ConfigError(f"timeout={timeout!r}: must be a number of seconds > 0.")
        _refuse_unsupported(prog)
        _check_plan(prog, plan, group)
        if group is None and not dist.is_initialized():
            init_from_env(timeout=timeout)
        self.prog, self.plan = prog, plan
        gm = prog.trace_result.graph_module
        p = next(iter(gm.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        wire = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.comm = Comm(group, wire, timeout, home=self.device)  # the whole job: agreement, initial sync
        self.rank, self.world = self.comm.rank, self.comm.world
        self.grid = make_grid(len(plan.devices)) if plan is not None else Grid(self.world, 1, self.rank, 0)
        self.data_comm = self.comm if self.grid.cols == 1 else Comm(self.grid.data_group, wire, timeout, self.device)
        self.layer_comm = None if self.grid.cols == 1 else Comm(self.grid.layer_group, wire, timeout, self.device)
        self.blocks_of = ({j: tuple(plan.assignment[d]) for j, d in enumerate(plan.devices)} if plan is not None
                          else {0: tuple(b.name for b in prog.blocks)})
        self.mine = self.blocks_of[self.grid.col]
        self.last_timings: dict[str, float] = {}
        self.last_bytes: dict[str, int] = {}
        self._stage = self._tapped = None
        if dist.get_backend(group) == "gloo":  # names the ranks that never arrive
            with self.comm.guard("the other ranks (start-up barrier)"):
                dist.monitored_barrier(group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
        names = repr(("data", [(b.name, b.weight_shape) for b in prog.blocks], prog.config.inner_optimizer,
                      self.grid.cols, sorted(self.blocks_of.items())))
        self.comm.check_same("the program's blocks, inner optimizer and plan",
                             float(zlib.crc32(names.encode())))
        if sync_initial:
            self._broadcast(with_params=True)

    # --------------------------------------------------------------------------------------------------- public
    @property
    def shard_index(self) -> int:
        """Which of the :attr:`shards` rows of each global batch this rank passes to :meth:`step`."""
        return self.grid.row

    @property
    def shards(self) -> int:
        """Into how many shards each global batch is split (world size / ranks per shard)."""
        return self.grid.rows

    def shard(self, batch: Any) -> Any:
        """This rank's rows of a global batch (a tensor or a tuple of them): ``shard(batch, shard_index, shards)``."""
        return shard(batch, self.grid.row, self.grid.rows)

    def step(self, x: Any, y: Any) -> float:
        """One step on this rank's shard ``(x, y)``; returns the whole batch's loss (the same on every rank).

        Atomic on every rank: if any rank fails anywhere in the step (even after it committed its own new
        weights, before the final agreement), every rank's weights, buffers and optimizer states are put back."""
        prog = self.prog
        for c in self._comms():
            c.step += 1
        prog.check_guards()
        stage = self._stage_for()
        gm = prog.trace_result.graph_module
        journal = prog.begin_step()
        self.last_bytes = {"nonblock": 0, "blocks": 0, "control": 0}
        t0 = time.perf_counter()
        try:
            self._phase("forward/backward")
            error, local = None, []
            nonblock = stage.layout.params.get(0, ())
            params = [gm.get_parameter(n) for n in nonblock]
            env = tap_g = None
            n_local = _rows(x)
            try:
                inputs, labels = as_tuple(x), as_tuple(y)
                env = stage.forward(inputs, {})
                loss = stage.loss(env, labels, prog.loss_fn, prog.trace_result.out_spec)
                self._check_finite("the task loss (this rank's shard)", loss)
                tap_g, param_g, _ = stage.backward(env, loss, [], [], params)
                local = [loss.detach().reshape(1).double() * n_local, *(g * n_local for g in param_g)]
            except Exception as e:
                error = e
                local = [torch.zeros(1, dtype=torch.float64), *(torch.zeros_like(p) for p in params)]
            count = torch.tensor([float(n_local)], dtype=torch.float64)
            summed = self._all_reduce([count, *local], error, ["control", "control"] + ["nonblock"] * len(params))
            total = float(summed[0])
            loss_value = float(summed[1]) / total
            grads = {n: g / total for n, g in zip(nonblock, summed[2:])}
            t1 = time.perf_counter()
            self._phase("inner loops")
            w = n_local / total  # this shard's share of the batch mean (module docstring)
            xs, targets = stage.targets(env, [g * w for g in tap_g], prog.config.target, prog.config.gamma)
            del env
            outs = self._inner(xs, targets)
            if self.layer_comm is not None:
                self._phase("weight broadcast")
                outs = self._exchange(outs)
            if any(True for _ in gm.buffers()):
                self._phase("buffer broadcast")
                self._broadcast(with_params=False)
            t2 = time.perf_counter()
            self._phase("commit")
            error = None
            try:
                for name, g in grads.items():
                    self._check_finite(f"the gradient of non-block parameter {name!r}", g)
                prog.commit(outs, grads, journal)
            except Exception as e:
                error = e
            self._phase("agreement")  # the last message of the step: after it nothing can fail
            self.comm.agree(error)
        except BaseException:
            prog.undo_step(journal)  # weights, buffers, inner and outer state as before the step
            raise
        t3 = time.perf_counter()
        self.last_timings = {"forward": t1 - t0, "inner": t2 - t1, "update": t3 - t2, "total": t3 - t0}
        prog.last_timings = dict(self.last_timings)
        prog.step_count += 1
        return loss_value

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers (copies; the same on every rank)."""
        return {k: v.detach().clone() for k, v in self.prog.model.state_dict().items()}

    def checkpoint(self) -> dict[str, Any]:
        """``{"model": model.state_dict(), "program": prog.state_dict()}``: everything a resume needs, the same on
        every rank and independent of the number of ranks (the shards' sums are the whole batch's)."""
        return {"model": self.state_dict(), "program": self.prog.state_dict()}

    def save(self, path: str) -> None:
        """Rank 0 writes :meth:`checkpoint` to ``path`` (``lwcompile.train_output.write_checkpoint``: atomically);
        every rank returns once it is written, or raises if rank 0 could not write it."""
        error = None
        if self.rank == 0:
            try:
                write_checkpoint(path, self.checkpoint())  # atomic; its temporary file never outlives a failure
            except Exception as e:
                error = e
        self._phase("checkpoint save")
        self.comm.agree(error)

    def load(self, checkpoint: str | Mapping[str, Any]) -> None:
        """Resume from :meth:`save`'s file (read by every rank: a shared file system) or a :meth:`checkpoint`
        dict, with the same or another number of ranks; later steps continue as if never stopped. Raises on
        every rank if any rank could not load it or the ranks loaded different states."""
        error = None
        try:
            state = (torch.load(checkpoint, map_location=self.device, weights_only=True)
                     if isinstance(checkpoint, (str, os.PathLike)) else checkpoint)
            self.prog.model.load_state_dict(state["model"])
            self.prog.load_state_dict(state["program"])
        except Exception as e:
            error = e
        self._phase("checkpoint load")
        self.comm.agree(error)
        gm = self.prog.trace_result.graph_module
        value = sum(float(p.detach().double().sum()) for p in gm.parameters()) + self.prog.step_count
        self.comm.check_same("the loaded checkpoint (parameters and step count)", value)

    # -------------------------------------------------------------------------------------------------- helpers
    def _comms(self) -> list[Comm]:
        return [c for c in (self.comm, self.data_comm, self.layer_comm) if c is not None]

    def _phase(self, name: str) -> None:
        for c in self._comms():
            c.phase = name

    def _all_reduce(self, tensors: list[torch.Tensor], error: BaseException | None, kinds: list[str]) -> list:
        """Sums over this rank's data-parallel group, counted in ``last_bytes`` by kind; raises everywhere (in
        this group) when a rank of it failed."""
        for t, k in zip(tensors, kinds):
            self.last_bytes[k] += t.numel() * t.element_size()
        self.last_bytes["control"] += 8  # the failure flag
        summed, bad = self.data_comm.all_reduce(tensors, failed=error is not None)
        if bad:
            self.data_comm.agree(error)
        return summed

    def _inner(self, xs: dict, targets: dict) -> dict[str, tuple]:
        """This rank's blocks' new weights and inner state, from all-reduced sums (identical across the group)."""
        prog, cfg = self.prog, self.prog.config
        gm = prog.trace_result.graph_module
        blocks = [b for b in prog.blocks if b.name in self.mine]
        params = {b.name: tuple(gm.get_parameter(p).detach() for p in b.params) for b in blocks}
        xs = {b.name: xs[b.name].contiguous() for b in blocks}
        targets = {b.name: targets[b.name].contiguous() for b in blocks}

        def reduce(fn, shapes_of):
            error, local = None, []
            try:
                for b in blocks:
                    local.extend(fn(b))
            except Exception as e:
                error, local = e, [torch.zeros(s, dtype=d) for b in blocks for s, d in shapes_of(b)]
            summed = self._all_reduce(local, error, ["blocks"] * len(local))
            out, i = {}, 0
            for b in blocks:
                k = len(shapes_of(b))
                out[b.name], i = tuple(summed[i:i + k]), i + k
            return out

        if cfg.inner_optimizer == "exact":
            shapes = {b.name: [(s.shape, s.dtype) for s in dp_math.gram_stats(
                b, params[b.name], xs[b.name][:1], targets[b.name][:1])] for b in blocks}
            stats = reduce(lambda b: dp_math.gram_stats(b, params[b.name], xs[b.name], targets[b.name]),
                           lambda b: shapes[b.name])
            return {b.name: dp_math.solve_stats(b, cfg, params[b.name], stats[b.name]) for b in blocks}
        anchor = dict(params)
        state = {b.name: prog.inner_state[b.name] for b in blocks}
        lrs = {b.name: torch.tensor(prog.effective_inner_lr, dtype=xs[b.name].dtype, device=xs[b.name].device)
               for b in blocks}
        for k in range(cfg.steps):
            grads = reduce(lambda b: dp_math.local_grads(b, cfg, params[b.name], xs[b.name], targets[b.name]),
                           lambda b: [(p.shape, p.dtype) for p in params[b.name]])
            for b in blocks:
                params[b.name], state[b.name] = dp_math.apply_update(
                    b, cfg, grads[b.name], state[b.name], params[b.name], anchor[b.name], lrs[b.name], k)
        return {b.name: (*params[b.name], *state[b.name]) for b in blocks}

    def _exchange(self, mine: dict[str, tuple]) -> dict[str, tuple]:
        """Hybrid: every column's blocks' results (weights, then inner state) broadcast across this row."""
        prog = self.prog
        gm = prog.trace_result.graph_module
        by_name = {b.name: b for b in prog.blocks}
        results: dict[str, tuple] = {}
        for j, names in sorted(self.blocks_of.items()):
            flat: list[torch.Tensor] = []
            for name in names:
                if j == self.grid.col:
                    results[name] = tuple(mine[name])
                else:
                    like = [gm.get_parameter(p) for p in by_name[name].params] + list(prog.inner_state[name])
                    results[name] = tuple(torch.empty_like(v, memory_format=torch.contiguous_format) for v in like)
                flat.extend(results[name])
            self.layer_comm.broadcast(flat, j)
        return results

    def _stage_for(self):
        """The whole model as one stage (rebuilt when the tapped graph changed, e.g. after model.eval())."""
        tapped = self.prog.tapped
        if tapped is not self._tapped:
            self._stage = self.prog.stage({b.name: 0 for b in self.prog.blocks}, 0)
            self._tapped = tapped
        return self._stage

    def _broadcast(self, with_params: bool) -> None:
        """Rank 0's buffers (and parameters and inner state) to every rank of the job."""
        gm = self.prog.trace_result.graph_module
        tensors = [b for _, b in gm.named_buffers()]
        if with_params:
            tensors = [p.data for _, p in gm.named_parameters()] + tensors
            tensors += [s for state in self.prog.inner_state.values() for s in state]
        self.comm.broadcast(tensors, 0)

    def _check_finite(self, what: str, t: torch.Tensor) -> None:
        if self.prog.config.check_finite and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"rank {self.rank}: {what} has NaN/inf values; the model was left unchanged. "
                                 "Lower Config.gamma or the learning rates, or check the inputs and the loss.")


def _check_plan(prog: Any, plan: Plan | None, group: Any) -> None:
    """ConfigError for plans the data-parallel runtime cannot combine with: partitioned ones, foreign ones."""
    if plan is None:
        return
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan must be an lwcompile Plan (prog.plan(...)), got {type(plan).__name__}.")
    if plan.mode != "replicated":
        raise ConfigError(f"data parallel × a {plan.mode!r} plan (a pipeline of stages) is not supported: use "
                          "prog.plan(devices=L, mode='replicated') for a grid of data-parallel shards × L ranks "
                          "that split the blocks, or DistributedTrainer(prog, plan) alone for the pipeline.")
    if group is not None:
        raise ConfigError("DataParallelTrainer(plan=...) builds its grid from the whole job: pass group=None.")
    placed = sorted(b for bs in plan.assignment.values() for b in bs)
    if placed != sorted(b.name for b in prog.blocks):
        raise ConfigError(f"the plan places blocks {placed[:6]} but the program has "
                          f"{sorted(b.name for b in prog.blocks)[:6]}; make the plan with this program's prog.plan().")


def _rows(x: Any) -> int:
    for t in as_tuple(x):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise ConfigError("data-parallel step(x, y): x has no tensor with a batch dimension to count examples by.")


def _refuse_unsupported(prog: Any) -> None:
    """ConfigError for what this runtime cannot train exactly: SyncBatchNorm, tied weights."""
    sync = [n for n, m in prog.model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    if sync:
        raise ConfigError(f"module {sync[0]!r} is a SyncBatchNorm; the data-parallel runtime keeps BatchNorm "
                          "statistics per rank (like DDP without it): convert it to BatchNorm (or train in one "
                          "process).")
    gm = prog.trace_result.graph_module
    outside = {id(gm.get_parameter(n)): n for n in prog.nonblock}
    for b in prog.blocks:
        for p in b.params:
            if id(gm.get_parameter(p)) in outside or any("tied weights" in w for w in prog.warnings):
                raise ConfigError(
                    f"block {b.name!r}: parameter {p!r} is tied to a use outside the block (as "
                    f"{outside.get(id(gm.get_parameter(p)), p)!r}); the data-parallel runtime cannot separate the "
                    "two uses' gradients on a shard yet: untie it, skip the block (Config(skip=...)), or train "
                    "with DistributedTrainer and a replicated plan.")
    if not math.isfinite(float(prog.config.gamma)):
        raise ConfigError("Config.gamma must be finite.")
