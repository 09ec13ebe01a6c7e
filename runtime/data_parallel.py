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
weights) once per step, then every rank solves the same system. :func:`allreduce_bytes` counts what travels.

**Limits.** BatchNorm-style buffers are updated from each rank's shard (like DDP), then rank 0's are broadcast so
all ranks agree (``broadcast_buffers=True`` in DDP terms); they are not the full batch's statistics. SyncBatchNorm
and tied weights (a block weight also used elsewhere) are refused with a ConfigError. The loss must be a batch
mean (``reduction="mean"``).

**Faults.** A rank that raises makes every other rank raise a DistributedError naming it (its failure rides on the
next all-reduce); a rank that dies or hangs makes the others raise after ``timeout`` seconds. A failed step leaves
the model as it was (buffers restored; nothing is committed before the last agreement).

Example (``torchrun --nproc-per-node 2 train.py``)::

    prog = lwcompile.transform(model, loss_fn, example_x)       # same seed on every rank
    trainer = DataParallelTrainer(prog, timeout=60)             # joins the torchrun job (gloo on CPU)
    for x, y in batches:                                        # the same global batches on every rank
        loss = trainer.step(*shard((x, y), trainer.rank, trainer.world))   # this rank's rows
"""
from __future__ import annotations

import math
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist
from datetime import timedelta

from lwcompile import dp_math
from lwcompile.errors import ConfigError, NonFiniteError
from lwcompile.ir import as_tuple
from lwcompile.runtime.comm import Comm, DistributedError
from lwcompile.runtime.costs import exact_problem
from lwcompile.runtime.distributed import init_from_env

__all__ = ["DataParallelTrainer", "DistributedError", "allreduce_bytes", "shard"]


def shard(batch: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s contiguous rows (dim 0) of every tensor in ``batch`` (a tensor or a tuple of them).

    Example:
        >>> shard((torch.arange(5), torch.arange(5) * 10), 1, 2)
        (tensor([3, 4]), tensor([30, 40]))
    """
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, rank, world) for b in batch)
    return torch.tensor_split(batch, world)[rank] if isinstance(batch, torch.Tensor) else batch


def allreduce_bytes(prog: Any) -> dict[str, int]:
    """Bytes each rank all-reduces per step: the non-block gradients once, plus per block T × its weights
    (iterative) or its solve's sums Σ_g (D² + D·O + D + O) + 1 (exact). Keys: "nonblock", "blocks", "total".

    Example:
        >>> import lwcompile
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> allreduce_bytes(lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(5, 3),
        ...                 lwcompile.Config(steps=2)))["blocks"]
        208
    """
    gm = prog.trace_result.graph_module
    nonblock = sum(gm.get_parameter(n).numel() * gm.get_parameter(n).element_size() for n in prog.nonblock)
    blocks = 0
    for b in prog.blocks:
        size = gm.get_parameter(b.weight).element_size()
        if prog.config.inner_optimizer == "exact":
            groups, _, d, o = exact_problem(b)
            d -= b.bias is not None and b.bias not in b.frozen  # the bias column is eliminated, not in the Gram
            blocks += (groups * (d * d + d * o + d + o) + 1) * size
        else:
            blocks += prog.config.steps * sum(gm.get_parameter(p).numel() for p in b.params) * size
    return {"nonblock": nonblock, "blocks": blocks, "total": nonblock + blocks}


class DataParallelTrainer:
    """Train ``prog`` data-parallel across the ranks of ``group`` (default: the torchrun job).

    Every rank builds the same program (same seed and config); rank 0's initial model is broadcast. ``timeout``
    (seconds) bounds every wait on another rank.

    Example (two processes)::

        trainer = DataParallelTrainer(prog, timeout=30)
        loss = trainer.step(x_shard, y_shard)   # the whole batch's loss, the same float on every rank
    """

    def __init__(self, prog: Any, group: dist.ProcessGroup | None = None, timeout: float = 60.0,
                 sync_initial: bool = True) -> None:
        if not timeout or timeout <= 0:
            raise ConfigError(f"timeout={timeout!r}: must be a number of seconds > 0.")
        _refuse_unsupported(prog)
        if group is None and not dist.is_initialized():
            init_from_env(timeout=timeout)
        self.prog = prog
        self.world = dist.get_world_size(group)
        gm = prog.trace_result.graph_module
        p = next(iter(gm.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        wire = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.comm = Comm(group, wire, timeout, home=self.device)
        self.rank = self.comm.rank
        self.last_timings: dict[str, float] = {}
        self._stage = self._tapped = None
        if dist.get_backend(group) == "gloo":  # names the ranks that never arrive
            with self.comm.guard("the other ranks (start-up barrier)"):
                dist.monitored_barrier(group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
        names = repr(("data", [(b.name, b.weight_shape) for b in prog.blocks], prog.config.inner_optimizer))
        self.comm.check_same("the program's blocks and inner optimizer", float(zlib.crc32(names.encode())))
        if sync_initial:
            self._broadcast(with_params=True)

    # --------------------------------------------------------------------------------------------------- public
    def step(self, x: Any, y: Any) -> float:
        """One step on this rank's shard ``(x, y)``; returns the whole batch's loss (the same on every rank)."""
        prog, comm = self.prog, self.comm
        comm.step += 1
        prog.check_guards()
        stage = self._stage_for()
        gm = prog.trace_result.graph_module
        saved = {n: b.detach().clone() for n, b in gm.named_buffers()}
        t0 = time.perf_counter()
        try:
            comm.phase = "forward/backward"
            error, local = None, []
            params = [gm.get_parameter(n) for n in stage.layout.params.get(0, ())]
            env = tap_g = None
            n_local = _rows(x)
            try:
                inputs, labels = as_tuple(x), as_tuple(y)
                env = stage.forward(inputs, {})
                loss = stage.loss(env, labels, prog.loss_fn, prog.trace_result.out_spec)
                self._check_finite("the task loss (this rank's shard)", loss)
                tap_g, param_g, _ = stage.backward(env, loss, [], [], params)
                local = [loss.detach().reshape(1) * n_local, *(g * n_local for g in param_g)]
            except Exception as e:
                error = e
                local = [torch.zeros(1, dtype=torch.float64), *(torch.zeros_like(p) for p in params)]
            count = torch.tensor([float(n_local)], dtype=torch.float64)
            summed, bad = comm.all_reduce([count, *local], failed=error is not None)
            if bad:
                comm.phase = "agreement"
                comm.agree(error)  # raises on every rank
            total = float(summed[0])
            loss_value = float(summed[1]) / total
            grads = {n: g / total for n, g in zip(stage.layout.params.get(0, ()), summed[2:])}
            t1 = time.perf_counter()
            comm.phase = "inner loops"
            w = n_local / total  # this shard's share of the batch mean (module docstring)
            xs, targets = stage.targets(env, [g * w for g in tap_g], prog.config.target, prog.config.gamma)
            del env
            outs = self._inner(xs, targets)
            t2 = time.perf_counter()
            comm.phase = "agreement"
            error = None
            try:
                for name, g in grads.items():
                    self._check_finite(f"the gradient of non-block parameter {name!r}", g)
            except Exception as e:
                error = e
            comm.agree(error)
        except BaseException:
            with torch.no_grad():  # leave the model exactly as it was
                for n, b in gm.named_buffers():
                    b.copy_(saved[n])
            raise
        prog.commit(outs, grads)
        if saved:
            comm.phase = "buffer broadcast"
            self._broadcast(with_params=False)
        t3 = time.perf_counter()
        self.last_timings = {"forward": t1 - t0, "inner": t2 - t1, "update": t3 - t2, "total": t3 - t0}
        prog.last_timings = dict(self.last_timings)
        prog.step_count += 1
        return loss_value

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers (copies; the same on every rank)."""
        return {k: v.detach().clone() for k, v in self.prog.model.state_dict().items()}

    # -------------------------------------------------------------------------------------------------- helpers
    def _inner(self, xs: dict, targets: dict) -> dict[str, tuple]:
        """Every block's new weights and inner state, from all-reduced sums (identical on every rank)."""
        prog, comm, cfg = self.prog, self.comm, self.prog.config
        gm = prog.trace_result.graph_module
        blocks = prog.blocks
        params = {b.name: tuple(gm.get_parameter(p).detach() for p in b.params) for b in blocks}
        xs = {k: v.contiguous() for k, v in xs.items()}
        targets = {k: v.contiguous() for k, v in targets.items()}

        def reduce(fn, shapes_of):
            error, local = None, []
            try:
                for b in blocks:
                    local.extend(fn(b))
            except Exception as e:
                error, local = e, [torch.zeros(s, dtype=d) for b in blocks for s, d in shapes_of(b)]
            summed, bad = comm.all_reduce(local, failed=error is not None)
            if bad:
                comm.agree(error)
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
        state = dict(prog.inner_state)
        lrs = {b.name: torch.tensor(prog.effective_inner_lr, dtype=xs[b.name].dtype, device=xs[b.name].device)
               for b in blocks}
        for k in range(cfg.steps):
            grads = reduce(lambda b: dp_math.local_grads(b, cfg, params[b.name], xs[b.name], targets[b.name]),
                           lambda b: [(p.shape, p.dtype) for p in params[b.name]])
            for b in blocks:
                params[b.name], state[b.name] = dp_math.apply_update(
                    b, cfg, grads[b.name], state[b.name], params[b.name], anchor[b.name], lrs[b.name], k)
        return {b.name: (*params[b.name], *state[b.name]) for b in blocks}

    def _stage_for(self):
        """The whole model as one stage (rebuilt when the tapped graph changed, e.g. after model.eval())."""
        tapped = self.prog.tapped
        if tapped is not self._tapped:
            self._stage = self.prog.stage({b.name: 0 for b in self.prog.blocks}, 0)
            self._tapped = tapped
        return self._stage

    def _broadcast(self, with_params: bool) -> None:
        """Rank 0's buffers (and parameters and inner state) to every rank."""
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
    block_params = {p for b in prog.blocks for p in b.params}
    tied = sorted(block_params & set(prog.nonblock))
    if tied or any("tied weights" in w for w in prog.warnings):
        what = tied[0] if tied else next(w for w in prog.warnings if "tied weights" in w)
        raise ConfigError(f"tied weights ({what}): the data-parallel runtime does not train a block weight that is "
                          "also used elsewhere yet; untie it, skip the block (Config.skip), or use "
                          "DistributedTrainer with a replicated plan.")
    if not math.isfinite(float(prog.config.gamma)):
        raise ConfigError("Config.gamma must be finite.")
