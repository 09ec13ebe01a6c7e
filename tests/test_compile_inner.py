"""Config(compile_inner=True): the inner graphs run compiled by torch.compile, with the eager graphs as the oracle.

Compiling is slow (seconds per graph), so the compiled tests use a one-block model and T <= 2; the fallback, which
compiles nothing, a two-block one.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import lwcompile
import lwcompile.runtime.compiled as compiled


def _mlp(dtype=torch.float32, blocks=1):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)] if blocks == 2 else [nn.Linear(6, 3), nn.Tanh()]
    model = nn.Sequential(*layers).to(dtype)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 3, dtype=dtype)
    return model, x, y


def _train(model, x, y, cfg, steps=2):
    prog = lwcompile.transform(model, nn.functional.mse_loss, (x,), cfg)
    losses = [prog.step(x, y) for _ in range(steps)]
    return prog, losses


def _fallback_warnings(record):
    return [str(w.message) for w in record if "compile_inner" in str(w.message)]


@pytest.mark.parametrize("optimizer", ["rmsprop_tf1", "adam"])
def test_compiled_steps_equal_eager_steps(optimizer):
    model, x, y = _mlp()
    eager_model = copy.deepcopy(model)
    # gamma/lr large enough that every weight moves well beyond float32 rounding in two steps
    cfg = lwcompile.Config(steps=2, inner_optimizer=optimizer, gamma=1.0, inner_lr=1e-2)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prog, losses = _train(model, x, y, cfg.replace(compile_inner=True))
    assert not _fallback_warnings(record)  # it really ran compiled ...
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == len(prog.blocks)  # once per block
    eager, eager_losses = _train(eager_model, x, y, cfg)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for (n, p), (_, q), (_, p0) in zip(model.named_parameters(), eager_model.named_parameters(),
                                       _mlp()[0].named_parameters()):
        assert not torch.equal(q, p0), n  # the comparison below is about real updates
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
    for name, state in prog.inner_state.items():
        for s, e in zip(state, eager.inner_state[name]):
            torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-7)


def test_the_exact_solvers_custom_op_compiles_and_matches_eager():
    model, x, y = _mlp()
    eager_model = copy.deepcopy(model)
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0, gamma=1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(model, x, y, cfg.replace(compile_inner=True))
    assert not _fallback_warnings(record)  # torch.ops.lwcompile.spd_solve's fake kernel fits inductor's checks
    _train(eager_model, x, y, cfg)
    for (n, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_compiled_T1_gd_is_sgd_in_float64():
    eta, gamma = 0.05, 0.5
    model, x, y = _mlp(torch.float64)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=eta * gamma)
    nn.functional.mse_loss(ref(x), y).backward()
    opt.step()
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", gamma=gamma, steps=1, inner_optimizer="gd",
                           inner_lr=eta, compile_inner=True)
    _train(model, x, y, cfg, steps=1)
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12, msg=n)


def test_blocks_compiled_in_device_threads_equal_eager():
    model, x, y = _mlp(blocks=2)
    eager_model = copy.deepcopy(model)
    cfg = lwcompile.Config(steps=1, inner_optimizer="gd", gamma=1.0, inner_lr=1e-2)
    prog = lwcompile.transform(model, nn.functional.mse_loss, (x,), cfg.replace(compile_inner=True))
    devices = {"sim:0": [prog.blocks[0].name], "sim:1": [prog.blocks[1].name]}  # one thread per block
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        losses = [prog.step(x, y, assignment=devices) for _ in range(2)]
    assert not _fallback_warnings(record)
    _, eager_losses = _train(eager_model, x, y, cfg)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for (n, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def _raising_backend(gm, example_inputs):
    raise RuntimeError("no compiler here\nsecond line")


def test_failed_compile_warns_once_per_block_and_runs_eager_bitwise(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", _raising_backend)
    model, x, y = _mlp(blocks=2)
    eager_model = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prog, losses = _train(model, x, y, lwcompile.Config(steps=2, compile_inner=True), steps=3)
    messages = _fallback_warnings(record)
    assert len(messages) == len(prog.blocks) == 2
    for b, m in zip(prog.blocks, messages):
        assert f"block {b.name!r}" in m and "no compiler here" in m and "second line" not in m
    _, eager_losses = _train(eager_model, x, y, lwcompile.Config(steps=2), steps=3)
    assert losses == eager_losses
    for (n, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.equal(p, q), n


def test_an_error_of_the_graph_itself_is_raised_unchanged_without_a_warning():
    graph = torch.fx.symbolic_trace(lambda a, b: (a @ b,))
    fn = compiled.CompiledGraphs(backend="eager").get("fc", graph)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            fn(torch.ones(2, 3), torch.ones(2, 3))
    assert not _fallback_warnings(record)
    assert torch.equal(fn(torch.ones(2, 3), torch.ones(3, 1))[0], torch.full((2, 1), 3.0))


def test_compile_inner_is_validated_and_resumable_across_values():
    with pytest.raises(lwcompile.ConfigError, match="compile_inner"):
        lwcompile.Config(compile_inner="yes")
    model, x, _ = _mlp()
    on = lwcompile.transform(model, nn.functional.mse_loss, (x,), lwcompile.Config(compile_inner=True))
    off = lwcompile.transform(copy.deepcopy(model), nn.functional.mse_loss, (x,), lwcompile.Config())
    off.load_state_dict(on.state_dict())  # only the float rounding differs: not part of the fingerprint
    with pytest.raises(lwcompile.LwcompileError):
        lwcompile.transform(copy.deepcopy(model), nn.functional.mse_loss, (x,),
                            lwcompile.Config(steps=4)).load_state_dict(on.state_dict())
