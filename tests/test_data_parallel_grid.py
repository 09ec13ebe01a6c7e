"""Data parallel beyond two ranks and an MLP: 3 uneven shards, a residual CNN, BatchNorm, tied weights, the hybrid
grid (data parallel × a replicated plan, 4 ranks), checkpoints resumed with another rank count, atomic steps.

Oracle: one process stepping on the whole batch (float64), which the ranks must match to 1e-10 relative; for
train-mode BatchNorm (per-shard statistics, documented) eager PyTorch on rank 0's shard. The process harness is
tests/test_distributed.py's (forkserver, free port, results by queue).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
import test_distributed as td
from lwcompile.errors import ConfigError

CONFIGS = {
    "rmsprop_tf1": dict(target="md_post", local_loss="matching", steps=2, inner_optimizer="rmsprop_tf1",
                        inner_lr=1e-2, gamma=2.0, outer_optimizer="adam", outer_lr=1e-2),
    "adam": dict(target="md_post", local_loss="matching", steps=2, inner_optimizer="adam", inner_lr=1e-2, gamma=2.0,
                 outer_optimizer="adam", outer_lr=1e-2, prox=0.5),
    "exact": dict(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0, gamma=2.0,
                  outer_optimizer="sgd", outer_lr=1e-2),
    "exact_rel": dict(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=0.1,
                      prox_relative=True, gamma=2.0, outer_optimizer="adam", outer_lr=1e-2),
}
BATCH = 8


class ResCNN(nn.Module):
    """stem conv → residual block (conv, tanh, conv, norm, + skip) → pooled linear head. ``norm``: "group"
    (per-example, no buffers) or "batch" (BatchNorm2d)."""

    def __init__(self, norm: str = "group") -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 4) if norm == "group" else nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.norm(self.conv2(torch.tanh(self.conv1(h)))) + h)
        return self.head(h.mean((2, 3)))


class Tied(nn.Module):
    """A token model whose output head is the embedding (head.weight is emb.weight): a block weight used elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.tanh(self.mid(self.emb(t))))


def _setup(model: str, cfg: str, steps: int = 2, seed: int = 0):
    """(program, batches): the same on every rank for the same arguments."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if model == "mlp":
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()
        data = [(torch.randn(BATCH, 5, generator=g, dtype=torch.float64),
                 torch.randn(BATCH, 3, generator=g, dtype=torch.float64)) for _ in range(steps)]
        loss = F.mse_loss
    elif model == "tied":
        m = Tied().double()
        data = [(torch.randint(0, 5, (BATCH,), generator=g), torch.randint(0, 5, (BATCH,), generator=g))
                for _ in range(steps)]
        loss = F.cross_entropy
    else:
        m = ResCNN("batch" if model.startswith("cnn_bn") else "group").double()
        if model == "cnn_bn_eval":
            m.eval()
        data = [(torch.randn(BATCH, 2, 4, 4, generator=g, dtype=torch.float64),
                 torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(steps)]
        loss = F.cross_entropy
    prog = lwcompile.transform(m, loss, (data[0][0],), lwcompile.Config(**CONFIGS[cfg]))
    return prog, data


def _snapshot(prog) -> dict:
    return {"model": {k: v.clone() for k, v in prog.model.state_dict().items()},
            "inner": {k: [s.clone() for s in v] for k, v in prog.inner_state.items()},
            "outer": {k: {s: (v.clone() if isinstance(v, torch.Tensor) else v) for s, v in slots.items()}
                      for k, slots in prog.outer_state().items()},
            "step_count": prog.step_count}


def _one_process(model: str, cfg: str, steps: int = 2, skip: tuple[int, ...] = ()) -> tuple[list, dict]:
    prog, data = _setup(model, cfg, steps)
    losses = [prog.step(x, y) for k, (x, y) in enumerate(data) if k not in skip]
    return losses, _snapshot(prog)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _assert_state_close(got: dict, ref: dict, what: str, tol: float = 1e-10) -> None:
    for part in ("model", "inner", "outer"):
        for k, v in ref[part].items():
            if part == "inner":
                for a, b in zip(got[part][k], v):
                    assert _rel(a, b) <= tol, (what, part, k)
            elif part == "outer":
                for s, b in v.items():
                    assert _rel(got[part][k][s], b) <= tol, (what, part, k, s)
            else:
                assert _rel(got[part][k], v) <= tol, (what, part, k, _rel(got[part][k], v))


# ------------------------------------------------------------------------------------------ process harness
def _rank_main(rank: int, world: int, port: int, job: str, kwargs: dict, results) -> None:
    td._rank_main.__globals__.setdefault(job, globals()[job])  # td's harness looks jobs up in its own module
    td._rank_main(rank, world, port, job, kwargs, results)


def _launch(job: str, world: int, wait_for: tuple[int, ...] | None = None, **kwargs):
    original = td._rank_main
    td._rank_main = _rank_main  # _launch starts processes on td._rank_main; point it here for this call
    try:
        return td._launch(job, world=world, wait_for=wait_for, limit=90.0, **kwargs)
    finally:
        td._rank_main = original


def _outs(got, world):
    return [td._unwrap(got[r][1]) for r in range(world)]


# ------------------------------------------------------------------------------------------------ rank jobs
def _dp_train(rank: int, runs: list, layers: int = 1) -> dict:
    from lwcompile.runtime.data_parallel import DataParallelTrainer, allreduce_bytes

    out = {}
    for model, cfg in runs:
        prog, data = _setup(model, cfg)
        plan = prog.plan(devices=layers, mode="replicated", device_rate=1e9) if layers > 1 else None
        trainer = DataParallelTrainer(prog, timeout=30, plan=plan)
        losses = [trainer.step(*trainer.shard((x, y))) for x, y in data]
        out[f"{model}/{cfg}"] = {"losses": losses, **_snapshot(prog), "mine": list(trainer.mine),
                                 "bytes": trainer.last_bytes, "predicted": allreduce_bytes(prog, trainer.mine)}
    return out


def _dp_save(rank: int, path: str, model: str, cfg: str) -> None:
    from lwcompile.runtime.data_parallel import DataParallelTrainer

    prog, data = _setup(model, cfg, steps=4)
    trainer = DataParallelTrainer(prog, timeout=30)
    for x, y in data[:2]:
        trainer.step(*trainer.shard((x, y)))
    trainer.save(path)


def _dp_resume(rank: int, path: str, model: str, cfg: str) -> dict:
    from lwcompile.runtime.data_parallel import DataParallelTrainer

    prog, data = _setup(model, cfg, steps=4, seed=5)  # another initial model: everything must come from the file
    trainer = DataParallelTrainer(prog, timeout=30)
    trainer.load(path)
    losses = [trainer.step(*trainer.shard((x, y))) for x, y in _setup(model, cfg, steps=4)[1][2:]]
    return {"losses": losses, **_snapshot(prog)}


def _dp_commit_fault(rank: int, how: str) -> dict:
    """Rank 1 fails in its commit, after the step's all-reduces and after writing its own new weights."""
    from lwcompile.runtime.data_parallel import DataParallelTrainer

    prog, data = _setup("mlp", "adam", steps=3)
    trainer = DataParallelTrainer(prog, timeout=5)
    trainer.step(*trainer.shard(data[0]))
    before = _snapshot(prog)
    if rank == 1:
        commit = prog.commit

        def failing_commit(outs, grads, journal=None):
            commit(outs, grads, journal)  # this rank's model has moved: the step must still be undone
            if how == "dies":
                os._exit(3)
            raise ValueError("injected fault after the all-reduce")

        prog.commit = failing_commit
    error = None
    try:
        trainer.step(*trainer.shard(data[1]))
    except Exception as e:  # noqa: BLE001 - reported below
        error = (type(e).__name__, str(e))
    after = _snapshot(prog)
    if rank == 1:
        prog.commit = commit
    later = trainer.step(*trainer.shard(data[2])) if how == "raises" else None  # the job goes on
    return {"error": error, "before": before, "after": after, "later": later, "final": _snapshot(prog)}


def _hybrid_fault(rank: int) -> dict:
    """4 ranks, 2 shards × 2 block ranks; rank 1 (shard 0) fails in its forward at step 2."""
    from lwcompile.runtime.data_parallel import DataParallelTrainer

    prog, data = _setup("mlp", "adam", steps=2)
    trainer = DataParallelTrainer(prog, timeout=10, plan=prog.plan(devices=2, mode="replicated", device_rate=1e9))
    trainer.step(*trainer.shard(data[0]))
    before = _snapshot(prog)
    x, y = trainer.shard(data[1])
    if rank == 1:
        x = x[:, :-1]  # this rank's forward cannot multiply it
    error = None
    try:
        trainer.step(x, y)
    except Exception as e:  # noqa: BLE001 - reported below
        error = (type(e).__name__, str(e))
    return {"error": error, "before": before, "after": _snapshot(prog)}


def _dp_bn_train(rank: int) -> dict:
    from lwcompile.runtime.data_parallel import DataParallelTrainer

    prog, data = _setup("cnn_bn_train", "adam")
    trainer = DataParallelTrainer(prog, timeout=30)
    trainer.step(*trainer.shard(data[0]))
    return {"buffers": {k: v.clone() for k, v in prog.model.named_buffers()}}


# ----------------------------------------------------------------------------------------------------- tests
EQUALITY_RUNS = [("mlp", c) for c in ("rmsprop_tf1", "adam", "exact", "exact_rel")] + \
                [("cnn", c) for c in ("rmsprop_tf1", "adam", "exact")] + [("cnn_bn_eval", "exact")]


@td.needs_gloo
def test_three_uneven_shards_equal_one_process_on_an_mlp_and_a_residual_cnn():
    outs = _outs(_launch("_dp_train", 3, runs=EQUALITY_RUNS), 3)  # shards of 3, 3 and 2 rows
    for model, cfg in EQUALITY_RUNS:
        key = f"{model}/{cfg}"
        ref_losses, ref = _one_process(model, cfg)
        start = _setup(model, cfg)[0].model.state_dict()
        assert any(not torch.equal(ref["model"][k], v) for k, v in start.items()), key  # training moved it
        for r, out in enumerate(outs):
            assert out[key]["losses"] == pytest.approx(ref_losses, rel=1e-10), (key, r)
            _assert_state_close(out[key], ref, f"{key}, rank {r}")
            assert out[key]["bytes"]["nonblock"] + out[key]["bytes"]["blocks"] == out[key]["predicted"]["total"]


@td.needs_gloo
@pytest.mark.slow
def test_hybrid_grid_of_2_shards_by_2_block_ranks_equals_one_process():
    runs = [("mlp", "rmsprop_tf1"), ("cnn", "exact"), ("cnn", "adam")]
    outs = _outs(_launch("_dp_train", 4, runs=runs, layers=2), 4)
    for model, cfg in runs:
        key = f"{model}/{cfg}"
        ref_losses, ref = _one_process(model, cfg)
        mine = [o[key]["mine"] for o in outs]
        assert mine[0] and mine[1] and mine[0] == mine[2] and mine[1] == mine[3]  # columns split the blocks
        for r, out in enumerate(outs):
            assert out[key]["losses"] == pytest.approx(ref_losses, rel=1e-10), (key, r)
            _assert_state_close(out[key], ref, f"hybrid {key}, rank {r}")
            assert out[key]["bytes"]["blocks"] == out[key]["predicted"]["blocks"]  # only its own blocks' sums
            assert out[key]["predicted"]["blocks"] < _bytes_all(model, cfg)


def _bytes_all(model: str, cfg: str) -> int:
    from lwcompile.runtime.data_parallel import allreduce_bytes

    return allreduce_bytes(_setup(model, cfg)[0])["blocks"]


@td.needs_gloo
@pytest.mark.slow
def test_a_checkpoint_saved_by_2_ranks_resumes_on_3_ranks_exactly(tmp_path):
    path = str(tmp_path / "dp.pt")
    _outs(_launch("_dp_save", 2, path=path, model="cnn", cfg="adam"), 2)
    assert torch.load(path, weights_only=True)["program"]["step_count"] == 2
    outs = _outs(_launch("_dp_resume", 3, path=path, model="cnn", cfg="adam"), 3)
    ref_losses, ref = _one_process("cnn", "adam", steps=4)
    for r, out in enumerate(outs):
        assert out["losses"] == pytest.approx(ref_losses[2:], rel=1e-10), r
        _assert_state_close(out, ref, f"resumed, rank {r}")
        assert out["step_count"] == 4


@td.needs_gloo
@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_fault_in_another_ranks_commit_leaves_every_survivor_unchanged(how):
    got = _launch("_dp_commit_fault", 2, wait_for=(0,) if how == "dies" else None, how=how)
    ranks = (0,) if how == "dies" else (0, 1)
    for r in ranks:
        out = td._unwrap(got[r][1])
        assert out["error"] is not None, r
        assert out["error"][0] == ("ValueError" if r == 1 else "DistributedError"), out["error"]
        _assert_state_close(out["after"], out["before"], f"rank {r} after the failed step", tol=0.0)
        assert out["after"]["step_count"] == out["before"]["step_count"] == 1
    if how == "raises":  # and training goes on as if the failed step had never been tried
        assert "injected fault" in td._unwrap(got[0][1])["error"][1]
        ref_losses, ref = _one_process("mlp", "adam", steps=3, skip=(1,))
        for r in ranks:
            out = td._unwrap(got[r][1])
            assert out["later"] == pytest.approx(ref_losses[-1], rel=1e-10)
            _assert_state_close(out["final"], ref, f"rank {r} after the next step")


@td.needs_gloo
@pytest.mark.slow
def test_in_the_hybrid_grid_a_failing_rank_makes_every_rank_raise_and_changes_nothing():
    outs = _outs(_launch("_hybrid_fault", 4), 4)  # shard 1's ranks learn it at the broadcast
    for r, out in enumerate(outs):
        assert out["error"] is not None, r
        if r != 1:
            assert out["error"][0] == "DistributedError", (r, out["error"])
        _assert_state_close(out["after"], out["before"], f"rank {r} after the failed step", tol=0.0)


@td.needs_gloo
def test_train_mode_batchnorm_keeps_rank_0s_shard_statistics():
    outs = _outs(_launch("_dp_bn_train", 2), 2)
    prog, data = _setup("cnn_bn_train", "adam")
    x = data[0][0]
    shard0, whole = ResCNN("batch").double(), ResCNN("batch").double()
    shard0.load_state_dict(prog.model.state_dict())
    whole.load_state_dict(prog.model.state_dict())
    shard0(x[:BATCH // 2])  # eager train-mode forward at the initial weights: what step 1's forward saw
    whole(x)
    for r, out in enumerate(outs):
        for k, v in out["buffers"].items():
            want = shard0.state_dict()[k]
            assert _rel(v, want) <= 1e-12, (r, k)
            if k.endswith("running_mean"):
                assert _rel(v, whole.state_dict()[k]) > 1e-3  # not the full batch's statistics


def test_partitioned_plans_and_tied_weights_are_refused_before_joining():
    from lwcompile.runtime.data_parallel import DataParallelTrainer

    prog, _ = _setup("mlp", "adam")
    with pytest.raises(ConfigError, match="partitioned.*not supported"):
        DataParallelTrainer(prog, plan=prog.plan(devices=2, mode="partitioned", device_rate=1e9))
    tied, _ = _setup("tied", "adam")  # head.weight is emb.weight: the block 'head' and the embedding share it
    with pytest.raises(ConfigError, match="'head.weight' is tied to a use outside the block \\(as 'emb.weight'\\)"):
        DataParallelTrainer(tied)


@pytest.mark.parametrize("op,shape,attrs", [
    ("linear", (6, 5), {}),
    ("linear", (6, 9), {}),  # 7 rows < 10 unknowns: one process solves the rows×rows dual system
    ("conv1d", (4, 2, 3), dict(groups=2, stride=(2,), padding=(1,), dilation=(1,))),
    ("conv2d", (4, 2, 3, 3), dict(groups=1, stride=(1, 1), padding=(1, 1), dilation=(1, 1))),
    ("conv3d", (4, 2, 2, 2, 2), dict(groups=2, stride=(1, 1, 1), padding=(1, 0, 1), dilation=(1, 1, 1)))])
def test_exact_stats_split_over_shards_solves_as_the_one_process_exact_solve(op, shape, attrs):
    """The solve from passes/exact_stats.py's statistics summed over three shards equals make_exact_fn on the
    whole batch (prox_relative too)."""
    from lwcompile.config import Config
    from lwcompile.ir import Block
    from lwcompile.passes import exact_solver, exact_stats

    torch.manual_seed(0)
    W = torch.randn(shape, dtype=torch.float64)
    b = torch.randn(shape[0], dtype=torch.float64)
    size = (shape[1],) if op == "linear" else (shape[1] * attrs["groups"], *[5] * (len(shape) - 2))
    x = torch.randn(7, *size, dtype=torch.float64)
    if op == "linear":
        t = torch.randn(7, 6, dtype=torch.float64)
    else:
        conv = getattr(F, op)
        t = torch.randn_like(conv(x, W, b, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"]))
    blk = Block("m", "m", op, tuple(sorted(attrs.items())), "identity", (), "m.weight", "m.bias", tuple(shape),
                (shape[0],), tuple(x.shape), tuple(t.shape), 0)
    for relative in (False, True):
        cfg = Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=0.3,
                     prox_relative=relative)
        want = exact_solver.make_exact_fn(blk, cfg)(W, b, x, t, torch.tensor(0.0))
        parts = [exact_stats.gram_stats(blk, (W, b), x[i], t[i]) for i in (slice(0, 3), slice(3, 5), slice(5, 7))]
        summed = tuple(sum(p[k] for p in parts) for k in range(5))
        got = exact_stats.solve_stats(blk, (W, b), summed, cfg.prox, relative)
        for g, w in zip(got, want):
            assert _rel(g, w) <= 1e-12, (op, relative)
        assert _rel(got[0], W) > 1e-3  # the solve moved the weights
