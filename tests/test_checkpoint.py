"""Checkpoint and resume: ``model.state_dict()`` + ``prog.state_dict()`` saved with torch.save and read back with
``torch.load(weights_only=True)`` into a fresh model and a freshly transformed program continue bit-identically
(torch.equal) to a run that never stopped; a checkpoint of another program is refused and changes nothing."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.config import INNER_OPTIMIZERS

# a warm-up of 4 steps then 4 of annealing: the checkpoint at step 3 lies mid-warm-up
SCHEDULE = dict(inner_lr_warmup_steps=4, inner_lr_warmup_start=0.25, inner_lr_anneal="linear",
                inner_lr_anneal_steps=4)


def make_model(seed: int, hidden: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm and LayerNorm affines are non-block parameters (the outer optimizer's state); BatchNorm has buffers
    return nn.Sequential(nn.Linear(5, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, 3))


def make_config(inner_optimizer: str, **kw) -> lwcompile.Config:
    # the exact solve needs the quadratic local loss (and a proximal term for this small batch)
    exact = dict(target="gd_pre", local_loss="squared_pre", prox=1.0) if inner_optimizer == "exact" else {}
    return lwcompile.Config(steps=2, inner_optimizer=inner_optimizer, inner_lr=0.05, outer_optimizer="adam",
                            outer_lr=0.01, **SCHEDULE, **exact).replace(**kw)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def transform(model: nn.Module, cfg: lwcompile.Config) -> lwcompile.Program:
    return lwcompile.transform(model, F.mse_loss, torch.zeros(8, 5), cfg)


def save_and_load(model: nn.Module, prog: lwcompile.Program) -> dict:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "program": prog.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("inner_optimizer", INNER_OPTIMIZERS)
def test_resume_is_bit_identical_to_never_stopping(inner_optimizer):
    data = batches(6)
    model = make_model(0)
    prog = transform(model, make_config(inner_optimizer))
    for x, y in data[:3]:
        prog.step(x, y)
    saved = save_and_load(model, prog)
    losses = [prog.step(x, y) for x, y in data[3:]]

    fresh = make_model(seed=7)  # another init: everything must come from the checkpoint
    resumed = transform(fresh, make_config(inner_optimizer))
    fresh.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["program"])
    assert resumed.step_count == 3 and resumed.effective_inner_lr == prog.inner_lr * (0.25 + 0.75 * 3 / 4)
    assert [resumed.step(x, y) for x, y in data[3:]] == losses
    assert_same_state(model, fresh)
    assert resumed.step_count == prog.step_count == 6
    for name, state in prog.inner_state.items():
        assert all(torch.equal(s, t) for s, t in zip(state, resumed.inner_state[name]))
    assert prog.outer_state().keys() == resumed.outer_state().keys() and prog.outer_state()


def test_a_program_retraced_by_guards_round_trips():
    data = batches(6)
    model = make_model(0)
    prog = transform(model, make_config("adam"))
    for x, y in data[:2]:
        prog.step(x, y)
    model.eval()  # re-trace: BatchNorm uses its running statistics now
    prog.step(*data[2])
    saved = save_and_load(model, prog)
    losses = [prog.step(*data[3])]
    model.train()  # re-trace back
    losses += [prog.step(x, y) for x, y in data[4:]]

    fresh = make_model(seed=7)
    resumed = transform(fresh, make_config("adam"))  # traced in train mode
    fresh.load_state_dict(saved["model"])
    fresh.eval()
    resumed.load_state_dict(saved["program"])  # re-traces for eval mode first
    got = [resumed.step(*data[3])]
    fresh.train()
    got += [resumed.step(x, y) for x, y in data[4:]]
    assert got == losses
    assert_same_state(model, fresh)


def _snapshot(prog: lwcompile.Program) -> dict:
    return prog.state_dict()


def _assert_unchanged(before: dict, prog: lwcompile.Program) -> None:
    after = prog.state_dict()
    assert before["step_count"] == after["step_count"] and before["inner_lr"] == after["inner_lr"]
    for name, state in before["inner_state"].items():
        assert all(torch.equal(s, t) for s, t in zip(state, after["inner_state"][name]))
    b, a = before["outer"]["state"], after["outer"]["state"]
    assert b.keys() == a.keys() and all(torch.equal(b[i][k], a[i][k]) for i in b for k in b[i])


@pytest.mark.parametrize("other, words", [
    (dict(hidden=7), ["block '0'", "[7, 5]", "[6, 5]"]),
    (dict(inner_optimizer="gd"), ["Config.inner_optimizer", "'adam'", "'gd'"]),
    (dict(gamma=3.0), ["Config.gamma", str(lwcompile.Config().gamma), "3.0"]),
    (dict(inner_lr_warmup_steps=5), ["Config.inner_lr_warmup_steps"]),
])
def test_a_checkpoint_of_another_program_is_refused_and_changes_nothing(other, words):
    data = batches(3)
    model = make_model(0)
    prog = transform(model, make_config("adam"))
    for x, y in data[:2]:
        prog.step(x, y)
    saved = save_and_load(model, prog)["program"]

    hidden = other.pop("hidden", 6)
    target = transform(make_model(1, hidden), make_config(other.pop("inner_optimizer", "adam"), **other))
    target.step(*data[2])
    before = _snapshot(target)
    with pytest.raises(lwcompile.LwcompileError, match="different program") as e:
        target.load_state_dict(saved)
    for w in words:
        assert w in str(e.value)
    _assert_unchanged(before, target)


def test_a_damaged_or_foreign_state_is_refused_and_changes_nothing():
    data = batches(3)
    model = make_model(0)
    prog = transform(model, make_config("adam"))
    prog.step(*data[0])
    good = save_and_load(model, prog)["program"]
    prog.step(*data[1])
    before = _snapshot(prog)
    with pytest.raises(lwcompile.LwcompileError, match="model.load_state_dict"):
        prog.load_state_dict(model.state_dict())
    bad_outer = dict(good, outer=dict(good["outer"], param_groups=[dict(good["outer"]["param_groups"][0], params=[0])]))
    bad_inner = dict(good, inner_state=dict(good["inner_state"], **{"0": good["inner_state"]["0"][:1]}))
    for bad, words in ((bad_outer, "outer optimizer"), (bad_inner, "inner_state['0']"),
                       (dict(good, step_count=-1), "step_count"), (dict(good, fingerprint=[1]), "Config.gamma")):
        with pytest.raises(lwcompile.LwcompileError) as e:
            prog.load_state_dict(bad)
        assert words in str(e.value)
        _assert_unchanged(before, prog)
    prog.load_state_dict(good)  # the intact one still loads: back to step 1
    assert prog.step_count == 1


def test_config_fields_that_change_no_number_may_differ_on_resume():
    model = make_model(0)
    prog = transform(model, make_config("momentum"))
    prog.step(*batches(1)[0])
    saved = save_and_load(model, prog)
    other = transform(make_model(0), make_config("momentum", check_finite=False, frontend="fx"))
    other.load_state_dict(saved["program"])
    assert other.step_count == 1
