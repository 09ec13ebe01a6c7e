"""Data-parallel runtime (runtime/data_parallel.py) and the wire's safety (runtime/comm.py, init_from_env).

Oracle: one process stepping on the whole batch (float64), and torch.optim.SGD for the SGD identity. Two gloo
processes on 127.0.0.1, each given its shard of an uneven batch (8 + 7 rows), must end at the same parameters
to 1e-10 relative, for rmsprop_tf1, adam and the exact solve, with a non-block parameter (LayerNorm) stepped by
the outer optimizer. The harness is tests/test_distributed.py's (forkserver, free port, results by queue).
"""
from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lwcompile
import test_distributed as td
from lwcompile.errors import ConfigError

BATCH, STEPS = 15, 3
CONFIGS = {
    "rmsprop_tf1": dict(target="md_post", local_loss="matching", steps=3, inner_optimizer="rmsprop_tf1",
                        inner_lr=1e-2, gamma=2.0, outer_optimizer="adam", outer_lr=1e-2),
    "adam": dict(target="md_post", local_loss="matching", steps=3, inner_optimizer="adam", inner_lr=1e-2, gamma=2.0,
                 outer_optimizer="adam", outer_lr=1e-2, prox=0.5),
    "exact": dict(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0, gamma=2.0,
                  outer_optimizer="sgd", outer_lr=1e-2),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3)).double()


def _data(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 5, generator=g, dtype=torch.float64),
             torch.randn(BATCH, 3, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def _program(cfg: dict):
    model = _model()
    return lwcompile.transform(model, nn.functional.mse_loss, (torch.zeros(BATCH, 5, dtype=torch.float64),),
                               lwcompile.Config(**cfg))


def _one_process(cfg: dict) -> tuple[list[float], dict]:
    prog = _program(cfg)
    losses = [prog.step(x, y) for x, y in _data()]
    return losses, prog.model.state_dict()


# ------------------------------------------------------------------------------------------ process harness
def _rank_main(rank: int, world: int, port: int, job: str, kwargs: dict, results) -> None:
    td._rank_main.__globals__.setdefault(job, globals()[job])  # td's harness looks jobs up in its own module
    td._rank_main(rank, world, port, job, kwargs, results)


def _launch(job: str, wait_for: tuple[int, ...] | None = None, **kwargs):
    """tests/test_distributed.py's _launch for a job of this module (two ranks)."""
    original = td._rank_main
    td._rank_main = _rank_main  # _launch starts processes on td._rank_main; point it here for this call
    try:
        return td._launch(job, wait_for=wait_for, **kwargs)
    finally:
        td._rank_main = original


# ------------------------------------------------------------------------------------------------ rank jobs
def _dp_train(rank: int, configs: dict) -> dict:
    from lwcompile.runtime.data_parallel import DataParallelTrainer, shard

    out = {}
    for name, cfg in configs.items():
        prog = _program(cfg)
        trainer = DataParallelTrainer(prog, timeout=30)
        losses = [trainer.step(*shard((x, y), rank, 2)) for x, y in _data()]
        inner = {k: [s.clone() for s in v] for k, v in prog.inner_state.items()}
        out[name] = {"losses": losses, "state": trainer.state_dict(), "inner": inner, "outer": prog.outer_state()}
    return out


def _dp_fault(rank: int, how: str) -> None:
    from lwcompile.runtime.data_parallel import DataParallelTrainer, shard

    prog = _program(CONFIGS["adam"])
    trainer = DataParallelTrainer(prog, timeout=5)
    data = _data()
    trainer.step(*shard(data[0], rank, 2))
    before = {k: v.clone() for k, v in prog.model.state_dict().items()}
    x, y = shard(data[1], rank, 2)
    if rank == 1:
        if how == "dies":
            os._exit(3)
        x = x[:, :-1]  # this rank's forward cannot multiply it
    t0 = time.perf_counter()
    try:
        trainer.step(x, y)
    except Exception as e:
        e.add_note(f"raised after {time.perf_counter() - t0:.1f} s")
        for k, v in prog.model.state_dict().items():
            assert torch.equal(v, before[k]), k  # the failed step changed nothing
        raise


def _wire_safety(rank: int, marker: str) -> dict:
    """Rank 0 sends rank 1 a header holding a pickle that would create ``marker``; rank 1 must refuse it."""
    from lwcompile.runtime.comm import HEADER_BYTES, Comm
    from lwcompile.runtime.distributed import init_from_env

    init_from_env(backend="gloo", timeout=20)
    comm = Comm(None, torch.device("cpu"), timeout=20)
    listening = []
    if rank == 0:
        port = int(os.environ["MASTER_PORT"])
        for f in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(f).readlines()[1:]:
                p = line.split()
                if int(p[1].split(":")[1], 16) == port and p[3] == "0A":  # LISTEN
                    listening.append(p[1].split(":")[0])
        blob = pickle.dumps(_Touch(marker))
        data = len(blob).to_bytes(8, "little") + blob
        head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        head[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.send(head, 1)
        comm.send(1, [torch.arange(3.0), {"k": 2.5, "s": "x"}])  # and a normal message still works
        return {"listening": listening}
    try:
        comm.recv(0)
        refused = None
    except Exception as e:  # noqa: BLE001
        refused = f"{type(e).__name__}: {e}"
    values, failure = comm.recv(0)
    return {"refused": refused, "values": values, "failure": failure}


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------------- tests
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((torch.as_tensor(a) - b).abs().max() / b.abs().max().clamp_min(1e-300))


@td.needs_gloo
def test_two_ranks_on_shards_equal_one_process_on_the_whole_batch():
    got = _launch("_dp_train", configs=CONFIGS)
    for name, cfg in CONFIGS.items():
        ref_losses, ref = _one_process(cfg)
        start = _model().double().state_dict()
        for r in (0, 1):
            out = td._unwrap(got[r][1])[name]
            assert out["losses"] == pytest.approx(ref_losses, rel=1e-10), name
            for k, v in ref.items():
                assert _rel(out["state"][k], v) <= 1e-10, (name, r, k, _rel(out["state"][k], v))
            assert any(not torch.equal(ref[k], start[k]) for k in ref)
        r0, r1 = (td._unwrap(got[r][1])[name] for r in (0, 1))
        for k in r0["inner"]:  # both ranks hold the same inner (and outer) optimizer state
            assert all((a == b).all() for a, b in zip(r0["inner"][k], r1["inner"][k])), (name, k)
        assert repr(r0["outer"]) == repr(r1["outer"])


@td.needs_gloo
def test_sgd_identity_holds_in_data_parallel_mode():
    eta, gamma = 0.05, 2.0
    cfg = dict(target="md_post", local_loss="matching", steps=1, inner_optimizer="gd", inner_lr=eta, gamma=gamma,
               outer_optimizer="sgd", outer_lr=eta * gamma)
    got = _launch("_dp_train", configs={"sgd": cfg})
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=eta * gamma)
    for x, y in _data():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for r in (0, 1):
        state = td._unwrap(got[r][1])["sgd"]["state"]
        for k, v in model.state_dict().items():
            assert _rel(state[k], v) <= 1e-10, (r, k)


@td.needs_gloo
@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_rank_that_fails_makes_the_other_raise_a_distributed_error(how):
    got = _launch("_dp_fault", wait_for=(0,), how=how)
    seconds, out = got[0]
    assert out[0] == "err" and out[1] == "DistributedError", out
    if how == "raises":
        assert "rank 1 failed" in out[2] and "multiplied" in out[2]
    assert seconds < 25


@td.needs_gloo
def test_peers_messages_are_never_unpickled_and_the_store_listens_on_loopback(tmp_path):
    marker = str(tmp_path / "pwned")
    got = _launch("_wire_safety", marker=marker)
    r0, r1 = td._unwrap(got[0][1]), td._unwrap(got[1][1])
    assert not os.path.exists(marker)  # the old pickle.loads(header) created it
    assert r1["refused"] and "malformed" in r1["refused"]
    assert r1["failure"] is None and r1["values"][1] == {"k": 2.5, "s": "x"}
    assert r0["listening"] and all(a in ("0100007F", "0000000000000000FFFF00000100007F") for a in r0["listening"])


def test_sync_batchnorm_and_tied_weights_are_refused():
    from lwcompile.runtime.data_parallel import DataParallelTrainer

    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    prog = lwcompile.transform(m, nn.functional.mse_loss, (torch.randn(6, 4),))
    m[1] = nn.SyncBatchNorm(4)
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        DataParallelTrainer(prog)


def test_allreduce_bytes_counts_gram_sums_for_exact_and_weights_per_iteration_otherwise():
    from lwcompile.runtime.data_parallel import allreduce_bytes

    it, ex = _program(CONFIGS["adam"]), _program(CONFIGS["exact"])
    weights = [(8 * 5 + 8), (8 * 8 + 8), (3 * 8 + 3)]
    assert allreduce_bytes(it)["blocks"] == 3 * sum(weights) * 8
    assert allreduce_bytes(ex)["blocks"] == sum(d * d + d * o + d + o + 1 for d, o in [(5, 8), (8, 8), (8, 3)]) * 8
    assert allreduce_bytes(it)["nonblock"] == 16 * 8  # the LayerNorm's weight and bias
