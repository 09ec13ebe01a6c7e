"""Distributed runtime: one process per device under torch.distributed (gloo on CPU, nccl on GPU), e.g. via torchrun.

Rank i runs the plan's i-th device. Every rank builds the same program (same model, seed and config), makes the
same plan, and calls ``step`` with the same batch.

* **replicated** plans: every rank runs the forward/target graph, then only its own blocks' inner loops; the
  owners then broadcast the new weights and inner-optimizer state. Non-block parameters are stepped on every
  rank from identical gradients, so all ranks hold the same model after every step.
* **partitioned** plans: rank i holds only stage i (see :mod:`lwcompile.passes.stages`): it evaluates its part of
  the model, sends activations forward and activation gradients back, computes its blocks' targets and inner
  loops, and steps its own non-block parameters. No weights move. ``state_dict()`` gathers the whole model.

Both give the one-process result (to float rounding). Each step ends with one small all-reduce in which the ranks
agree that everybody succeeded and got the same batch: a rank that raises makes every other rank raise a
:class:`DistributedError` naming it, and the model is left as it was. A rank that hangs or dies makes the others
raise after ``timeout`` seconds instead of hanging.

Example (``torchrun --nproc-per-node 2 train.py``)::

    prog = lwcompile.transform(model, loss_fn, example_x)       # same seed on every rank
    plan = prog.plan(devices=2, mode="partitioned")            # or "replicated"
    trainer = DistributedTrainer(prog, plan, timeout=60)       # joins the torchrun job (gloo on CPU)
    for x, y in batches:                                       # the same batches on every rank
        loss = trainer.step(x, y)
    state = trainer.state_dict()                               # the whole model, on every rank
"""
from __future__ import annotations

import math
import os
import socket
import time
import zlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lwcompile.errors import ConfigError, NonFiniteError
from lwcompile.runtime.comm import Comm, DistributedError
from lwcompile.runtime.local import Job, run_jobs
from lwcompile.runtime.plan import Plan
from lwcompile.ir import as_tuple

__all__ = ["DistributedTrainer", "DistributedError", "init_from_env"]


def init_from_env(backend: str | None = None, timeout: float = 60.0) -> None:
    """Join the job that torchrun (or the caller) describes in RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.

    ``backend`` defaults to nccl when CUDA is available, else gloo. Does nothing if a default group exists.

    Example::

        init_from_env(timeout=30)          # under torchrun --nproc-per-node 2
        torch.distributed.get_world_size() # 2
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"no torch.distributed process group and no {missing} in the environment: launch with "
                          "`torchrun --nproc-per-node N script.py`, or call torch.distributed.init_process_group.")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, float(timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=float(timeout)))


def _store(addr: str, port: int, rank: int, world: int, timeout: float) -> dist.TCPStore:
    """The rendezvous store, its server (rank 0) listening on ``addr`` only (loopback by default).

    torch's own TCPStore server binds every interface whatever MASTER_ADDR says; handing it a socket bound to
    ``addr`` keeps a single-machine job off the network. Under torchrun the agent already runs the store (ranks
    connect as clients)."""
    delta = timedelta(seconds=timeout)
    if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return dist.TCPStore(addr, port, world, False, delta)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"rank 0 cannot listen on MASTER_ADDR={addr}:{port} ({e}); pick a free MASTER_PORT, "
                          "and a MASTER_ADDR that is this machine's.") from e
    sock.listen(128)
    # detach: the store's server owns the descriptor from now on (closing it under the server aborts the process)
    return dist.TCPStore(addr, port, world, True, delta, master_listen_fd=sock.detach(), use_libuv=False)


class DistributedTrainer:
    """Train ``prog`` across the ranks of ``group`` (default: the torchrun job) as ``plan`` says.

    ``plan`` must have one device per rank (``prog.plan(devices=world_size, mode=...)``); its mode picks the
    runtime. ``timeout`` (seconds) bounds every wait on another rank.

    Example (two processes, same seed and data on both)::

        trainer = DistributedTrainer(prog, prog.plan(devices=2, mode="replicated"), timeout=30)
        loss = trainer.step(x, y)          # a float, the same on every rank
    """

    def __init__(self, prog: Any, plan: Plan, group: dist.ProcessGroup | None = None, timeout: float = 60.0,
                 sync_initial: bool = True) -> None:
        if not isinstance(plan, Plan):
            raise ConfigError(f"plan must be an lwcompile Plan (prog.plan(...)), got {type(plan).__name__}.")
        names = [b.name for b in prog.blocks]
        placed = [b for bs in plan.assignment.values() for b in bs]
        if sorted(placed) != sorted(names):
            raise ConfigError(f"the plan places blocks {sorted(placed)[:6]} but the program has {sorted(names)[:6]}; "
                              "make the plan with this program's prog.plan(...).")
        if not timeout or timeout <= 0:
            raise ConfigError(f"timeout={timeout!r}: must be a number of seconds > 0.")
        if group is None and not dist.is_initialized():
            init_from_env(timeout=timeout)
        self.prog, self.plan, self.mode = prog, plan, plan.mode
        world = dist.get_world_size(group)
        if len(plan.devices) != world:
            raise ConfigError(f"the plan has {len(plan.devices)} devices but the process group has {world} ranks; "
                              f"make it with prog.plan(devices={world}, mode={plan.mode!r}).")
        self.device = _model_device(prog)
        if dist.get_backend(group) == "nccl" and self.device.type != "cuda":
            raise ConfigError("the nccl backend needs the model on this rank's GPU: model.to(f'cuda:{local_rank}') "
                              "before lwcompile.transform, or use the gloo backend on CPU.")
        wire = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.comm = Comm(group, wire, timeout, home=self.device)
        self.rank, self.world = self.comm.rank, world
        self.blocks_of = {r: tuple(plan.assignment[d]) for r, d in enumerate(plan.devices)}
        self.mine = self.blocks_of[self.rank]
        self.last_timings: dict[str, float] = {}
        self._layout = self._stage = None
        self._tapped = None
        if dist.get_backend(group) == "gloo":  # names the ranks that never arrive
            with self.comm.guard("the other ranks (start-up barrier)"):
                dist.monitored_barrier(group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
        self.comm.check_same("the program's blocks and the plan", _fingerprint(names, plan))
        if self.mode == "replicated" and sync_initial:
            self._broadcast_model(src_of=lambda kind, name: 0)
        elif self.mode == "partitioned":
            self._refresh_layout()

    # --------------------------------------------------------------------------------------------------- public
    def step(self, x: Any, y: Any) -> float:
        """One training step on the batch ``(x, y)``, which every rank passes; returns the task loss."""
        self.comm.step += 1
        if self.mode == "replicated":
            return self._step_replicated(x, y)
        return self._step_partitioned(x, y)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters and buffers as of the last step, on every rank (copies).

        In partitioned mode each stage's owner broadcasts its tensors; in replicated mode every rank has them.
        """
        if self.mode == "partitioned":
            lay = self._refresh_layout()
            owner = {p: r for r, ps in lay.params.items() for p in ps}
            owner |= {b: r for r, bs in lay.buffers.items() for b in bs}
            owner |= {p: self._rank_of_block(b.name) for b in self.prog.blocks for p in b.params}
            self.comm.phase = "state_dict"
            self._broadcast_model(src_of=lambda kind, name: owner.get(name, lay.loss_rank), with_inner=False)
        return {k: v.detach().clone() for k, v in self.prog.model.state_dict().items()}

    @property
    def owned_blocks(self) -> tuple[str, ...]:
        """The blocks whose inner loops this rank runs."""
        return self.mine

    # ----------------------------------------------------------------------------------------------- replicated
    def _step_replicated(self, x: Any, y: Any) -> float:
        runner = _ReplicatedRunner(self, _checksum(x, y))
        self.comm.phase = "forward/target graph"
        try:
            loss = self.prog.step(x, y, runner=runner)
        except Exception as e:
            if not runner.agreed and not isinstance(e, DistributedError):
                self.comm.phase = "agreement"
                self.comm.agree(e, runner.checksum)  # tell the others, then raise
            raise
        self.last_timings = dict(self.prog.last_timings) | runner.timings
        return loss

    # ---------------------------------------------------------------------------------------------- partitioned
    def _step_partitioned(self, x: Any, y: Any) -> float:
        prog, comm, rank = self.prog, self.comm, self.rank
        lay = self._refresh_layout()
        stage = self._stage
        inputs, labels = as_tuple(x), as_tuple(y)
        checksum = _checksum(x, y)
        gm = prog.trace_result.graph_module
        saved = {n: b.detach().clone() for n, b in gm.named_buffers()}
        params = [gm.get_parameter(p) for p in lay.params.get(rank, ())]
        error: BaseException | None = None
        note: str | None = None  # a failure reported by another rank
        loss = env = None
        t0 = time.perf_counter()
        try:
            comm.phase = "forward"
            received, got = {}, {}
            for src in lay.upstream(rank):
                values, remote = comm.recv(src)
                if remote is not None:
                    note = note or remote
                    continue
                got[src] = values
                received.update(zip(lay.sends[(src, rank)], values))
            if note is None:
                try:
                    env = stage.forward(inputs, received)
                    if rank == lay.loss_rank:
                        loss = stage.loss(env, labels, prog.loss_fn, prog.trace_result.out_spec)
                        self._check_finite("the task loss", loss)
                except Exception as e:
                    error, note = e, f"rank {rank} (forward): {type(e).__name__}: {e}"
            sent = {dst: stage.values_for(env, dst) for dst in lay.downstream(rank)} if note is None else {}
            for dst in lay.downstream(rank):
                comm.send(dst, sent.get(dst), failure=note)
            t1 = time.perf_counter()
            comm.phase = "backward"
            grads_back = {}
            for dst in reversed(lay.downstream(rank)):
                values, remote = comm.recv(dst)
                if remote is not None:
                    note = note or remote
                grads_back[dst] = values
            back: list = []
            if note is None:
                try:
                    recv_leaves = [t for src in lay.upstream(rank) for t in self._stage.grad_leaves(got[src])]
                    tap_g, param_g, back = stage.backward(
                        env, loss, [(sent[d], grads_back[d]) for d in lay.downstream(rank)], recv_leaves, params)
                except Exception as e:
                    error, note = e, f"rank {rank} (backward): {type(e).__name__}: {e}"
            per_src, i = {}, 0
            for src in lay.upstream(rank) if note is None else ():
                n = len(self._stage.grad_leaves(got[src]))
                per_src[src], i = back[i:i + n], i + n
            for src in reversed(lay.upstream(rank)):
                comm.send(src, per_src.get(src), failure=note)
            t2 = time.perf_counter()
            comm.phase = "inner loops"
            outs: dict[str, tuple] = {}
            if note is None:
                try:
                    offsets: dict = {}
                    xs, targets = stage.targets(env, tap_g, prog.config.target, prog.config.gamma, offsets)
                    for name, t in targets.items():
                        self._check_finite(f"the target of block {name!r}", t)
                    outs = run_jobs(prog.inner_jobs(xs, targets, names=self.mine, offsets=offsets))
                    for b in prog.blocks:
                        for p, new in zip(b.params, outs.get(b.name, ())):
                            self._check_finite(f"the new value of {p!r} (block {b.name!r})", new)
                except Exception as e:
                    error = e
            del env
            t3 = time.perf_counter()
            comm.phase = "agreement"
            value = comm.agree(error, checksum, float(loss.detach()) if loss is not None else None)
            t4 = time.perf_counter()
        except BaseException:
            with torch.no_grad():  # leave the model exactly as it was
                for n, b in gm.named_buffers():
                    b.copy_(saved[n])
            raise
        self._commit(outs, dict(zip(lay.params.get(rank, ()), param_g)))
        t5 = time.perf_counter()
        self.last_timings = {"forward": t1 - t0, "backward": t2 - t1, "inner": t3 - t2, "agree": t4 - t3,
                             "update": t5 - t4, "total": t5 - t0}
        prog.last_timings = dict(self.last_timings)
        prog.step_count += 1
        return value

    def _commit(self, outs: Mapping[str, tuple], grads: Mapping[str, torch.Tensor]) -> None:
        """Write this rank's new block weights and inner state, and step its non-block parameters (the outer
        optimizer skips parameters without a gradient, so only this rank's own move)."""
        self.prog.commit(outs, grads)

    # -------------------------------------------------------------------------------------------------- helpers
    def _refresh_layout(self):
        """(Re)build the stage layout when the program's tapped graph changed (e.g. after model.eval())."""
        self.prog.check_guards()
        tapped = self.prog.tapped
        if tapped is not self._tapped:
            ranks = {b: r for r, bs in self.blocks_of.items() for b in bs}
            self._stage = self.prog.stage(ranks, self.rank)
            self._layout = self._stage.layout
            self._tapped = tapped
        return self._layout

    def _rank_of_block(self, name: str) -> int:
        return next(r for r, bs in self.blocks_of.items() if name in bs)

    def _check_finite(self, what: str, t: torch.Tensor) -> None:
        if self.prog.config.check_finite and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"rank {self.rank}: {what} has {bad} NaN/inf value(s); the model was left unchanged. "
                                 "Lower Config.gamma or the learning rates, or check the inputs and the loss.")

    def _broadcast_model(self, src_of, with_inner: bool = True) -> None:
        """Every parameter and buffer (and inner state) from the rank ``src_of(kind, name)`` to all ranks."""
        gm = self.prog.trace_result.graph_module
        by_src: dict[int, list[torch.Tensor]] = {r: [] for r in range(self.world)}
        for name, p in gm.named_parameters():
            by_src[src_of("param", name)].append(p.data)
        for name, b in gm.named_buffers():
            by_src[src_of("buffer", name)].append(b)
        if with_inner:
            for name, state in self.prog.inner_state.items():
                by_src[src_of("inner", name)].extend(state)
        for src, tensors in by_src.items():
            self.comm.broadcast(tensors, src)


class _ReplicatedRunner:
    """Passed to ``Program.step`` as its assignment: runs this rank's blocks, agrees, broadcasts the results."""

    def __init__(self, trainer: DistributedTrainer, checksum: float) -> None:
        self.t = trainer
        self.checksum = checksum
        self.agreed = False
        self.timings: dict[str, float] = {}

    def run_jobs(self, jobs: Mapping[str, Job]) -> dict[str, tuple]:
        t, comm, prog = self.t, self.t.comm, self.t.prog
        t0 = time.perf_counter()
        comm.phase = "inner loops"
        error, mine = None, {}
        try:
            mine = run_jobs({n: jobs[n] for n in t.mine})
        except Exception as e:
            error = e
        t1 = time.perf_counter()
        comm.phase = "agreement"
        self.agreed = True
        comm.agree(error, self.checksum)
        t2 = time.perf_counter()
        comm.phase = "weight broadcast"
        gm = prog.trace_result.graph_module
        state = prog.inner_state
        results: dict[str, tuple] = {}
        for r in range(t.world):
            flat: list[torch.Tensor] = []
            for name in t.blocks_of[r]:
                if r == t.rank:
                    results[name] = tuple(mine[name])
                else:
                    block = next(b for b in prog.blocks if b.name == name)
                    like = [gm.get_parameter(p) for p in block.params] + list(state[name])
                    results[name] = tuple(torch.empty_like(v, memory_format=torch.contiguous_format) for v in like)
                flat.extend(results[name])
            comm.broadcast(flat, r)
        t3 = time.perf_counter()
        self.timings = {"inner_own": t1 - t0, "agree": t2 - t1, "broadcast": t3 - t2}
        return results


def _model_device(prog: Any) -> torch.device:
    p = next(iter(prog.trace_result.graph_module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _checksum(*batches: Any) -> float:
    """A cheap fingerprint of the batch, to catch ranks that were given different data."""
    total = 0.0
    for v in batches:
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor):
                s = float(t.detach().double().nan_to_num(0.0, 1e30, -1e30).sum()) if t.numel() else 0.0
                total += s + t.numel()
    return total if math.isfinite(total) else 0.0


def _fingerprint(blocks: list[str], plan: Plan) -> float:
    text = repr((plan.mode, blocks, [list(plan.assignment[d]) for d in plan.devices]))
    return float(zlib.crc32(text.encode()))
