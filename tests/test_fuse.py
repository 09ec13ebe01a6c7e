"""Specification of fusion (Config.fuse): identical blocks run as one batched inner graph, with every block's numbers.

Oracles: the same program with ``Config(fuse=False)`` (each block's own graph), to float64 rounding, over several
steps with optimizer state; and METHOD.md's float64 SGD identity (T=1 GD equals SGD at lr ηγ) with fusion on.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lwcompile
import lwcompile.program as program_mod
from lwcompile.config import PAIRS
from lwcompile.errors import ConfigError
from lwcompile.ir import Block
from lwcompile.passes import fuse as fuse_mod
from lwcompile.passes.fuse import FusedGroups, batched_graph, fuse_groups, unbatchable_ops
from lwcompile.passes.inner import build_inner_graph, inner_example
from lwcompile.runtime.fused import FusedCache, run_fused

STEPS = 4


def _tower(seed: int = 0) -> nn.Module:
    """Three identical tanh 8→8 blocks (one group) between blocks of other shapes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _convs(seed: int = 0) -> nn.Module:
    """Repeated conv stages: three identical 4→4 3×3 ReLU convs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()


def _data(model: str, n: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if model == "tower" else (n, 2, 5, 5)
    return [(torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64))
            for _ in range(STEPS)]


def _train(model: nn.Module, data, cfg: lwcompile.Config, assignment=None) -> lwcompile.Program:
    prog = lwcompile.transform(model, nn.functional.mse_loss, (data[0][0],), cfg)
    for x, y in data:
        prog.step(x, y, assignment=assignment)
    return prog


def _assert_same(a: lwcompile.Program, b: lwcompile.Program, tol: float = 1e-12) -> None:
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=n)
    for name, state in a.inner_state.items():
        for s, t in zip(state, b.inner_state[name], strict=True):
            torch.testing.assert_close(s, t, rtol=tol, atol=tol, msg=f"inner state of {name}")


class _Recorder:
    """Replaces Program.step's run_jobs to see which jobs ran (names of fused jobs start with 'fused[')."""

    def __init__(self, monkeypatch):
        self.names: list[list[str]] = []
        real = program_mod.run_jobs

        def run(jobs, assignment=None):
            self.names.append(list(jobs))
            return real(jobs, assignment)

        monkeypatch.setattr(program_mod, "run_jobs", run)


OPTIMIZERS = [dict(inner_optimizer="rmsprop_tf1", inner_lr=1e-2), dict(inner_optimizer="adam", inner_lr=1e-2),
              dict(inner_optimizer="momentum", inner_lr=1e-2, prox=0.5), dict(inner_optimizer="gd", inner_lr=5e-2)]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["inner_optimizer"])
@pytest.mark.parametrize("model", ["tower", "convs"])
def test_fused_groups_equal_unfused_blocks_over_steps_with_optimizer_state(model, opt, monkeypatch):
    make = _tower if model == "tower" else _convs
    data = _data(model)
    unfused = _train(make(), data, lwcompile.Config(fuse=False, steps=3, **opt))
    rec = _Recorder(monkeypatch)
    fused = _train(make(), data, lwcompile.Config(steps=3, **opt))
    assert fused.fusion.groups == ((("2", "4", "6") if model == "tower" else ("2", "4", "6")),)
    assert rec.names[-1][:3] == ["0", "fused[2, 4, 6]", "8" if model == "tower" else "9"]  # one job for the three
    _assert_same(fused, unfused)
    assert any(not torch.equal(p, q) for p, q in zip(fused.model.parameters(), make().parameters()))  # it trained


@pytest.mark.parametrize("target", list(PAIRS))
def test_float64_sgd_identity_holds_with_fusion_on(target, monkeypatch):
    eta, gamma = 0.05, 0.5
    model = _tower()
    x, y = _data("tower")[0]
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=eta * gamma)
    nn.functional.mse_loss(ref(x), y).backward()
    opt.step()
    rec = _Recorder(monkeypatch)
    cfg = lwcompile.Config(target=target, local_loss=PAIRS[target], gamma=gamma, steps=1, inner_optimizer="gd",
                           inner_lr=eta, outer_optimizer="sgd", outer_lr=eta * gamma, fuse=True)
    _train(model, [(x, y)], cfg)
    assert any(n.startswith("fused[") for n in rec.names[-1])
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12, msg=n)


def test_a_transformers_projections_fuse_and_train_as_unfused():
    from lwcompile.experiments.workloads import CharTransformerLM, lm_loss

    torch.manual_seed(0)
    model = CharTransformerLM(vocab=11, seq=6, d=8, layers=3, heads=2).double()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randint(0, 11, (3, 6), generator=g), torch.randint(0, 11, (3, 6), generator=g)) for _ in range(3)]
    progs = {}
    for fuse in (False, True):
        progs[fuse] = lwcompile.transform(copy.deepcopy(model), lm_loss, (data[0][0],),
                                          lwcompile.Config(fuse=fuse, inner_lr=1e-2))
        for x, y in data:
            progs[fuse].step(x, y)
    assert sorted(len(gr) for gr in progs[True].fusion.groups) == [3, 3, 3, 3]  # in_proj, out_proj, linear1, linear2
    _assert_same(progs[True], progs[False])


def test_an_assignment_splits_a_group_across_devices_and_gives_the_same_result(monkeypatch):
    data = _data("tower")
    cfg = dict(inner_optimizer="adam", inner_lr=1e-2)
    assignment = {"sim:0": ["0", "2", "4"], "sim:1": ["6", "8"]}  # group (2, 4, 6) split: 2 and 4 fuse on sim:0
    rec = _Recorder(monkeypatch)
    split = _train(_tower(), data, lwcompile.Config(**cfg), assignment=assignment)
    assert sorted(rec.names[-1]) == sorted(["0", "fused[2, 4]", "6", "8"])
    _assert_same(split, _train(_tower(), data, lwcompile.Config(fuse=False, **cfg)))
    with pytest.raises(ConfigError, match="'6'"):  # the user's assignment is checked against the user's blocks
        split.step(*data[0], assignment={"sim:0": ["0", "2", "4"], "sim:1": ["8"]})


def test_a_runner_and_the_distributed_runtimes_get_every_blocks_own_job():
    data = _data("tower")
    prog = lwcompile.transform(_tower(), nn.functional.mse_loss, (data[0][0],), lwcompile.Config(inner_lr=1e-2))
    seen = []

    class Runner:
        def run_jobs(self, jobs):
            seen.append(sorted(jobs))
            return lwcompile.runtime.local.run_jobs(jobs)

    prog.step(*data[0], runner=Runner())
    assert seen == [["0", "2", "4", "6", "8"]]
    # the partitioned distributed runtime calls run_jobs(prog.inner_jobs(...)) directly: per-block jobs too
    res = prog.compute_targets(*data[1])
    assert sorted(prog.inner_jobs(res["inputs"], res["targets"])) == ["0", "2", "4", "6", "8"]


def test_the_exact_solve_is_left_unfused_and_says_why():
    data = _data("tower", n=12)
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0)
    prog = _train(_tower(), data[:1], cfg)
    assert prog.fusion.groups == ()
    assert any("'2', '4', '6'" in n and "spd_solve" in n for n in prog.fusion.notes), prog.fusion.notes
    # and the reason is real: its graph calls a custom op that vmap has no batching rule for
    ops = unbatchable_ops(prog.inner_graph("2"))
    assert ops and all(op.startswith("lwcompile.") for op in ops)
    with pytest.raises(lwcompile.LwcompileError, match="batching rule"):
        batched_graph(prog.inner_graph("2"), [], [])


def test_a_graph_that_cannot_be_batched_runs_unfused_with_a_note(monkeypatch):
    data = _data("tower")
    cfg = lwcompile.Config(inner_optimizer="adam", inner_lr=1e-2)
    want = _train(_tower(), data, cfg.replace(fuse=False))

    def refuse(*a, **k):
        raise lwcompile.LwcompileError("no batching rule for this test")

    monkeypatch.setattr("lwcompile.runtime.fused.batched_graph", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _train(_tower(), data, cfg)
    assert [str(w.message) for w in caught if "Config.fuse" in str(w.message)] == [
        "Config.fuse: fused[2, 4, 6] runs unfused: batching its inner graph failed "
        "(LwcompileError: no batching rule for this test)"]
    assert any("runs unfused" in n for n in got.fusion.notes)
    for p, q in zip(got.model.parameters(), want.model.parameters()):
        assert torch.equal(p, q)  # the members ran their own graphs: bitwise the unfused numbers


def test_batched_graph_computes_each_members_graph():
    blk = Block("fc", "fc", "linear", (), "tanh", (), "fc.weight", "fc.bias", (2, 3), (2,), (4, 3), (4, 2), 12)
    cfg = lwcompile.Config(inner_optimizer="adam", steps=2, inner_lr=0.1)
    gm = build_inner_graph(blk, cfg)
    g = torch.Generator().manual_seed(0)
    lr = torch.tensor(0.1)
    # random weights, inputs, targets and (positive) optimizer state in the shapes of the graph's inputs
    args = [tuple(lr if i == 4 else torch.rand(e.shape, generator=g, dtype=e.dtype) + 0.5
                  for i, e in enumerate(inner_example(blk, cfg))) for _ in range(3)]
    jobs = {f"b{i}": (gm, a) for i, a in enumerate(args)}
    out = run_fused(jobs, FusedGroups((tuple(jobs),)), cache=FusedCache())
    for name, (fn, a) in jobs.items():
        for got, want in zip(out[name], fn(*a), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_config_fuse_is_validated_and_off_means_no_groups():
    with pytest.raises(ConfigError, match="Config.fuse"):
        lwcompile.Config(fuse="yes")
    blocks = lwcompile.transform(_tower(), nn.functional.mse_loss, (torch.zeros(2, 5, dtype=torch.float64),)).blocks
    assert fuse_groups(blocks, lwcompile.Config(fuse=False)).groups == ()
    assert fuse_groups(blocks, lwcompile.Config()).groups == (("2", "4", "6"),)
    with pytest.raises(lwcompile.LwcompileError, match="differ"):
        fuse_mod.ensures_fuse(blocks, lwcompile.Config(), FusedGroups((("0", "2"),)))


def test_onnx_export_of_a_fused_program_writes_every_blocks_own_inner_graph(tmp_path):
    pytest.importorskip("onnx")
    data = _data("tower")
    prog = _train(_tower(), data[:1], lwcompile.Config(steps=2, inner_optimizer="rmsprop"))
    assert prog.fusion.groups == (("2", "4", "6"),)
    man = prog.export_onnx(str(tmp_path / "out"), devices={b.name: "cpu" for b in prog.blocks})
    assert [f["kind"] for f in man["files"]] == ["target"] + ["inner"] * 5  # one unfused graph per block
    assert [t["block"] for t in man["training"]] == ["0", "2", "4", "6", "8"]


def test_a_plan_across_two_devices_runs_fused_and_equals_unfused():
    data = _data("tower")
    cfg = lwcompile.Config(inner_optimizer="rmsprop_tf1", inner_lr=1e-2)
    prog = lwcompile.transform(_tower(), nn.functional.mse_loss, (data[0][0],), cfg)
    assignment = prog.plan(devices=2).assignment
    assert sorted(n for names in assignment.values() for n in names) == ["0", "2", "4", "6", "8"]
    for x, y in data:
        prog.step(x, y, assignment=assignment)
    _assert_same(prog, _train(_tower(), data, cfg.replace(fuse=False)))


def test_state_handed_out_as_rows_of_one_tensor_is_stacked_without_a_copy():
    from lwcompile.runtime.fused import _stack

    base = torch.arange(12.0).reshape(3, 4)
    rows = list(base)
    same = _stack(rows)  # the rows of one stacked output, in order: a view of that tensor, no copy
    assert torch.equal(same, base) and same.data_ptr() == base.data_ptr()
    again = _stack([rows[1], rows[0], rows[2]])  # another order: a real stack
    assert again.data_ptr() != base.data_ptr() and torch.equal(again, base[[1, 0, 2]])
    assert torch.equal(_stack(rows[1:]), base[1:])  # consecutive rows from the second: a view too
    assert torch.equal(_stack([rows[0], rows[2]]), base[[0, 2]])  # a gap: a real stack


def test_compile_inner_compiles_the_fused_graph_and_keeps_the_numbers(monkeypatch):
    monkeypatch.setattr("lwcompile.runtime.compiled.BACKEND", "eager")  # torch.compile's path, no code generation
    data = _data("tower")
    cfg = lwcompile.Config(inner_optimizer="adam", inner_lr=1e-2, compile_inner=True)
    prog = _train(_tower(), data, cfg)
    assert any(g.block.startswith("fused[") for g, in [(v[1],) for v in prog._compiled_inner._fns.values()])
    assert not prog._compiled_inner.failed
    _assert_same(prog, _train(_tower(), data, cfg.replace(fuse=False, compile_inner=False)))


def test_blocks_too_large_to_gain_are_left_unfused_with_a_note():
    def blk(n, rows):
        return Block(n, n, "linear", (), "relu", (), n + ".weight", None, (512, 512), None, (rows, 512), (rows, 512),
                     2 * 512 * 512)
    assert fuse_mod.block_macs(blk("a", 8)) == 8 * 512 * 512 <= fuse_mod.FUSE_MAX_MACS
    assert fuse_groups((blk("a", 8), blk("b", 8)), lwcompile.Config()).groups == (("a", "b"),)
    big = fuse_groups((blk("a", 64), blk("b", 64)), lwcompile.Config())  # 16.8 M multiply-adds each
    assert big.groups == () and "FUSE_MAX_MACS" in big.notes[0] and "('a', 'b')" in big.notes[0]
