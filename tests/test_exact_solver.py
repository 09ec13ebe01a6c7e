"""Config(inner_optimizer="exact"): the block's local least-squares problem solved in closed form.

Oracles, each independent of the solver's im2col / normal equations: torch.linalg.lstsq on the (augmented)
design matrix in float64; the minimizer reached by L-BFGS through F.convNd's autograd in float64; and the
first-order optimality of the weights a compiled step writes (local gradient through the model's own op = 0).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.config import Config
from lwcompile.errors import ConfigError, LwcompileError
from lwcompile.ir import Block
from lwcompile.passes.exact_solver import make_exact_fn
from lwcompile.passes.inner import build_inner_graph, inner_example
from lwcompile.runtime.costs import block_cost, exact_flops

D64 = torch.float64


def _cfg(prox=0.0):
    return Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=prox)


def _linear_block(d_in, d_out, batch, bias=True, op="linear"):
    w = (d_out, d_in) if op == "linear" else (d_in, d_out)
    return Block("fc", "fc", op, (), "tanh", (), "fc.weight", "fc.bias" if bias else None, w,
                 (d_out,) if bias else None, (batch, d_in), (batch, d_out), 2 * d_in * d_out)


def _conv_block(nd, cin, cout, k, groups, stride, padding, dilation, x_shape, z_shape, bias=True):
    attrs = (("dilation", (dilation,) * nd), ("groups", groups), ("padding", (padding,) * nd), ("stride", (stride,) * nd))
    return Block("conv", "conv", f"conv{nd}d", attrs, "relu", (), "conv.weight", "conv.bias" if bias else None,
                 (cout, cin // groups) + (k,) * nd, (cout,) if bias else None, x_shape, z_shape, 0)


@pytest.mark.parametrize("op", ["linear", "matmul"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_solution_equals_lstsq_in_float64(op, bias):
    g = torch.Generator().manual_seed(1)
    n, d_in, d_out = 40, 6, 3
    x, a = torch.randn(n, d_in, generator=g, dtype=D64), torch.randn(n, d_out, generator=g, dtype=D64)
    W0 = torch.randn(*_linear_block(d_in, d_out, n, bias, op).weight_shape, generator=g, dtype=D64)
    b0 = torch.randn(d_out, generator=g, dtype=D64)
    fn = make_exact_fn(_linear_block(d_in, d_out, n, bias, op), _cfg())
    out = fn(W0, b0, x, a, torch.tensor(0.0)) if bias else fn(W0, x, a, torch.tensor(0.0))
    design = torch.cat([x, torch.ones(n, 1, dtype=D64)], 1) if bias else x
    sol = torch.linalg.lstsq(design, a).solution  # (d_in [+1], d_out); the start point W0 plays no role at λ=0
    W_ref = sol[:d_in].T if op == "linear" else sol[:d_in]
    torch.testing.assert_close(out[0], W_ref, rtol=1e-9, atol=1e-9)
    if bias:
        torch.testing.assert_close(out[1], sol[d_in], rtol=1e-9, atol=1e-9)


def test_prox_closed_form_equals_augmented_lstsq_and_float32_is_close():
    # min ½‖X W̃ᵀ + 1b̃ᵀ − A‖² + (λ/2)(‖W̃ − W‖² + ‖b̃ − b‖²) = lstsq of [X 1; √λ I] against [A; √λ [W b]ᵀ]
    g = torch.Generator().manual_seed(2)
    n, d_in, d_out, lam = 5, 8, 4, 0.7  # fewer rows than unknowns: only the proximal term makes it well posed
    x, a = torch.randn(n, d_in, generator=g, dtype=D64), torch.randn(n, d_out, generator=g, dtype=D64)
    W0, b0 = torch.randn(d_out, d_in, generator=g, dtype=D64), torch.randn(d_out, generator=g, dtype=D64)
    design = torch.cat([torch.cat([x, torch.ones(n, 1, dtype=D64)], 1), lam ** 0.5 * torch.eye(d_in + 1, dtype=D64)])
    rhs = torch.cat([a, lam ** 0.5 * torch.cat([W0.T, b0[None]], 0)])
    sol = torch.linalg.lstsq(design, rhs).solution
    fn = make_exact_fn(_linear_block(d_in, d_out, n), _cfg(prox=lam))
    W, b = fn(W0, b0, x, a, torch.tensor(0.0))
    torch.testing.assert_close(W, sol[:d_in].T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, sol[d_in], rtol=1e-9, atol=1e-9)
    W32, b32 = fn(W0.float(), b0.float(), x.float(), a.float(), torch.tensor(0.0))
    assert (W32.double() - W).abs().max() < 1e-4 * (W - W0).abs().max()


def _lbfgs_minimizer(conv, W0, b0, x, a, lam, attrs):
    """The local objective minimized through F.convNd's autograd, in float64."""
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = conv(x, W, b, **attrs)
        loss = 0.5 * ((z - a) ** 2).sum() + 0.5 * lam * (((W - W0) ** 2).sum() + ((b - b0) ** 2).sum())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return W.detach(), b.detach()


@pytest.mark.parametrize("nd,cin,cout,k,groups,stride,padding,dilation,size,lam", [
    (2, 4, 6, 3, 2, 2, 1, 1, 7, 0.5),   # groups + stride + padding
    (2, 3, 4, 3, 1, 1, 2, 2, 6, 0.0),   # dilation, no prox (enough rows)
    (1, 4, 4, 3, 4, 1, 1, 1, 9, 0.3),   # depthwise conv1d
    (3, 2, 3, 2, 1, 1, 1, 1, 4, 0.2),   # conv3d
    # stride 1, dilation 1, 2-D: the structured Gram path (passes/conv_gram.py), no patch matrix
    (2, 4, 6, 3, 2, 1, 1, 1, 7, 0.5),   # groups
    (2, 3, 4, 5, 1, 1, 2, 1, 6, 0.1),   # 5x5, padding 2
    (2, 4, 4, 3, 4, 1, 0, 1, 6, 0.3),   # depthwise, no padding
])
def test_conv_solution_equals_the_minimizer_found_through_conv_autograd(nd, cin, cout, k, groups, stride, padding,
                                                                       dilation, size, lam):
    g = torch.Generator().manual_seed(3)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn((5, cin) + (size,) * nd, generator=g, dtype=D64)
    W0 = torch.randn((cout, cin // groups) + (k,) * nd, generator=g, dtype=D64) * 0.3
    b0 = torch.randn(cout, generator=g, dtype=D64)
    z0 = conv(x, W0, b0, **attrs)
    a = z0 + torch.randn(z0.shape, generator=g, dtype=D64)
    blk = _conv_block(nd, cin, cout, k, groups, stride, padding, dilation, tuple(x.shape), tuple(z0.shape))
    W, b = make_exact_fn(blk, _cfg(lam))(W0, b0, x, a, torch.tensor(0.0))
    W_ref, b_ref = _lbfgs_minimizer(conv, W0, b0, x, a, lam, attrs)
    torch.testing.assert_close(W, W_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_compiled_step_writes_the_local_minimizer_of_every_block():
    # first-order optimality: ∂/∂θ [½‖op(x; θ) − a‖² + (λ/2)‖θ − θ₀‖²] = 0 at the new weights, via the model's own ops
    torch.manual_seed(0)
    model, lam = _ConvNet().double(), 0.3
    x, y = torch.randn(8, 2, 6, 6, dtype=D64), torch.randn(8, 5, dtype=D64)
    prog = lwcompile.transform(model, F.mse_loss, (x,), Config(target="gd_pre", local_loss="squared_pre",
                                                                inner_optimizer="exact", prox=lam, gamma=2.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = prog.compute_targets(x, y)
    prog.step(x, y)
    mods = {"conv": model.conv, "fc": model.fc}
    for name, mod in mods.items():
        W, b = mod.weight.detach().clone().requires_grad_(True), mod.bias.detach().clone().requires_grad_(True)
        xin, a = res["inputs"][name], res["targets"][name]
        z = (F.conv2d(xin, W, b, stride=2, padding=1, groups=2) if name == "conv" else F.linear(xin, W, b))
        loss = 0.5 * ((z - a) ** 2).sum() + 0.5 * lam * (((W - before[f"{name}.weight"]) ** 2).sum()
                                                          + ((b - before[f"{name}.bias"]) ** 2).sum())
        gW, gb = torch.autograd.grad(loss, (W, b))
        assert (W - before[f"{name}.weight"]).abs().max() > 1e-3  # it moved
        assert gW.abs().max() < 1e-9 and gb.abs().max() < 1e-9, name


def test_inner_graph_is_an_fx_graph_module_calling_the_solve_op():
    blk = _linear_block(6, 3, 10)
    gm = build_inner_graph(blk, _cfg(prox=1.0), inner_example(blk, _cfg(prox=1.0)))
    assert "lwcompile.spd_solve" in gm.code
    assert blk.params == ("fc.weight", "fc.bias") and len(gm(*inner_example(blk, _cfg(prox=1.0)))) == 2


def test_non_quadratic_local_loss_is_refused():
    with pytest.raises(ConfigError, match="not quadratic"):
        Config(target="md_post", local_loss="matching", inner_optimizer="exact")


def test_transposed_conv_and_padding_modes_are_refused_naming_the_block():
    net = nn.Sequential(nn.ConvTranspose2d(2, 3, 3))
    with pytest.raises(ConfigError, match=r"block '0'.*transposed"):
        lwcompile.transform(net, lambda o, t: ((o - t) ** 2).mean(), (torch.randn(2, 2, 4, 4),), _cfg(prox=1.0))
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ConfigError, match=r"block '0'.*padding_mode='reflect'"):
        lwcompile.transform(net, lambda o, t: ((o - t) ** 2).mean(), (torch.randn(2, 2, 4, 4),), _cfg(prox=1.0))


def test_prox_zero_with_fewer_rows_than_unknowns_is_refused_at_transform():
    net = nn.Sequential(nn.Linear(10, 3))
    with pytest.raises(ConfigError, match=r"block '0'.*singular.*prox"):
        lwcompile.transform(net, F.mse_loss, (torch.randn(4, 10),), _cfg(prox=0.0))


def test_rank_deficient_batch_with_prox_zero_raises_and_leaves_the_model_unchanged():
    net = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(16, 3)
    x[:, 1] = 0.0  # a dead input feature: XᵀX is exactly singular
    prog = lwcompile.transform(net, F.mse_loss, (x,), _cfg(prox=0.0))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(LwcompileError, match=r"block '0'.*singular.*prox"):
        prog.step(x, torch.randn(16, 2))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    prog2 = lwcompile.transform(net, F.mse_loss, (x,), _cfg(prox=1.0))
    prog2.step(x, torch.randn(16, 2))  # the proximal term makes it solvable
    assert net[0].weight[:, 1].sub(before[0][:, 1]).abs().max() == 0  # a dead input's weights do not move


def test_cost_model_counts_one_solve_not_T_iterations():
    blk = _linear_block(784, 1000, 1000)
    c = block_cost(blk, steps=10, exact=True, device_rate=1e9)
    d = 785
    assert c.flops == exact_flops(blk) == 2 * 1000 * d * d + 4 * 1000 * d * 1000 + d ** 3 // 3 + 2 * d * d * 1000
    assert c.flops < block_cost(blk, steps=10, device_rate=1e9).flops


def test_handing_in_the_forward_pre_activation_gives_the_same_solution():
    g = torch.Generator().manual_seed(4)
    x, W0, b0 = (torch.randn(2, 4, 6, 6, generator=g, dtype=D64), torch.randn(6, 2, 3, 3, generator=g, dtype=D64),
                 torch.randn(6, generator=g, dtype=D64))
    z = F.conv2d(x, W0, b0, stride=2, padding=1, groups=2)
    a = z + torch.randn(z.shape, generator=g, dtype=D64)
    blk = _conv_block(2, 4, 6, 3, 2, 2, 1, 1, tuple(x.shape), tuple(z.shape))
    ref = make_exact_fn(blk, _cfg(0.5))(W0, b0, x, a, torch.tensor(0.0))
    got = make_exact_fn(blk, _cfg(0.5), preact_given=True)(W0, b0, x, a, torch.tensor(0.0), z)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_onnx_export_is_refused_before_anything_is_written(tmp_path):
    net = nn.Sequential(nn.Linear(3, 2))
    prog = lwcompile.transform(net, F.mse_loss, (torch.randn(8, 3),), _cfg(prox=1.0))
    with pytest.raises(lwcompile.errors.ExportError, match="exact.*ONNX"):
        prog.export_onnx(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_frozen_bias_stays_and_the_weight_solves_against_it():
    net = nn.Sequential(nn.Linear(4, 3)).double()
    net[0].bias.requires_grad_(False)
    x, y = torch.randn(32, 4, dtype=D64), torch.randn(32, 3, dtype=D64)
    prog = lwcompile.transform(net, F.mse_loss, (x,), _cfg(prox=0.0).replace(gamma=3.0))
    b0 = net[0].bias.detach().clone()
    a = prog.compute_targets(x, y)["targets"]["0"]
    prog.step(x, y)
    assert torch.equal(net[0].bias, b0)
    W_ref = torch.linalg.lstsq(x, a - b0).solution.T  # the best weight given the fixed bias
    torch.testing.assert_close(net[0].weight.detach(), W_ref, rtol=1e-9, atol=1e-9)


def test_a_system_float32_cholesky_cannot_factor_is_solved_in_float64():
    g = torch.Generator().manual_seed(1)  # seed chosen so that float32 Cholesky fails on a positive definite matrix
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=D64))
    gram = ((Q * torch.tensor([1, 1, 1, 1, 1e-3, 1e-6, 1e-8, 1e-8], dtype=D64)) @ Q.T).float()
    assert torch.linalg.cholesky_ex(gram).info.item() != 0  # the path under test is taken
    assert torch.linalg.eigvalsh(gram.double()).min() > 0
    rhs = gram.double() @ torch.randn(8, 2, generator=g, dtype=D64)  # a solution of size 1
    got = torch.ops.lwcompile.spd_solve(gram, rhs.float(), "blk", 0.0)
    ref = torch.linalg.solve(gram.double(), rhs.float().double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
