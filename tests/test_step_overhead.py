"""The cheap step: atomicity of the journal rollback at every stage, and identical blocks sharing one inner graph."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import lwcompile
import lwcompile.program as program_mod
from lwcompile import rollback


class Tied(nn.Module):
    """Blocks, a BatchNorm (buffers + non-block parameters) and a weight tied between a block and a non-block use."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(6, 4))
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 6)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(x + self.emb.sum(0))))
        return self.fc2(h) + (h[:, :4] @ self.emb.t())


def _everything(prog, m):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            {k: tuple(s.clone() for s in v) for k, v in prog.inner_state.items()},
            copy.deepcopy(prog._outer.state_dict()), prog.step_count)


def _assert_same(prog, m, before):
    sd, inner, outer, count = before
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for k, v in prog.inner_state.items():
        assert all(torch.equal(a, b) for a, b in zip(v, inner[k])), k
    now = prog._outer.state_dict()
    assert now["param_groups"] == outer["param_groups"]
    assert set(now["state"]) == set(outer["state"])
    for i, slots in outer["state"].items():
        for k, v in slots.items():
            assert torch.equal(now["state"][i][k], v), (i, k)
    assert prog.step_count == count


def _prog(m, x):
    cfg = lwcompile.Config(steps=2, inner_optimizer="adam", inner_lr=1e-3, outer_optimizer="adam", outer_lr=1e-3)
    return lwcompile.transform(m, F.mse_loss, (x,), cfg)


@pytest.mark.parametrize("stage", ["target", "inner", "commit-blocks", "outer", "outer-nonfinite"])
def test_a_failure_at_any_stage_leaves_everything_bitwise_as_before(stage, monkeypatch):
    torch.manual_seed(0)
    m = Tied()
    x, y = torch.randn(8, 4), torch.randn(8, 6)
    pristine = copy.deepcopy(m)
    prog = _prog(m, x)
    prog.step(x, y)  # non-trivial optimizer state
    if stage == "outer-nonfinite":  # the outer step itself produces inf
        prog._outer.optimizer.param_groups[0]["lr"] = float("inf")
    before = _everything(prog, m)
    kwargs, handle = {}, None
    if stage == "target":
        monkeypatch.setattr(program_mod.Program, "_check_inputs",
                            lambda self, inputs: (_ for _ in ()).throw(RuntimeError("boom at target")))
    elif stage == "inner":
        class Boom:
            def run_jobs(self, jobs):
                raise RuntimeError("boom in the inner phase")
        kwargs["runner"] = Boom()
    elif stage == "commit-blocks":  # the second block weight fails to be written: the first must come back
        real, calls = rollback.Journal.replace, []

        def flaky(self, p, v):
            calls.append(p)
            if len(calls) == 2:
                raise RuntimeError("boom while committing")
            real(self, p, v)
        monkeypatch.setattr(rollback.Journal, "replace", flaky)
    elif stage == "outer":
        def boom(opt, args, kw):
            raise RuntimeError("boom after the outer optimizer moved the parameters")
        handle = register_optimizer_step_post_hook(boom)
    try:
        with pytest.raises((RuntimeError, lwcompile.NonFiniteError)):
            prog.step(x, y, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    monkeypatch.undo()
    _assert_same(prog, m, before)
    if stage != "outer-nonfinite":  # and the next step equals one that never failed
        twin_m = copy.deepcopy(pristine)
        twin = _prog(twin_m, x)
        twin.step(x, y)
        twin.step(x, y)
        prog.step(x, y)
        for (k, v), w in zip(m.state_dict().items(), twin_m.state_dict().values()):
            assert torch.equal(v, w), k


def test_a_successful_step_keeps_the_parameter_objects():
    torch.manual_seed(0)
    m = Tied()
    x, y = torch.randn(8, 4), torch.randn(8, 6)
    prog = _prog(m, x)
    ids = [id(p) for p in m.parameters()]
    w = m.fc1.weight.detach().clone()
    prog.step(x, y)
    assert [id(p) for p in m.parameters()] == ids
    assert not torch.equal(m.fc1.weight, w)
    assert not prog.check_guards()  # nothing to re-trace: the parameters are the same objects


def _stack(n=5, d=8):
    torch.manual_seed(1)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)])


def test_identical_blocks_trace_one_inner_graph():
    m = _stack()
    x = torch.randn(16, 8)
    prog = lwcompile.transform(m, F.mse_loss, (x,), lwcompile.Config(steps=2, inner_optimizer="adam"))
    prog.step(x, torch.randn(16, 8))
    assert len(prog.blocks) == 5
    assert len(prog._inner_cache) == 1
    graphs = prog.inner_graphs
    assert set(graphs) == {b.name for b in prog.blocks}
    assert len({id(g) for g in graphs.values()}) == 1


def test_shared_inner_graphs_match_per_block_graphs_bitwise(monkeypatch):
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)), torch.randn(16, 8)
    cfg = lwcompile.Config(steps=3, inner_optimizer="adam", inner_lr=1e-2)
    shared_m, own_m = _stack(), _stack()
    shared = lwcompile.transform(shared_m, F.mse_loss, (x,), cfg)
    monkeypatch.setattr(program_mod, "inner_key", lambda block, config: (block.name,))  # the old per-name key
    own = lwcompile.transform(own_m, F.mse_loss, (x,), cfg)
    for _ in range(3):
        assert shared.step(x, y) == own.step(x, y)
    assert len(own._inner_cache) == 5 and len(shared._inner_cache) == 1
    for (k, v), w in zip(shared_m.state_dict().items(), own_m.state_dict().values()):
        assert torch.equal(v, w), k
