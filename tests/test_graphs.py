"""The emitted graphs: printable, runnable on their own, and equal to an independent eager computation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.passes.inner import inner_example, make_inner_fn
from zoo import ZOO


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("target", ["gd_pre", "dual_md_pre", "gd_post", "md_post"])
def test_target_graph_returns_the_targets_of_method_md(target):
    """Oracle: â, ŷ and their gradients computed by hand with autograd, then METHOD.md's table."""
    m = _mlp()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    loss_name = {"gd_pre": "squared_pre", "dual_md_pre": "dual_bregman", "gd_post": "squared_post",
                 "md_post": "matching"}[target]
    prog = lwcompile.transform(m, F.mse_loss, x, target=target, local_loss=loss_name, gamma=0.7)
    got = prog.compute_targets(x, y)
    a1 = m[0](x)
    y1 = torch.tanh(a1)
    a2 = m[2](y1)
    loss = F.mse_loss(a2, y)
    g_a1, g_y1, g_a2 = torch.autograd.grad(loss, (a1, y1, a2))
    g = 0.7
    expect1 = {"gd_pre": a1 - g * g_a1, "dual_md_pre": a1 - g * g_y1, "gd_post": y1 - g * g_y1,
               "md_post": y1 - g * g_a1}[target]
    expect2 = a2 - g * g_a2  # identity block: every kind agrees
    torch.testing.assert_close(got["targets"]["0"], expect1.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["targets"]["2"], expect2.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["inputs"]["2"], y1.detach(), rtol=1e-12, atol=1e-12)
    assert float(got["loss"]) == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "transformer"])
def test_graphs_print_and_run_standalone(arch):
    model, inputs, y, loss_fn = ZOO[arch]()
    prog = lwcompile.transform(model, loss_fn, inputs, steps=3, inner_optimizer="adam")
    tg = prog.build_target_graph(y)
    code = tg.code
    assert "def forward" in code and "aten" in code
    for name, gm in prog.inner_graphs.items():
        block = next(b for b in prog.blocks if b.name == name)
        assert "def forward" in gm.code
        example = inner_example(block, prog.config)
        k = len(block.params) + 2  # weights, x, target are random; lr and the optimizer state as initialised
        args = [torch.randn_like(a) for a in example[:k]] + [torch.tensor(1e-3)] + list(example[k + 1:])
        eager = make_inner_fn(block, prog.config)(*args)
        graph = gm(*args)
        assert len(graph) == len(eager)
        for a, b in zip(graph, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inner_loop_state_persists_across_steps():
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4, dtype=torch.float64), inner_optimizer="adam",
                               steps=3, inner_lr=1e-3)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    prog.step(x, y)
    assert float(prog.inner_state["0"][-1]) == 3.0  # Adam's step counter after T=3
    prog.step(x, y)
    assert float(prog.inner_state["0"][-1]) == 6.0


def test_program_prints_a_block_table():
    model, inputs, y, loss_fn = ZOO["cnn"]()
    text = str(lwcompile.transform(model, loss_fn, inputs))
    for col in ("block", "op", "transfer", "weight shape", "FLOPs/example"):
        assert col in text
    assert "conv1" in text and "conv2d" in text and "4x2x3x3" in text and "elu" in text
    # conv1: 4 output channels x 8x8 positions x (2*3*3) MACs x 2
    assert f"{2 * 4 * 64 * 18:,}" in text


def test_batch_size_change_retraces_and_still_matches_sgd():
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4, dtype=torch.float64), target="gd_pre",
                               local_loss="squared_pre", steps=1, inner_optimizer="gd", inner_lr=0.1, gamma=1.0,
                               outer_optimizer="sgd", outer_lr=0.1)
    import copy
    ref = copy.deepcopy(m)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    F.mse_loss(ref(x), y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    prog.step(x, y)
    for p, r in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def test_inner_lr_is_a_graph_input_so_schedules_need_no_retrace():
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4, dtype=torch.float64), inner_optimizer="gd")
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    prog.step(x, y)
    n = len(prog._inner_cache)
    prog.inner_lr = 0.5
    prog.step(x, y)
    assert len(prog._inner_cache) == n
    with pytest.raises(lwcompile.ConfigError):
        prog.inner_lr = -1.0
    before = [p.detach().clone() for p in m.parameters()]
    prog.inner_lr = 0.0  # a warm-up epoch at lr 0 moves no block weight (the model has no non-block params)
    prog.step(x, y)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)


def test_profile_measures_every_block_and_feeds_the_plan():
    model, inputs, y, loss_fn = ZOO["cnn"]()
    prog = lwcompile.transform(model, loss_fn, inputs, steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = prog.profile(inputs, y, repeats=2)
    assert set(prof) == {b.name for b in prog.blocks} and all(t > 0 for t in prof.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    plan = prog.plan(2, "replicated", profile=prof)
    assert plan.makespan == pytest.approx(max(plan.times.values()))
    assert plan.makespan >= plan.lower_bound - 1e-12
