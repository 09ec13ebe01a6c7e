"""Config.reuse_preactivation: the inner graphs take the forward pass's pre-activation â instead of recomputing it.

Oracles: the same program with the option off (recomputing â inside the inner graph) and the SGD identity in
float64; plus a structural check that the reused graph really does one linear op fewer.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwcompile

D64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Sigmoid(), nn.Linear(5, 3))


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(),
                         nn.Linear(27, 4))


CASES = {
    "mlp": (_mlp, lambda g: torch.randn(7, 6, generator=g), lambda g: torch.randn(7, 3, generator=g)),
    "cnn": (_cnn, lambda g: torch.randn(5, 2, 7, 7, generator=g), lambda g: torch.randn(5, 4, generator=g)),
}
CONFIGS = {
    "defaults": {},
    "adam": {"inner_optimizer": "adam", "inner_lr": 1e-3, "steps": 2},
    "gd-prox": {"inner_optimizer": "gd", "inner_lr": 1e-2, "steps": 3, "prox": 0.5},
    "exact": {"target": "gd_pre", "local_loss": "squared_pre", "inner_optimizer": "exact", "prox": 1.0, "gamma": 0.5},
}


def _train(case: str, reuse: bool, cfg: dict, steps: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    make, fx, fy = CASES[case]
    m = make()
    g = torch.Generator().manual_seed(3)
    x0 = fx(g)
    prog = lwcompile.transform(m, F.mse_loss, x0, reuse_preactivation=reuse, **cfg)
    losses = [prog.step(fx(g), fy(g)) for _ in range(steps)]
    return losses, [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_reusing_the_forward_pre_activation_changes_no_number(case, cfg):
    """The forward pass's â is the same op on the same values as the inner graph's first z: iterative inner
    optimizers give bitwise the same weights; the exact solve computes Z as X @ Wᵀ (+ b), the forward pass with
    the op itself, so they agree to rounding."""
    off_losses, off = _train(case, False, CONFIGS[cfg])
    on_losses, on = _train(case, True, CONFIGS[cfg])
    assert on_losses[0] == off_losses[0]
    for a, b in zip(on, off):
        if cfg == "exact":
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(a, b)
    if cfg != "exact":
        assert on_losses == off_losses


def _linear_ops(gm: torch.fx.GraphModule) -> int:
    names = ("addmm", "mm", "linear", "convolution", "conv2d", "bmm", "matmul")
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and
               getattr(n.target, "__name__", "").split(".")[0] in names)


@pytest.mark.parametrize("cfg", ["defaults", "exact"])
def test_the_reusing_graph_does_one_forward_op_fewer(cfg):
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(7, 6), **CONFIGS[cfg])
    b = prog.blocks[0]
    with_z, without = prog.inner_graph(b.name, preact=True), prog.inner_graph(b.name, preact=False)
    assert prog.inner_signature(b.name, preact=True).input_names.index("preact") == \
        prog.inner_signature(b.name, preact=False).input_names.index("lr") + 1
    if cfg == "exact":  # the offset form's residual is −d at W̃ = W: it forms no Z, with or without â
        assert _linear_ops(with_z) == _linear_ops(without)
        t_with = prog.inner_graph(b.name, preact=True, offset=False)  # the target form (A − Z) still saves one
        assert _linear_ops(t_with) == _linear_ops(prog.inner_graph(b.name, preact=False, offset=False)) - 1
    else:
        assert _linear_ops(with_z) == _linear_ops(without) - 1
    assert prog.inner_graph(b.name) is with_z  # the default is Config.reuse_preactivation (True): what step runs


def test_sgd_identity_holds_with_reuse_in_float64():
    """T = 1 plain GD: a LocoProp step equals SGD at lr = inner_lr · γ (METHOD.md), with â handed in."""
    m = _mlp().double()
    ref = _mlp().double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(7, 6, generator=g, dtype=D64), torch.randn(7, 3, generator=g, dtype=D64)
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", steps=1, inner_optimizer="gd", inner_lr=0.05,
                           gamma=2.0, reuse_preactivation=True)
    prog = lwcompile.transform(m, F.mse_loss, x, config=cfg)
    res = prog.compute_targets(x, y)
    assert set(res["preacts"]) == {b.name for b in prog.blocks}
    prog.step(x, y)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05 * 2.0)
    opt.zero_grad()
    F.mse_loss(ref(x), y).backward()
    opt.step()
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_the_option_is_validated_and_not_part_of_a_checkpoint_fingerprint():
    with pytest.raises(lwcompile.ConfigError, match="reuse_preactivation"):
        lwcompile.Config(reuse_preactivation="yes")
    m = _mlp()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 6, generator=g), torch.randn(7, 3, generator=g)
    prog = lwcompile.transform(m, F.mse_loss, x, reuse_preactivation=True)
    prog.step(x, y)
    other = lwcompile.transform(_mlp(), F.mse_loss, x, reuse_preactivation=False)
    other.model.load_state_dict(m.state_dict())
    other.load_state_dict(prog.state_dict())  # the same numbers either way: a checkpoint resumes across it
    assert prog.step(x, y) == other.step(x, y)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_the_finite_check_catches_one_bad_value_anywhere(bad):
    """The step's finiteness check sums first (one pass): a single NaN/inf must still be caught."""
    m = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    prog = lwcompile.transform(m, F.mse_loss, x)
    before = [p.detach().clone() for p in m.parameters()]
    x[2, 1] = float(bad)
    with pytest.raises(lwcompile.NonFiniteError):
        prog.step(x, y)
    for a, b in zip(m.parameters(), before):
        assert torch.equal(a, b)


def test_finite_values_whose_sum_overflows_are_not_refused():
    """A weight of huge but finite entries: its float32 sum is inf, the values are fine, the step goes through."""
    m = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight.fill_(3e38)
        m[0].bias.zero_()
    x, y = torch.zeros(5, 4), torch.zeros(5, 3)  # 0 · 3e38 = 0: a finite forward pass and loss
    prog = lwcompile.transform(m, F.mse_loss, x, inner_optimizer="gd", steps=1)
    assert not torch.isfinite(m[0].weight.sum())
    assert prog.step(x, y) == 0.0
    assert torch.equal(m[0].weight, torch.full((3, 4), 3e38))
