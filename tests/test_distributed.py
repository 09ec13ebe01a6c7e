"""Specification of the runtimes: a plan changes where inner loops run, never the result.

Local runtime: ``prog.step(x, y, assignment=plan.assignment)`` equals ``prog.step(x, y)``.
Distributed runtime: two gloo processes on 127.0.0.1 (forked from a forkserver that has torch imported, so each
test pays no import) train to the same parameters as one process, in both modes; a rank that raises makes the
other raise a clear error at once; a rank that hangs makes the other raise after the timeout.
"""
from __future__ import annotations

import functools
import os
import queue
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_map

import lwcompile
import zoo
from lwcompile.errors import ConfigError
from lwcompile.runtime.local import run_jobs
from lwcompile.passes.stages import build_layout, stage_graph

STEPS = 3


def _program(name: str, seed: int = 0):
    """The model, its program and STEPS batches; the same on every rank for the same seed."""
    torch.manual_seed(seed)
    make = {"mlp": zoo.mlp, "resnet": zoo.resnet}[name]
    model, example, y, loss_fn = make()
    cfg = lwcompile.Config(target="md_post", local_loss="matching", steps=3, inner_optimizer="adam", inner_lr=1e-2,
                           outer_optimizer="adam", outer_lr=1e-2)
    prog = lwcompile.transform(model, loss_fn, example, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(example[0].shape, generator=g), y) for _ in range(STEPS)]
    return prog, data


@functools.cache
def _reference(name: str) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, one thread, no plan: the losses, the trained state and the initial state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prog, data = _program(name)
        start = {k: v.clone() for k, v in prog.model.state_dict().items()}
        losses = [prog.step(x, y) for x, y in data]
    finally:
        torch.set_num_threads(threads)
    return losses, prog.model.state_dict(), start


def _assert_matches_reference(name: str, losses, state, what: str) -> None:
    ref_losses, ref, start = _reference(name)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for k, v in ref.items():  # parameters and buffers (BatchNorm statistics) alike
        torch.testing.assert_close(torch.as_tensor(state[k]), v, rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")
    assert any(not torch.equal(ref[k], start[k]) for k in ref)  # and training moved the model


# ------------------------------------------------------------------------------------------------- local runtime
@pytest.mark.parametrize("name,mode", [("mlp", "partitioned"), ("resnet", "replicated")])
def test_step_with_a_plans_assignment_equals_step_without(name, mode):
    prog, data = _program(name)
    plan = prog.plan(devices=2, mode=mode)
    assert all(plan.assignment.values())  # both simulated devices (threads) get blocks
    losses = [prog.step(x, y, assignment=plan.assignment) for x, y in data]
    _assert_matches_reference(name, losses, prog.model.state_dict(), f"local {mode}")


def test_run_jobs_rejects_an_assignment_that_misses_or_repeats_a_block():
    jobs = {"a": (lambda x: (x,), (torch.zeros(1),)), "b": (lambda x: (x,), (torch.zeros(1),))}
    with pytest.raises(ConfigError, match="unassigned"):
        run_jobs(jobs, {"sim:0": ["a"]})
    with pytest.raises(ConfigError, match="both"):
        run_jobs(jobs, {"sim:0": ["a", "b"], "sim:1": ["b"]})
    with pytest.raises(ConfigError, match="not a block"):
        run_jobs(jobs, {"sim:0": ["a", "b", "c"]})


def test_a_failing_job_names_its_block_and_stops_the_step():
    def bad(x):
        raise ValueError("boom")

    jobs = {"a": (lambda x: (x,), (torch.zeros(1),)), "b": (bad, (torch.zeros(1),))}
    with pytest.raises(ValueError, match="boom") as info:
        run_jobs(jobs, {"sim:0": ["a"], "sim:1": ["b"]})
    assert "block 'b'" in "".join(info.value.__notes__)


def test_partitioned_layout_sends_only_what_the_next_stage_reads():
    prog, _ = _program("resnet")
    plan = prog.plan(devices=2, mode="partitioned")
    ranks = {b: r for r, d in enumerate(plan.devices) for b in plan.assignment[d]}
    lay = build_layout(prog.tapped, prog.blocks, prog.nonblock, ranks)
    assert set(lay.sends) == {(0, 1)}  # forward only, one hop
    assert lay.loss_rank == 1
    owned = [p for ps in lay.params.values() for p in ps]
    assert sorted(owned) == sorted(prog.nonblock)  # every non-block parameter has exactly one owner


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_the_emitted_stage_graphs_chained_compute_the_tapped_graph(name):
    """Each rank's emitted graph, fed its inputs and what earlier ranks sent, reproduces the tapped graph's model
    output and taps exactly (the oracle is the one-process tapped graph; eval mode so BatchNorm buffers stay)."""
    prog, data = _program(name)
    prog.model.eval()
    prog.check_guards()
    names = [b.name for b in prog.blocks]
    ranks = {n: min(i * 3 // len(names), 2) for i, n in enumerate(names)}  # three contiguous stages
    lay = build_layout(prog.tapped, prog.blocks, prog.nonblock, ranks)
    x = data[0][0]
    out_node = next(n for n in prog.tapped.graph.nodes if n.op == "output")
    wanted = [n.name for n in out_node.args[0][1:]]
    env: dict = {}
    for r in sorted(lay.nodes):
        ins = [x for _ in lay.placeholders.get(r, ())]
        received = [env[n] for src in lay.upstream(r) for n in lay.sends[(src, r)]]
        env.update(stage_graph(prog.tapped, lay, r, keep=[w for w in wanted if lay.stage_of.get(w) == r])(
            *ins, *received))
    with torch.no_grad():
        ref = prog.tapped(x)
    for name_, value in zip(wanted, ref[1:]):
        assert torch.equal(env.get(name_, x), value), name_
    assert len(lay.nodes) == 3 and all(lay.nodes.values())


def test_a_layout_against_the_data_flow_is_refused():
    prog, _ = _program("mlp")
    names = [b.name for b in prog.blocks]
    backwards = {n: 1 if i == 0 else 0 for i, n in enumerate(names)}  # first block on the later rank
    with pytest.raises(ConfigError, match="data flow"):
        build_layout(prog.tapped, prog.blocks, prog.nonblock, backwards)


# ------------------------------------------------------------------------------------------ process harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job: str, kwargs: dict, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    t0 = time.perf_counter()
    try:
        result = globals()[job](rank, **kwargs)
        out = ("ok", tree_map(lambda v: v.numpy() if isinstance(v, torch.Tensor) else v, result))  # sent by value
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out = ("err", type(e).__name__, str(e), traceback.format_exc())
    results.put((rank, time.perf_counter() - t0, out))
    results.close()
    results.join_thread()
    os._exit(0)  # no teardown: a peer may be hung on purpose


def _launch(job: str, world: int = 2, wait_for: tuple[int, ...] | None = None, limit: float = 60.0, **kwargs):
    """Run ``job(rank, **kwargs)`` in ``world`` processes; returns {rank: (seconds, result)} for ``wait_for`` ranks
    (default all), then kills whatever is left."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lwcompile", "lwcompile.runtime.distributed"])
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, kwargs, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    want = set(range(world) if wait_for is None else wait_for)
    got: dict[int, tuple] = {}
    deadline = time.monotonic() + limit
    try:
        while not want <= set(got):
            try:
                rank, seconds, out = results.get(timeout=0.5)
                got[rank] = (seconds, out)
            except queue.Empty:
                dead = [r for r in want - set(got) if procs[r].exitcode is not None]
                if dead or time.monotonic() > deadline:
                    why = f"exited with {[procs[r].exitcode for r in dead]}" if dead else f"no report in {limit} s"
                    pytest.fail(f"ranks {sorted(want - set(got))} did not report: {why}")
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
    return got


def _unwrap(out):
    if out[0] == "err":
        pytest.fail(f"a rank raised {out[1]}: {out[2]}\n{out[3]}")
    return out[1]


# ------------------------------------------------------------------------------------------------ rank jobs
def _train(rank: int, name: str, mode: str) -> dict:
    from lwcompile.runtime.distributed import DistributedTrainer

    prog, data = _program(name)
    trainer = DistributedTrainer(prog, prog.plan(devices=2, mode=mode), timeout=30)
    losses = [trainer.step(x, y) for x, y in data]
    return {"losses": losses, "state": trainer.state_dict(), "owned": trainer.owned_blocks}


def _fail_at_step_2(rank: int, mode: str, failing: int) -> list:
    from lwcompile.runtime.distributed import DistributedTrainer

    prog, data = _program("mlp")
    trainer = DistributedTrainer(prog, prog.plan(devices=2, mode=mode), timeout=60)
    losses = [trainer.step(*data[0])]
    before = {k: v.clone() for k, v in prog.model.state_dict().items()}
    x, y = data[1]
    if rank == failing:
        def boom(*args):
            raise ValueError("boom on purpose")

        if mode == "replicated":
            prog.compute_targets = boom  # the forward/target graph raises on this rank only
        else:
            x = x[:, :-1]  # a batch the first stage (this rank's) cannot multiply: its forward raises
    try:
        trainer.step(x, y)
    finally:
        if rank != failing:  # the failed step left this rank's model as it was
            for k, v in prog.model.state_dict().items():
                assert torch.equal(v, before[k]), k
    return losses


def _hang_at_step_2(rank: int, timeout: float) -> None:
    from lwcompile.runtime.distributed import DistributedTrainer

    prog, data = _program("mlp")
    trainer = DistributedTrainer(prog, prog.plan(devices=2, mode="replicated"), timeout=timeout)
    trainer.step(*data[0])
    if rank == 1:
        time.sleep(120)  # hung: never joins step 2
    t0 = time.perf_counter()
    try:
        trainer.step(*data[1])
    except Exception as e:
        e.add_note(f"raised after {time.perf_counter() - t0:.1f} s")
        raise


# ----------------------------------------------------------------------------------------------------- tests
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and "forkserver" in mp.get_all_start_methods()),
    reason="needs torch.distributed with gloo and the forkserver start method")


@needs_gloo
@pytest.mark.parametrize("mode", ["replicated", "partitioned"])
@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_two_gloo_processes_train_to_the_one_process_parameters(name, mode):
    got = _launch("_train", name=name, mode=mode)
    outs = [_unwrap(got[r][1]) for r in (0, 1)]
    assert all(o["owned"] for o in outs)  # both ranks ran inner loops
    for r, out in enumerate(outs):
        _assert_matches_reference(name, out["losses"], out["state"], f"{mode}, rank {r}")


@needs_gloo
@pytest.mark.parametrize("mode,failing", [("replicated", 1), ("partitioned", 0)])
def test_a_rank_that_raises_makes_the_other_fail_fast_with_a_clear_error(mode, failing):
    t0 = time.monotonic()
    got = _launch("_fail_at_step_2", mode=mode, failing=failing)
    other = 1 - failing
    seconds, out = got[other]
    assert out[0] == "err" and out[1] == "DistributedError", out
    why = "boom on purpose" if mode == "replicated" else "cannot be multiplied"
    assert f"rank {failing} failed" in out[2] and why in out[2]
    assert got[failing][1][1] == ("ValueError" if mode == "replicated" else "RuntimeError")  # its own error
    assert seconds < 30 and time.monotonic() - t0 < 45  # far below the 60 s timeout


@needs_gloo
def test_a_rank_that_hangs_makes_the_other_raise_after_the_timeout():
    got = _launch("_hang_at_step_2", wait_for=(0,), timeout=3.0)
    seconds, out = got[0]
    assert out[0] == "err" and out[1] == "DistributedError", out
    assert "within 3 s" in out[2] and "hung" in out[2]
    assert "raised after" in out[3]


@pytest.mark.parametrize("module", ["lwcompile.runtime.local", "lwcompile.passes.stages"])
def test_module_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
